# Stage 2: a pretrained checkpoint per model: fetched from the hub (paper), imported from
# a local weights file, or pretrained here on the synthetic source task (quick study).

FETCHED = [
    name for name, model in MODELS.items() if model["source"] in ("timm", "local")
]
PRETRAINED = [name for name, model in MODELS.items() if model["source"] == "pretrain"]


rule fetch_checkpoint:
    input:
        get_local_weights,
    output:
        weights="data/checkpoints/{model}.safetensors",
        sidecar="data/checkpoints/{model}.json",
    log:
        "results/logs/fetch_checkpoint/{model}.log",
    wildcard_constraints:
        model=_alternatives(FETCHED),
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_fetch_settings,
    shell:
        "vitplasticity fetch --settings {params.settings:q} --out {output.weights} 2> {log}"


rule pretrain_checkpoint:
    input:
        task=get_pretrain_task,
    output:
        weights="data/checkpoints/{model}.safetensors",
        sidecar="data/checkpoints/{model}.json",
        metrics="results/pretrain/{model}/metrics.json",
        history="results/pretrain/{model}/history.csv",
        # The weights at every evaluation (step_<N>.safetensors): the pretraining trajectory.
        checkpoints=directory("results/pretrain/{model}/checkpoints"),
    log:
        "results/logs/pretrain_checkpoint/{model}.log",
    benchmark:
        "results/benchmarks/pretrain_checkpoint/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(PRETRAINED),
    conda:
        "../../envs/vitplasticity.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        settings=get_pretrain_settings,
    shell:
        "vitplasticity pretrain --settings {params.settings:q} "
        "--threads {threads} --task {input.task} "
        "--out {output.weights} --run-dir results/pretrain/{wildcards.model} 2> {log}"
