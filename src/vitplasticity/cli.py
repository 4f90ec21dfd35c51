"""Command line: one subcommand per workflow stage (`vitplasticity <stage> --help`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitplasticity.errors import UserError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", required=True, help="the job's settings as one JSON object")
    parser.add_argument("--runtime", default="{}", help="machine settings as JSON (device, micro_batch, eval_batch)")
    parser.add_argument("--tracking", default='{"enabled": false}', help="MLflow settings as JSON")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitplasticity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="generate or download a task into the prepared format")
    p.add_argument("--settings", required=True, help="the task's data config as JSON, plus 'name'")
    p.add_argument("--out", type=Path, required=True, help="prepared folder to create")
    p.add_argument("--raw", type=Path, required=True, help="download/extraction folder")

    p = sub.add_parser("pretrain", help="pretrain a small ViT on a synthetic source task")
    _common(p)
    p.add_argument("--task", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint .safetensors to write")
    p.add_argument("--run-dir", type=Path, required=True)

    p = sub.add_parser("fetch", help="download pretrained weights through timm / the hub")
    p.add_argument("--settings", required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("plasticity", help="measure per-component plasticity")
    _common(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--reference", type=Path, required=True, help="prepared pretraining-distribution task")
    p.add_argument("--task", type=Path, required=True)
    p.add_argument("--out-table", type=Path, required=True)
    p.add_argument("--out-stats", type=Path, required=True)

    p = sub.add_parser("bounds", help="theoretical per-component bounds")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True, help="embedding statistics from `plasticity`")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("finetune", help="one finetuning run (resumes from RUN_DIR/state.pt)")
    _common(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--task", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)

    p = sub.add_parser("probe", help="linear-probing baseline")
    _common(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--task", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("aggregate", help="tables and statistics of one experiment")
    p.add_argument("--settings", required=True)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="metrics.json of every run")
    p.add_argument("--probes", type=Path, nargs="*", default=[])
    p.add_argument("--plasticity", type=Path, nargs="*", default=[])
    p.add_argument("--bounds", type=Path, nargs="*", default=[])
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("compare-paper", help="the reproduction beside the authors' main table")
    p.add_argument("--tables", type=Path, required=True)
    p.add_argument("--probes", type=Path, nargs="*", default=[])
    p.add_argument("--out-table", type=Path, required=True)
    p.add_argument("--out-figure", type=Path, required=True)

    p = sub.add_parser("figures", help="figures of one experiment from its tables")
    p.add_argument("--tables", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    return parser


def run(args: argparse.Namespace) -> None:
    from vitplasticity import jobs
    from vitplasticity.runtime import set_threads

    set_threads(getattr(args, "threads", None))
    settings = jobs.load_settings(getattr(args, "settings", "{}"))
    runtime = jobs.load_settings(getattr(args, "runtime", "{}"))
    track = jobs.load_settings(getattr(args, "tracking", '{"enabled": false}'))
    if args.command == "prepare":
        jobs.prepare(settings["name"], settings["data"], args.out, args.raw)
    elif args.command == "pretrain":
        metrics = jobs.pretrain(settings, runtime, args.task, args.out, args.run_dir, track)
        jobs.log(f"pretrained: source test accuracy {metrics['source_test_acc']:.4f}")
    elif args.command == "fetch":
        jobs.fetch(settings, args.out)
    elif args.command == "plasticity":
        jobs.measure_plasticity(settings, runtime, args.checkpoint, args.reference, args.task,
                                args.out_table, args.out_stats, track)
    elif args.command == "bounds":
        jobs.compute_bounds(args.checkpoint, args.stats, args.out)
    elif args.command == "finetune":
        metrics = jobs.finetune(settings, runtime, args.task, args.checkpoint, args.run_dir, track)
        jobs.log(f"finetune {metrics['status']}: test accuracy {metrics['test_acc']}")
    elif args.command == "probe":
        metrics = jobs.linear_probe(settings, runtime, args.checkpoint, args.task, args.out, track)
        jobs.log(f"linear probe: test accuracy {metrics['test_acc']:.4f}")
    elif args.command == "aggregate":
        from vitplasticity.aggregate import aggregate

        aggregate(settings, args.runs, args.probes, args.plasticity, args.bounds, args.out_dir)
    elif args.command == "figures":
        from vitplasticity.figures import make_figures

        make_figures(args.tables, args.out_dir)
    elif args.command == "compare-paper":
        from vitplasticity.paper import write_comparison

        write_comparison(args.tables, args.probes, args.out_table, args.out_figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"vitplasticity {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
