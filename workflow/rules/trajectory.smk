# Beyond the paper: when does the ranking form? Plasticity in every mode at the kept steps of a
# pretraining run (models.*.pretrain.keep_steps), on the tasks of the experiments using the model.


rule measure_trajectory:
    input:
        checkpoints=rules.pretrain_checkpoint.output.checkpoints,
        reference=f"data/prepared/{REFERENCE}",
        tasks=get_trajectory_tasks,
    output:
        "results/pretrain/{model}/trajectory/trajectory.csv",
    log:
        "results/logs/measure_trajectory/{model}.log",
    benchmark:
        "results/benchmarks/measure_trajectory/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(TRAJECTORY_MODELS),
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_trajectory_settings,
    shell:
        "vitplasticity trajectory --settings {params.settings:q} --threads {threads} "
        "--checkpoints {input.checkpoints} --reference {input.reference} "
        "--task {input.tasks} --out {output} 2> {log}"
