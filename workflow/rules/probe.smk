# Stage 5: the linear-probing baseline per (model, task).


rule linear_probe:
    input:
        checkpoint=get_checkpoint,
        task="data/prepared/{task}",
    output:
        "results/probes/{model}/{task}/metrics.json",
    log:
        "results/logs/linear_probe/{model}/{task}.log",
    benchmark:
        "results/benchmarks/linear_probe/{model}/{task}.tsv"
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=60,
    params:
        settings=get_probe_settings,
    shell:
        "vitplasticity probe --settings {params.settings:q} "
        "--threads {threads} --checkpoint {input.checkpoint} "
        "--task {input.task} --out {output} 2> {log}"
