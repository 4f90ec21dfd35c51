"""The names of what the study writes: an experiment's tables and figures, the folders its jobs write, and the
selection criteria it compares (with the end of each criterion's scale chosen first).

The one list the workflow, the code and the tests read. `aggregate.aggregate` writes every table of `TABLES`
(CSV, Markdown, HTML) and `figures.make_figures` draws every figure of `FIGURES` (PNG, PDF), each under
`results/tables/<experiment>/` and `results/figures/<experiment>/`; the workflow declares them as outputs
and the report shows each beside its caption (`caption`). `ENABLED_BY` names the setting without which a
table or figure is written but says that nothing was measured (or, for the paper comparison, is not
written at all). Kept free of imports: Snakemake reads it at every start.
"""

TABLES = ("main_table", "relative_gain", "lr_gap", "stat_tests", "separation", "plasticity_rank", "plasticity",
          "bounds", "criteria", "trajectory", "selection", "vtab", "runs")
FIGURES = ("plasticity_vs_rank", "plasticity_vs_depth", "bounds_vs_depth", "relative_gain", "accuracy_per_arm",
           "lr_robustness", "training_curves", "criteria_hit_rate", "accuracy_vs_params", "plasticity_trajectory",
           "selection_vs_budget")
# A table and a figure of that name, made by `vitplasticity compare-paper` for an experiment that sets it.
PAPER_COMPARISON = "paper_comparison"
ENABLED_BY = {
    "criteria": "criteria.enabled",
    "criteria_hit_rate": "criteria.enabled",
    "trajectory": "models.<model>.pretrain.keep_steps",
    "plasticity_trajectory": "models.<model>.pretrain.keep_steps",
    "selection": "experiments.<experiment>.selection",
    "selection_vs_budget": "experiments.<experiment>.selection",
    PAPER_COMPARISON: "experiments.<experiment>.compare_to_paper",
    "vtab": "tasks.<task>.data.source: vtab1k",
}
# Published VTAB-1k accuracies (%) of ViT-B/16 pretrained on ImageNet-21k, printed beside the study's arms by the
# vtab table (a reference, never a target): method -> the study's arm it corresponds to ("LP": the linear probe;
# None: none), the published means ("mean": over the 19 tasks; "group_mean": the mean of the Natural, Specialized
# and Structured means; a (low, high) pair is a range over several reports) and their source.
VTAB_REFERENCES = {
    "full finetuning": {"arm": "all", "mean": 65.6, "group_mean": 69.0,
                        "source": "Jia et al. 2022, Visual Prompt Tuning (ECCV), Table 1"},
    "linear probing": {"arm": "LP", "group_mean": 57.6,
                       "source": "Jia et al. 2022, Visual Prompt Tuning (ECCV), Table 1"},
    "LoRA": {"arm": None, "group_mean": (73.0, 75.0),
             "source": "range over published reports with tuned hyper-parameters, e.g. Mai et al. 2024 "
                       "(arXiv:2409.16434)"},
    "SPT-LoRA": {"arm": None, "group_mean": 76.4,
                 "source": "He et al. 2023, Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning (ICCV)"},
}
# The selection criteria (study-spec §8; `vitplasticity.criteria` measures them), in the order every table and
# figure lists them, each with the end of its scale that is chosen first: "higher" (the largest score first) or
# "lower" (the smallest first). A unit a criterion cannot score (NaN) comes after every unit it scores
# (`selection.oriented`).
CRITERIA = {
    "plasticity_embedding": "higher",
    "plasticity_hidden": "higher",
    "plasticity_scale_free": "higher",
    "relative_gradient_norm": "higher",
    "fisher": "higher",
    "fps": "higher",
    "kappatune": "lower",
    "trainable_params": "higher",
}
# Rules that compute on a GPU when there is one: each asks for a GPU (SLURM profile, local GPU slots)
# and its command takes a slot of its own (`vitplasticity.gpus`).
GPU_RULES = ("pretrain_checkpoint", "finetune", "measure_plasticity", "measure_criteria", "measure_trajectory",
             "linear_probe", "preflight")


def caption(kind: str, name: str) -> str:
    """The report caption of a table or figure (`kind` "table" or "figure"), relative to workflow/rules/."""
    return f"../report/{kind}_{name}.rst"


def lr_label(lr: float) -> str:
    """A learning rate as run folders and run names write it (`lr0.01_seed0`, `lr1e-05_seed0`): 6 significant
    digits, so two rates that differ only beyond them would name one folder (the config check refuses them)."""
    return f"{lr:g}"
