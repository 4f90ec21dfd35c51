"""Tables and statistics over run folders (study-spec §6), on a hand-made results set.

3 tasks x 3 arms x 2 lrs x 2 seeds. Seed accuracies (percent) at lr 0.01 | 0.03, and what follows by hand:

    task arm   lr 0.01    lr 0.03    best lr  mean ± std (ddof 0)  lr gap
    t1   mha   90, 80     95, 70     0.01     85 ± 5               2.5   (0.03 holds the best single seed)
    t1   fc1   80, 80     84, 82     0.03     83 ± 1               3
    t1   ln1   70, 72     60, 64     0.01     71 ± 1               9
    t2   mha   60, 62     66, 70     0.03     68 ± 2               7
    t2   fc1   64, 66     50, 50     0.01     65 ± 1               15
    t2   ln1   55, 57     58, 58     0.03     58 ± 0               2
    t3   mha   40, 42     45, 47     0.03     46 ± 1               5
    t3   fc1   46, 48     30, 30     0.01     47 ± 1               17
    t3   ln1   36, 38     20, 24     0.01     37 ± 1               15

MHA − FC1 over tasks: (2, 3, −1); MHA − LN1: (14, 10, 9).
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from vitplasticity import aggregate as agg
from vitplasticity.errors import UserError

ACCURACY = {
    ("t1", "mha"): {0.01: (90, 80), 0.03: (95, 70)},
    ("t1", "fc1"): {0.01: (80, 80), 0.03: (84, 82)},
    ("t1", "ln1"): {0.01: (70, 72), 0.03: (60, 64)},
    ("t2", "mha"): {0.01: (60, 62), 0.03: (66, 70)},
    ("t2", "fc1"): {0.01: (64, 66), 0.03: (50, 50)},
    ("t2", "ln1"): {0.01: (55, 57), 0.03: (58, 58)},
    ("t3", "mha"): {0.01: (40, 42), 0.03: (45, 47)},
    ("t3", "fc1"): {0.01: (46, 48), 0.03: (30, 30)},
    ("t3", "ln1"): {0.01: (36, 38), 0.03: (20, 24)},
}
BEST = {
    ("t1", "mha"): (0.01, 85, 5), ("t1", "fc1"): (0.03, 83, 1), ("t1", "ln1"): (0.01, 71, 1),
    ("t2", "mha"): (0.03, 68, 2), ("t2", "fc1"): (0.01, 65, 1), ("t2", "ln1"): (0.03, 58, 0),
    ("t3", "mha"): (0.03, 46, 1), ("t3", "fc1"): (0.01, 47, 1), ("t3", "ln1"): (0.01, 37, 1),
}
GAP = {
    ("t1", "mha"): 2.5, ("t1", "fc1"): 3, ("t1", "ln1"): 9, ("t2", "mha"): 7, ("t2", "fc1"): 15,
    ("t2", "ln1"): 2, ("t3", "mha"): 5, ("t3", "fc1"): 17, ("t3", "ln1"): 15,
}
PROBES = {"t1": 50.0, "t2": 40.0, "t3": 20.0}
ARMS = ["mha", "fc1", "ln1"]


def _write_runs(root, diverged=()):
    """One folder per run, as the finetune rule writes it; `diverged` lists (task, arm, lr, seed)."""
    files = []
    for (task, arm), grid in ACCURACY.items():
        for lr, accs in grid.items():
            for seed, acc in zip((0, 1), accs, strict=True):
                run = root / f"{task}-{arm}-{lr}-{seed}"
                run.mkdir(parents=True)
                settings = {"model": "vit", "task": task, "optimizer": "sgd", "arm": arm, "lr": lr, "seed": seed}
                (run / "config.yaml").write_text(yaml.safe_dump({"settings": settings, "train": {"steps": 10}}))
                if (task, arm, lr, seed) in diverged:
                    metrics = {"status": "diverged", "test_acc": None, "test_loss": None, "best_val_acc": 0.1,
                               "best_step": 5, "diverged_step": 7}
                else:
                    metrics = {"status": "completed", "test_acc": acc / 100, "test_loss": 0.5,
                               "best_val_acc": acc / 100 + 0.01, "best_step": 10, "diverged_step": None,
                               "trainable_params": 1000, "wall_time_s": 1.5}
                (run / "metrics.json").write_text(json.dumps(metrics))
                files.append(run / "metrics.json")
    return files


def _probe_files(root):
    files = []
    for task, acc in PROBES.items():
        path = root / "probes" / f"{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task, "test_acc": acc / 100, "train_acc": 1.0}))
        files.append(path)
    return files


def _row(frame, task, arm):
    row = frame[(frame["task"] == task) & (frame["arm"] == arm)]
    assert len(row) == 1
    return row.iloc[0]


@pytest.fixture()
def runs(tmp_path):
    return agg.load_runs(_write_runs(tmp_path / "runs"))


def test_load_runs_reads_settings_and_metrics_in_percent(runs):
    assert len(runs) == 36
    one = runs[(runs["task"] == "t1") & (runs["arm"] == "mha") & (runs["lr"] == 0.03) & (runs["seed"] == 0)].iloc[0]
    assert one["test_acc"] == pytest.approx(95.0)
    assert one["best_val_acc"] == pytest.approx(96.0)
    assert (one["status"], one["model"], one["optimizer"]) == ("completed", "vit", "sgd")


def test_main_table_picks_best_lr_by_seed_mean_with_population_std(runs):
    table = agg.main_table(runs)
    assert len(table) == 9
    for (task, arm), (lr, mean, std) in BEST.items():
        row = _row(table, task, arm)
        assert row["best_lr"] == lr, (task, arm)
        assert row["mean"] == pytest.approx(mean)
        assert row["std"] == pytest.approx(std, abs=1e-9)
        assert (row["n_seeds"], row["diverged_runs"]) == (2, 0)


def test_seed_means_per_lr(runs):
    means = agg.seed_means(runs)
    assert len(means) == 18
    row = means[(means["task"] == "t1") & (means["arm"] == "mha") & (means["lr"] == 0.03)].iloc[0]
    assert row["mean"] == pytest.approx(82.5) and row["std"] == pytest.approx(12.5)  # ddof=1 would give 17.68


def test_relative_gain_over_linear_probe(runs):
    gains = agg.relative_gain(agg.main_table(runs), PROBES)
    assert _row(gains, "t1", "mha")["gain_pct"] == pytest.approx(100 * (85 - 50) / 50)
    assert _row(gains, "t2", "mha")["gain_pct"] == pytest.approx(70.0)
    assert _row(gains, "t3", "ln1")["gain_pct"] == pytest.approx(100 * (37 - 20) / 20)
    assert _row(gains, "t3", "ln1")["probe_acc"] == 20.0


def test_lr_gap_is_max_minus_min_of_seed_means(runs):
    gaps = agg.lr_gap(runs)
    assert len(gaps) == 9
    for (task, arm), gap in GAP.items():
        assert _row(gaps, task, arm)["lr_gap"] == pytest.approx(gap), (task, arm)


def test_paired_tests_by_hand_and_against_scipy(runs):
    table = agg.main_table(runs)
    assert agg.test_pairs(ARMS) == [("mha", "fc1"), ("mha", "ln1")]
    tests = agg.paired_tests(table, agg.test_pairs(ARMS)).set_index("versus")

    # MHA − FC1 = (2, 3, −1): mean 4/3, sd sqrt(13/3), t = mean sqrt(3) / sd; with 2 degrees of freedom
    # the two-sided p is 1 − |t| / sqrt(t² + 2).
    t = (4 / 3) * math.sqrt(3) / math.sqrt(13 / 3)
    fc1 = tests.loc["fc1"]
    assert fc1["n_tasks"] == 3 and fc1["mean_diff"] == pytest.approx(4 / 3)
    assert fc1["t_stat"] == pytest.approx(t)
    assert fc1["t_pvalue"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    # Signed ranks: +2, +3, −1 → W+ = 5; of the 8 sign patterns, W+ ≥ 5 in 2 (5 and 6): p = 0.25.
    assert fc1["wilcoxon_stat"] == 5.0 and fc1["wilcoxon_pvalue"] == pytest.approx(0.25)

    # MHA − LN1 = (14, 10, 9): all positive, so W+ = 6 and p = 1/8.
    ln1 = tests.loc["ln1"]
    t = 11 * math.sqrt(3) / math.sqrt(7)
    assert ln1["t_stat"] == pytest.approx(t)
    assert ln1["t_pvalue"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert ln1["wilcoxon_stat"] == 6.0 and ln1["wilcoxon_pvalue"] == pytest.approx(0.125)

    mha, other = [85, 68, 46], [71, 58, 37]
    assert ln1["t_pvalue"] == pytest.approx(stats.ttest_rel(mha, other).pvalue)
    assert ln1["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(mha, other, alternative="greater").pvalue)


def test_paired_tests_with_identical_arms_give_nan_not_errors():
    table = pd.DataFrame({"task": ["a", "b", "a", "b"], "arm": ["mha", "mha", "ln1", "ln1"],
                          "mean": [1.0, 2.0, 1.0, 2.0]})
    row = agg.paired_tests(table, [("mha", "ln1"), ("mha", "absent")]).iloc[0]
    assert row["mean_diff"] == 0 and math.isnan(row["t_pvalue"]) and math.isnan(row["wilcoxon_pvalue"])
    assert len(agg.paired_tests(table, [("mha", "absent")])) == 0


def test_test_pairs_adds_groups_and_full_finetuning():
    pairs = agg.test_pairs(["all", "mha", "ln2", "smooth", "non_smooth", "emb"])
    assert pairs == [("mha", "all"), ("mha", "ln2"), ("mha", "emb"), ("non_smooth", "smooth")]


def test_diverged_seed_makes_its_lr_ineligible(tmp_path):
    runs = agg.load_runs(_write_runs(tmp_path, diverged={("t1", "mha", 0.01, 1)}))
    assert math.isnan(runs[runs["status"] == "diverged"]["test_acc"].iloc[0])
    row = _row(agg.main_table(runs), "t1", "mha")
    assert row["best_lr"] == 0.03  # 0.01 had the better mean, but one of its seeds diverged
    assert row["mean"] == pytest.approx(82.5) and row["std"] == pytest.approx(12.5)
    assert row["diverged_runs"] == 1
    means = agg.seed_means(runs)
    bad = means[(means["task"] == "t1") & (means["arm"] == "mha") & (means["lr"] == 0.01)].iloc[0]
    assert math.isnan(bad["mean"]) and bad["diverged"] == 1 and bad["n_seeds"] == 1


def test_all_lrs_diverged_gives_an_empty_cell(tmp_path):
    runs = agg.load_runs(_write_runs(tmp_path, diverged={("t2", "ln1", 0.01, 0), ("t2", "ln1", 0.03, 1)}))
    row = _row(agg.main_table(runs), "t2", "ln1")
    assert math.isnan(row["mean"]) and math.isnan(row["best_lr"])
    assert (row["n_seeds"], row["diverged_runs"]) == (0, 2)


def test_aggregate_writes_every_table(tmp_path):
    out = tmp_path / "tables"
    tables = agg.aggregate(["all", *ARMS], _write_runs(tmp_path / "runs"), _probe_files(tmp_path),
                           [], [], out)
    for name in ("main_table", "relative_gain", "lr_gap", "stat_tests", "plasticity_rank", "runs"):
        assert (out / f"{name}.csv").exists(), name
    main = pd.read_csv(out / "main_table.csv")
    assert len(main) == 9 and _row(main, "t1", "mha")["best_lr"] == 0.01
    assert len(pd.read_csv(out / "runs.csv")) == 36
    assert (out / "vtab.md").read_text() == "No VTAB-1k task in this experiment.\n"
    assert set(tables) >= {"main_table", "relative_gain", "lr_gap", "stat_tests"}

    markdown = (out / "main_table.md").read_text().splitlines()
    assert markdown[0] == "| task | MHA (%) | FC1 (%) | LN1 (%) | LP (%) |"  # 'all' has no runs, so no column
    assert "| t1 | 85.00 ± 5.00 | 83.00 ± 1.00 | 71.00 ± 1.00 | 50.00 |" in markdown
    assert "| t2 | 68.00 ± 2.00 | 65.00 ± 1.00 | 58.00 ± 0.00 | 40.00 |" in markdown
    # Average over tasks: (85 + 68 + 46) / 3, (83 + 65 + 47) / 3, (71 + 58 + 37) / 3; LP (50 + 40 + 20) / 3.
    assert markdown[-1] == "| Average | 66.33 | 65.00 | 55.33 | 36.67 |"

    gain = (out / "relative_gain.md").read_text()
    assert "| t1 | 70.00 | 66.00 | 42.00 |" in gain  # (85−50)/50, (83−50)/50, (71−50)/50 in percent
    gap = (out / "lr_gap.md").read_text().splitlines()
    assert "| t3 | 5.00 | 17.00 | 15.00 |" in gap
    assert gap[-1] == "| Average | 4.83 | 11.67 | 8.67 |"
    tests_md = (out / "stat_tests.md").read_text()
    assert tests_md.splitlines()[0] == ("| arm | versus | tasks | mean difference (points) "
                                        "| paired t-test p (two-sided) | Wilcoxon p (one-sided: arm > versus) |")
    assert "| MHA | FC1 | 3 | 1.33 |" in tests_md and "| 0.125 |" in tests_md
    stat = pd.read_csv(out / "stat_tests.csv")
    assert set(stat["t_alternative"]) == {"two-sided"} and set(stat["wilcoxon_alternative"]) == {"greater"}
    # Best − worst arm per task over the mean seed std: t1 (85 − 71) / mean(5, 1, 1) = 14 / (7/3) = 6.
    separation = (out / "separation.md").read_text().splitlines()
    assert separation[0] == ("| task | best arm | best (%) | worst arm | worst (%) | gap (points) "
                             "| mean seed std (points) | gap / std (ratio) |")
    assert "| t1 | MHA | 85.00 | LN1 | 71.00 | 14.00 | 2.33 | 6.00 |" in separation
    assert "| t2 | MHA | 68.00 | LN1 | 58.00 | 10.00 | 1.00 | 10.00 |" in separation
    # Every table also as HTML for the workflow report, with the cells the Markdown shows.
    html = " ".join((out / "main_table.html").read_text().split())
    assert "<th>task</th> <th>MHA (%)</th> <th>FC1 (%)</th> <th>LN1 (%)</th> <th>LP (%)</th>" in html
    assert "<td>t1</td> <td>85.00 ± 5.00</td> <td>83.00 ± 1.00</td> <td>71.00 ± 1.00</td> <td>50.00</td>" in html
    for name in ("relative_gain", "lr_gap", "stat_tests", "separation", "plasticity_rank", "plasticity", "bounds",
                 "runs"):
        assert (out / f"{name}.html").read_text().strip(), name


def test_tables_are_rounded_at_write(tmp_path):
    """No binary float artefacts in any CSV (38.800000000000004 is written 38.8); ranks are integers."""
    files = _write_runs(tmp_path / "runs")
    settings = yaml.safe_load((files[0].parent / "config.yaml").read_text())
    metrics = json.loads(files[0].read_text()) | {"test_acc": 0.38800000000000004}
    files[0].write_text(json.dumps(metrics))
    plasticity = tmp_path / "plasticity.csv"
    pd.DataFrame({"mode": ["embedding"] * 3, "component": ["mha", "fc1", "ln1"], "layer": [0, 0, 0],
                  "mean": [0.1 + 0.2, 0.7, 0.5]}).to_csv(plasticity, index=False)
    out = tmp_path / "tables"
    agg.aggregate(ARMS, files, _probe_files(tmp_path), [plasticity], [], out)
    assert settings["settings"]["seed"] == 0
    runs_text = (out / "runs.csv").read_text()
    assert ",38.8," in runs_text and "38.800000000000004" not in runs_text
    for path in out.glob("*.csv"):
        for cell in path.read_text().replace("\n", ",").split(","):
            significant = cell.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
            assert not (significant.isdigit() and len(significant) > 10), (path.name, cell)
    assert "0.3," in (out / "plasticity_rank.csv").read_text()  # 0.1 + 0.2 = 0.30000000000000004 in binary
    ranks = pd.read_csv(out / "plasticity_rank.csv")
    assert ranks["plasticity_rank"].tolist() == [3, 1, 2] and ranks["finetune_rank"].dtype.kind == "i"
    rank_md = (out / "plasticity_rank.md").read_text()
    assert "| embedding | MHA | 0.3 | 3 | 1 |" in rank_md


def test_markdown_marks_a_fully_diverged_cell(tmp_path):
    files = _write_runs(tmp_path / "runs", diverged={("t2", "ln1", 0.01, 0), ("t2", "ln1", 0.03, 1)})
    agg.aggregate(ARMS, files, [], [], [], tmp_path / "out")
    markdown = (tmp_path / "out" / "main_table.md").read_text().splitlines()
    assert "| t2 | 68.00 ± 2.00 | 65.00 ± 1.00 | diverged |" in markdown
    assert markdown[-1] == "| Average | 66.33 | 65.00 | — |"
    assert markdown[0] == "| task | MHA (%) | FC1 (%) | LN1 (%) |"  # no probes, no LP column


def test_plasticity_rank_beside_finetuning_rank(runs):
    plasticity = pd.DataFrame({
        "mode": ["embedding"] * 6, "component": ["mha", "mha", "fc1", "fc1", "ln1", "ln1"],
        "layer": [0, 1] * 3, "mean": [0.2, 0.4, 1.0, 2.0, 3.0, 5.0],
    })
    ranks = agg.plasticity_rank(plasticity, agg.main_table(runs)).set_index("component")
    assert ranks.loc["mha", "plasticity"] == pytest.approx(0.3)
    assert list(ranks.index) == ["mha", "fc1", "ln1"]  # ordered by theoretical rank 1, 2, 5
    assert ranks.loc["ln1", "plasticity_rank"] == 1 and ranks.loc["mha", "plasticity_rank"] == 3
    assert ranks.loc["mha", "theoretical_rank"] == 1 and ranks.loc["ln1", "theoretical_rank"] == 5
    assert ranks.loc["mha", "finetune_acc"] == pytest.approx((85 + 68 + 46) / 3)
    assert ranks.loc["mha", "finetune_rank"] == 1 and ranks.loc["ln1", "finetune_rank"] == 3
    assert agg.plasticity_rank(pd.DataFrame(), agg.main_table(runs)).empty


def test_no_runs_is_a_user_error():
    with pytest.raises(UserError, match="no finetuning runs to aggregate"):
        agg.load_runs([])


def test_std_uses_ddof_zero_on_three_seeds():
    runs = pd.DataFrame({"task": ["t"] * 3, "arm": ["mha"] * 3, "lr": [0.1] * 3, "test_acc": [1.0, 2.0, 6.0],
                         "status": ["completed"] * 3})
    row = agg.main_table(runs).iloc[0]
    assert row["mean"] == 3.0 and row["std"] == pytest.approx(np.std([1, 2, 6]))


def test_arms_keep_the_config_order_given_beside_sorted_settings(tmp_path):
    """The workflow's settings JSON sorts the arms mapping; `arm_order` carries the config's order."""
    tables = agg.aggregate(["mha", "ln1", "fc1"], _write_runs(tmp_path / "runs"), _probe_files(tmp_path), [], [],
                           tmp_path / "out")
    assert (tmp_path / "out" / "main_table.md").read_text().splitlines()[0] == (
        "| task | MHA (%) | LN1 (%) | FC1 (%) | LP (%) |")
    assert tables["main_table"]["arm"].tolist()[:3] == ["mha", "ln1", "fc1"]
    assert list(dict.fromkeys(tables["lr_gap"]["arm"])) == ["mha", "ln1", "fc1"]


def test_best_lr_is_the_best_seed_mean_even_when_its_worst_seed_is_worse():
    """lr 0.1: seeds 90, 60 (mean 75, worst 60); lr 0.01: 70, 70 (mean 70, worst 70). The seed mean picks 0.1."""
    runs = pd.DataFrame({
        "task": ["t"] * 4, "arm": ["mha"] * 4, "lr": [0.1, 0.1, 0.01, 0.01], "seed": [0, 1, 0, 1],
        "status": ["completed"] * 4, "test_acc": [90.0, 60.0, 70.0, 70.0]})
    row = _row(agg.main_table(runs), "t", "mha")
    assert (row["best_lr"], row["mean"], row["std"], row["n_seeds"]) == (0.1, 75.0, 15.0, 2)


def test_criteria_table_shows_each_direction_and_the_cost_it_shares():
    accuracy = {"mha": 92.0, "fc1": 91.0, "fc2": 88.0, "ln2": 85.0, "ln1": 84.0}
    runs = pd.DataFrame([{"task": "T", "arm": arm, "lr": 0.01, "seed": seed, "test_acc": acc}
                         for arm, acc in accuracy.items() for seed in (0, 1)])
    kappa = {"mha": 2.0, "fc1": 1.0, "fc2": 3.0, "ln2": math.nan, "ln1": math.nan}  # fc1 best conditioned
    criteria = pd.DataFrame([{"task": "T", "criterion": name, "component": c, "layer": 0, "value": value}
                             for name, scores in (("kappatune", kappa), ("fisher", accuracy))
                             for c, value in scores.items()])
    costs = pd.DataFrame([{"task": "T", "criterion": "kappatune", "wall_s": 2.0, "peak_mib": 5.0,
                           "measured_with": "kappatune"},
                          {"task": "T", "criterion": "fisher", "wall_s": 3.0, "peak_mib": 7.0,
                           "measured_with": "relative_gradient_norm+fisher"}])
    table = agg.criteria_table(criteria, costs, runs)
    shown = agg._criteria_view(table)
    view, task = shown.loc["Average"].set_index("criterion"), shown.loc["T"].set_index("criterion")
    assert view.loc["kappatune", "chosen first"] == "lower score"
    assert view.loc["fisher", "chosen first"] == "higher score"
    assert task.loc["kappatune", "first choice"] == "fc1"  # the lowest rank, never a LayerNorm
    assert task.loc["fisher", "first choice"] == "mha"
    assert view.loc["fisher", "cost shared with"] == "relative_gradient_norm"
    assert view.loc["kappatune", "cost shared with"] == "—" and view.loc["random", "chosen first"] == "—"
    assert view.loc["fisher", "wall time (s)"] == 3.0
