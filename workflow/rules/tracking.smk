# MLflow mirror: the store and the experiment are created once, before any parallel job, so
# jobs never race on schema migration or experiment creation. Jobs create their parent run
# (one per model/task/optimizer) on first use, under a lock beside results/tracking.json.


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
        uri=TRACKING_REQUEST["uri"],
        experiment=TRACKING_REQUEST["experiment"],
        disabled="" if TRACKING_REQUEST["enabled"] else "--disabled",
    shell:
        "vitplasticity tracking prepare {params.disabled} --uri={params.uri:q} "
        "--experiment {params.experiment} --out {output} 2> {log}"
