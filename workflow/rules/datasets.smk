# Stage 1: every task (synthetic or downloaded) becomes one prepared folder.


rule prepare_dataset:
    output:
        directory("data/prepared/{task}"),
    log:
        "results/logs/prepare_dataset/{task}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{task}.tsv"
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        settings=get_prepare_settings,
        raw=get_raw_dir,
    shell:
        "vitplasticity prepare --settings {params.settings:q} --out {output} "
        "--raw {params.raw} 2> {log}"
