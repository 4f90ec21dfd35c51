"""Inputs of the VTAB-1k rehearsal: config/vtab.yaml plus config/vtab-rehearsal.yaml, every job kind, on CPU.

The overlay points inside the study folder (``rehearsal/``), where this module makes:

- ``vtab-1k/``: the processed VTAB-1k layout of all 19 tasks with their real class counts
  (`vtab_fixture.make_vtab`);
- ``imagenet_val.tar`` and ``hub/``: the ImageNet val tar of class folders and the hub cache of random
  weights of the paper rehearsal (`rehearsal.imagenet_val`, `rehearsal.build_hub_cache`).

Run it::

    python tests/vtab_rehearsal.py STUDY_DIR           # build, run snakemake
    python tests/vtab_rehearsal.py STUDY_DIR -- -n     # after --: extra snakemake arguments
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rehearsal import FOLDER, ROOT, build_hub_cache, environment, imagenet_val, merged_config
from vtab_fixture import make_vtab

from vitplasticity.datasets.vtab1k import TASKS

VTAB_CONFIG = ROOT / "config" / "vtab.yaml"
OVERLAY = ROOT / "config" / "vtab-rehearsal.yaml"


def config() -> dict:
    """config/vtab.yaml with the overlay merged in, as Snakemake merges them."""
    return merged_config([OVERLAY], base=VTAB_CONFIG)


def build(study: Path) -> Path:
    """Write the VTAB-1k copy, the ImageNet val tar and the hub cache under study/rehearsal; returns that folder."""
    folder = Path(study) / FOLDER
    make_vtab(folder / "vtab-1k", tuple(TASKS))
    (folder / "imagenet_val.tar").write_bytes(imagenet_val())
    build_hub_cache(folder / "hub", config())
    return folder


def command(study: Path, *args: str) -> list[str]:
    """The snakemake command of the rehearsal in `study`, with `args` appended."""
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(study),
            "--configfile", str(VTAB_CONFIG), str(OVERLAY), *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study folder (snakemake --directory)")
    parser.add_argument("snakemake_args", nargs="*", help="after --: extra snakemake arguments")
    args = parser.parse_args()
    args.study.mkdir(parents=True, exist_ok=True)
    build(args.study)
    return subprocess.run(command(args.study, "--cores", "all", *args.snakemake_args),
                          env=environment(args.study)).returncode


if __name__ == "__main__":
    sys.exit(main())
