"""The names of an experiment's tables and figures: the one list the workflow, the code and the tests read.

`aggregate.aggregate` writes every table of `TABLES` (CSV, Markdown, HTML) and `figures.make_figures`
draws every figure of `FIGURES` (PNG, PDF); the workflow declares them as outputs and the report shows
them with the caption `workflow/report/table_<name>.rst` or `figure_<name>.rst`. Kept free of imports:
Snakemake reads it at every start.
"""

TABLES = ("main_table", "relative_gain", "lr_gap", "stat_tests", "separation", "plasticity_rank", "plasticity",
          "bounds", "criteria", "trajectory", "runs")
# Rules that compute on a GPU when there is one: each asks for a GPU (SLURM profile, local GPU slots)
# and its command takes a slot of its own (`vitplasticity.gpus`).
GPU_RULES = ("pretrain_checkpoint", "finetune", "measure_plasticity", "measure_criteria", "measure_trajectory",
             "linear_probe")
FIGURES = ("plasticity_vs_rank", "plasticity_vs_depth", "bounds_vs_depth", "relative_gain", "accuracy_per_arm",
           "lr_robustness", "training_curves", "criteria_hit_rate", "accuracy_vs_params", "plasticity_trajectory")
