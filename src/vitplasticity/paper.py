"""The reproduction beside the authors' main table (shipped as data with its source).

A cell is "within spread" when |reproduced − paper| ≤ reproduced std + paper std (the two
seed spreads added); the probe has no published std, so only its difference is given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from vitplasticity.fileio import atomic_path, read_json, write_csv, write_text  # noqa: E402

PAPER_TABLE = "paper_main_table.csv"


def paper_table() -> pd.DataFrame:
    with resources.files("vitplasticity.data").joinpath(PAPER_TABLE).open() as handle:
        return pd.read_csv(handle, comment="#")


def compare(main_table: pd.DataFrame, probes: dict[str, float]) -> pd.DataFrame:
    """One row per (task, arm) in both tables: both values, difference, within spread."""
    ours = main_table[["task", "arm", "mean", "std"]].copy()
    ours = pd.concat([ours, pd.DataFrame({"task": list(probes), "arm": "probe", "mean": list(probes.values()),
                                          "std": float("nan")})], ignore_index=True)
    both = ours.merge(paper_table(), on=["task", "arm"], suffixes=("", "_paper"))
    both["difference"] = both["mean"] - both["mean_paper"]
    spread = both["std"] + both["std_paper"]
    both["within_spread"] = (both["difference"].abs() <= spread).where(spread.notna())
    return both.rename(columns={"mean": "reproduced", "std": "reproduced_std", "mean_paper": "paper",
                                "std_paper": "paper_std"})


def _figure(table: pd.DataFrame, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for arm, part in table.groupby("arm"):
        ax.errorbar(part["paper"], part["reproduced"], xerr=part["paper_std"], yerr=part["reproduced_std"],
                    fmt="o", ms=4, label=arm)
    low, high = table[["paper", "reproduced"]].min().min() - 2, 100
    ax.plot([low, high], [low, high], color="gray", lw=1, ls="--", label="equal")
    ax.set_xlabel("paper test accuracy (%)")
    ax.set_ylabel("reproduced test accuracy (%)")
    ax.set_title("Reproduction vs Odonnat et al. (2026), per task × arm")
    ax.legend(fontsize=7)
    for suffix in ("png", "pdf"):
        with atomic_path(out.with_suffix(f".{suffix}")) as tmp:
            fig.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
    plt.close(fig)


def write_comparison(tables_dir: Path, probe_files: list[Path], out_table: Path, out_figure: Path) -> pd.DataFrame:
    probes = {read_json(p)["task"]: 100.0 * read_json(p)["test_acc"] for p in probe_files}
    table = compare(pd.read_csv(Path(tables_dir) / "main_table.csv"), probes)
    write_csv(out_table, table)
    lines = ["| task | arm | reproduced | paper | difference | within spread |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        within = "—" if pd.isna(row.within_spread) else ("yes" if row.within_spread else "no")
        lines.append(f"| {row.task} | {row.arm} | {row.reproduced:.2f} ± {row.reproduced_std:.2f} | "
                     f"{row.paper:.2f} ± {row.paper_std:.2f} | {row.difference:+.2f} | {within} |")
    write_text(Path(out_table).with_suffix(".md"), "\n".join(lines) + "\n")
    _figure(table, Path(out_figure))
    return table
