"""The tables' HTML pages, which `snakemake --report` shows inline: one header cell per column (no column
named after pandas' axis), every row as wide as the header, and cells that do not wrap."""

import json
from html.parser import HTMLParser

import pytest
import yaml

from vitplasticity import aggregate

# Test accuracy per (task, arm, seed); one lr. Means: t1 MHA 85, LN1 70; t2 MHA 75, LN1 60.
ACCURACY = {("t1", "mha", 0): 0.84, ("t1", "mha", 1): 0.86, ("t1", "ln1", 0): 0.70, ("t1", "ln1", 1): 0.70,
            ("t2", "mha", 0): 0.75, ("t2", "mha", 1): 0.75, ("t2", "ln1", 0): 0.59, ("t2", "ln1", 1): 0.61}


class Rows(HTMLParser):
    """The text of every header and body cell, row by row: [(tag, text), ...] per row."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.style = [], None, ""
        self.in_style = False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = [tag, ""]
        elif tag == "style":
            self.in_style = True

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.rows[-1].append(tuple(self.cell))
            self.cell = None
        elif tag == "style":
            self.in_style = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data
        elif self.in_style:
            self.style += data


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    runs = []
    for (task, arm, seed), acc in ACCURACY.items():
        folder = root / "runs" / task / arm / f"seed{seed}"
        folder.mkdir(parents=True)
        settings = {"model": "vit", "task": task, "optimizer": "sgd", "arm": arm, "lr": 0.01, "seed": seed}
        (folder / "config.yaml").write_text(yaml.safe_dump({"settings": settings}))
        (folder / "metrics.json").write_text(json.dumps({"status": "completed", "test_acc": acc}))
        runs.append(folder / "metrics.json")
    probes = []
    for task, acc in (("t1", 0.5), ("t2", 0.4)):
        probes.append(root / f"probe_{task}.json")
        probes[-1].write_text(json.dumps({"task": task, "test_acc": acc}))
    out = root / "out"
    aggregate.aggregate(["mha", "ln1"], runs, probes, [], [], out)
    return out


def parsed(tables, name) -> Rows:
    rows = Rows()
    rows.feed((tables / f"{name}.html").read_text())
    return rows


@pytest.mark.parametrize(("name", "header", "first_row"), [
    ("main_table", ["task", "MHA (%)", "LN1 (%)", "LP (%)"], ["t1", "85.00 ± 1.00", "70.00 ± 0.00", "50.00"]),
    ("lr_gap", ["task", "MHA (points)", "LN1 (points)"], ["t1", "0.00", "0.00"]),
    ("relative_gain", ["task", "MHA (%)", "LN1 (%)"], ["t1", "70.00", "40.00"]),
])
def test_a_pivoted_table_has_no_phantom_column(tables, name, header, first_row):
    rows = parsed(tables, name).rows
    assert [text for _, text in rows[0]] == header
    assert all(tag == "th" for tag, _ in rows[0])
    assert [text for _, text in rows[1]] == first_row
    assert all(tag == "td" for row in rows[1:] for tag, _ in row)  # no row-name cells beside the task column
    assert {len(row) for row in rows} == {len(header)}
    assert [text for _, text in rows[-1]][0] == "Average"


def test_cells_do_not_wrap(tables):
    style = parsed(tables, "main_table").style
    assert "white-space: nowrap" in style
    assert "th, td {" in style
