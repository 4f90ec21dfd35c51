# Stage 1: every task (synthetic or downloaded) becomes one prepared folder.


rule prepare_dataset:
    output:
        directory("data/prepared/{task}"),
    params:
        settings=get_prepare_settings,
    log:
        "results/logs/prepare_dataset/{task}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{task}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "vitplasticity prepare --settings '{params.settings}' --out {output} "
        "--raw data/raw/{wildcards.task} 2> {log}"
