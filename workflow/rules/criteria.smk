# Beyond the paper: selection criteria side by side on each (model, task) an experiment finetunes.


rule measure_criteria:
    input:
        checkpoint=get_checkpoint,
        reference=f"data/prepared/{REFERENCE}",
        task="data/prepared/{task}",
    output:
        table="results/criteria/{model}/{task}/criteria.csv",
        cost="results/criteria/{model}/{task}/cost.csv",
    log:
        "results/logs/measure_criteria/{model}/{task}.log",
    benchmark:
        "results/benchmarks/measure_criteria/{model}/{task}.tsv"
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_criteria_settings,
    shell:
        "vitplasticity criteria --settings {params.settings:q} --threads {threads} "
        "--checkpoint {input.checkpoint} --reference {input.reference} --task {input.task} "
        "--out-table {output.table} 2> {log}"
