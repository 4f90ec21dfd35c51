# Stage 3: per-component plasticity of a checkpoint on a task, and the theoretical bounds.


rule measure_plasticity:
    input:
        checkpoint=get_checkpoint,
        reference=f"data/prepared/{REFERENCE}",
        task="data/prepared/{task}",
    output:
        table="results/plasticity/{model}/{task}/plasticity.csv",
        stats="results/plasticity/{model}/{task}/embedding.json",
    log:
        "results/logs/measure_plasticity/{model}/{task}.log",
    benchmark:
        "results/benchmarks/measure_plasticity/{model}/{task}.tsv"
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_plasticity_settings,
    shell:
        "vitplasticity plasticity --settings {params.settings:q} "
        "--threads {threads} --checkpoint {input.checkpoint} "
        "--reference {input.reference} --task {input.task} "
        "--out-table {output.table} --out-stats {output.stats} 2> {log}"


rule compute_bounds:
    input:
        checkpoint=get_checkpoint,
        stats=rules.measure_plasticity.output.stats,
    output:
        "results/bounds/{model}/{task}/bounds.csv",
    log:
        "results/logs/compute_bounds/{model}/{task}.log",
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "vitplasticity bounds --checkpoint {input.checkpoint} --stats {input.stats} "
        "--out {output} 2> {log}"
