# Before the study: whether its batches fit the device its jobs use and what they cost there.
# A target of its own (`snakemake --cores all preflight`), an input of no study job; the config's
# science and its runtime section are params, so a changed batch, model or micro-batch reruns it.


rule preflight:
    output:
        "results/preflight.json",
    log:
        "results/logs/preflight.log",
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=30,
    params:
        settings=get_preflight_settings,
    shell:
        "vitplasticity preflight --settings {params.settings:q} --threads {threads} "
        "--out {output} 2> {log}"
