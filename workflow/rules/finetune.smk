# Stage 4: one finetuning run per (model, task, optimizer, arm, lr, seed).
# The run folder is self-describing (config.yaml, history.csv, metrics.json) and the
# job resumes from its own state.pt after an interruption.


rule finetune:
    input:
        checkpoint=get_checkpoint,
        task="data/prepared/{task}",
        criteria=get_finetune_criteria,
    output:
        metrics="results/runs/{model}/{task}/{optimizer}/{arm}/lr{lr}_seed{seed}/metrics.json",
        history="results/runs/{model}/{task}/{optimizer}/{arm}/lr{lr}_seed{seed}/history.csv",
        config="results/runs/{model}/{task}/{optimizer}/{arm}/lr{lr}_seed{seed}/config.yaml",
    log:
        "results/logs/finetune/{model}/{task}/{optimizer}/{arm}/lr{lr}_seed{seed}.log",
    benchmark:
        "results/benchmarks/finetune/{model}/{task}/{optimizer}/{arm}/lr{lr}_seed{seed}.tsv"
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=get_finetune_runtime_minutes,
    params:
        settings=get_finetune_settings,
        run_dir=subpath(output.metrics, parent=True),
    shell:
        "vitplasticity finetune --settings {params.settings:q} "
        "--threads {threads} --checkpoint {input.checkpoint} "
        "--task {input.task} --run-dir {params.run_dir} --criteria {input.criteria} 2> {log}"
