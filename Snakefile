# vitplasticity: which components of a pretrained ViT to finetune.
# Stages: prepare_dataset -> checkpoint (fetch or pretrain) -> plasticity + bounds, criteria,
#         pretraining trajectory -> finetune arms + linear probe -> aggregate -> figures -> report.
from snakemake.utils import min_version

min_version("9.0")


# The paper study by default; `--configfile config/quick.yaml` replaces it whole (no merge).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


envvars:
    "PATH",


# The landing page of `snakemake --report`: what the study asks and how to read it.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model=_alternatives(MODELS),
    task=_alternatives(TASKS),
    experiment=_alternatives(EXPERIMENTS),
    optimizer="sgd|adamw",
    arm=_alternatives(ARMS),
    seed=r"\d+",
    lr=r"[0-9.e+-]+",


include: "workflow/rules/datasets.smk"
include: "workflow/rules/checkpoints.smk"
include: "workflow/rules/plasticity.smk"
include: "workflow/rules/criteria.smk"
include: "workflow/rules/trajectory.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/hooks.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/preflight.smk"


rule all:
    default_target: True
    input:
        get_all_targets(),
