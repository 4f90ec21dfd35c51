# MLflow mirror: the store, the experiment and the per-task parent runs are created once,
# before any parallel job, so jobs never race on schema migration or experiment creation.


localrules:
    make_tracking_store,


rule make_tracking_store:
    output:
        "results/tracking.json",
    log:
        "results/logs/make_tracking_store.log",
    conda:
        "../../envs/vitplasticity.yaml"
    params:
        uri=get_tracking_uri(),
        experiment=config["study"],
        parents=" ".join(get_tracking_parents()),
        disabled="" if TRACKING.get("enabled", True) else "--disabled",
    shell:
        "vitplasticity tracking prepare {params.disabled} --uri={params.uri:q} "
        "--experiment {params.experiment} --parents {params.parents} --out {output} 2> {log}"
