"""Command line: one subcommand per workflow stage (`vitplasticity <stage> --help`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitplasticity.errors import UserError, redact
from vitplasticity.machine import MACHINE_ENV, machine_from_env
from vitplasticity.registry import CRITERIA


def _model_job(parser: argparse.ArgumentParser, checkpoint: bool = True, tasks: bool = False) -> None:
    """A job that runs a model on a prepared task (with `tasks`, on several; with `checkpoint`, from a
    checkpoint): it takes a GPU slot of its own (`vitplasticity.gpus`; these are the commands of
    `registry.GPU_RULES`) and may set its CPU threads."""
    parser.add_argument("--settings", required=True, help="the job's settings as one JSON object")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    if checkpoint:
        parser.add_argument("--checkpoint", type=Path, required=True)
    if tasks:
        parser.add_argument("--task", type=Path, nargs="+", required=True,
                            help="prepared folder of each task of the settings' tasks, in order")
    else:
        parser.add_argument("--task", type=Path, required=True, help="prepared task folder")
    parser.set_defaults(gpu=True)


def _output(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """A path the command writes: checked creatable before any work, so a bad one fails at once."""
    dest = parser.add_argument(flag, type=Path, **kwargs).dest
    parser.set_defaults(outputs=(*(parser.get_default("outputs") or ()), dest))


class _Subcommands(argparse._SubParsersAction):
    """Subcommands that run `func`: a workflow job's as `func(args, settings, runtime, on_eval)` once its
    --settings are checked, or with `job=False` as `func(args)`. A job whose `record(args)` names its run
    folder writes its record there (`records`); with live tracking and `live` its MLflow run, whose
    params are the job's settings, is open while it runs (`tracking.live`; `on_eval` logs the training
    curves). A job's --help ends with its --settings keys, generated from the config schema."""

    def add_parser(self, name: str, func=None, job: bool = True, record=None, live: bool = True,
                   **kwargs) -> argparse.ArgumentParser:
        from vitplasticity.settings import help_text

        epilog = help_text(name)
        if epilog:
            kwargs.update(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser = super().add_parser(name, **kwargs)
        parser.set_defaults(func=func, job=job, record=record, live=live and record is not None, gpu=False,
                            outputs=())
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitplasticity", description=__doc__)
    parser.register("action", "parsers", _Subcommands)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", _prepare, help="generate or download a task into the prepared format")
    p.add_argument("--settings", required=True, help="the task's data config as JSON, plus 'name'")
    _output(p, "--out", required=True, help="prepared folder to create")
    _output(p, "--raw", default=None,
            help="download/extraction folder (needed by downloaded sources only, not by synthetic, "
                 "imagefolder or imagenet_val)")

    p = sub.add_parser("pretrain", _pretrain, record=lambda args: args.run_dir,
                       help="pretrain a small ViT on a synthetic source task")
    _model_job(p, checkpoint=False)
    _output(p, "--out", required=True, help="checkpoint .safetensors to write")
    _output(p, "--run-dir", required=True)

    p = sub.add_parser("fetch", _fetch,
                       help="pretrained weights from the hub (cache first) or a local file, as a checkpoint")
    p.add_argument("--settings", required=True)
    _output(p, "--out", required=True)

    p = sub.add_parser("plasticity", _plasticity, record=lambda args: args.out_table.parent,
                       help="measure per-component plasticity")
    _model_job(p)
    p.add_argument("--reference", type=Path, required=True, help="prepared pretraining-distribution task")
    _output(p, "--out-table", required=True)
    _output(p, "--out-stats", required=True)

    p = sub.add_parser("criteria", _criteria, record=lambda args: args.out_table.parent,
                       help="selection criteria side by side (plasticity modes, gradient norm, Fisher, FPS, "
                            "KappaTune, size)")
    _model_job(p)
    p.add_argument("--reference", type=Path, required=True, help="prepared pretraining-distribution task")
    _output(p, "--out-table", required=True, help="criteria.csv (cost.csv is written beside it)")

    p = sub.add_parser("trajectory", _trajectory, record=lambda args: args.out.parent,
                       help="plasticity (every mode) at the kept steps of a pretraining run, on several tasks")
    _model_job(p, checkpoint=False, tasks=True)
    p.add_argument("--checkpoints", type=Path, required=True,
                   help="the pretraining run's checkpoints/ folder (step_<N>.safetensors)")
    p.add_argument("--reference", type=Path, required=True, help="prepared pretraining-distribution task")
    _output(p, "--out", required=True, help="trajectory.csv to write")

    p = sub.add_parser("bounds", _bounds, help="theoretical per-component bounds")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True, help="embedding statistics from `plasticity`")
    _output(p, "--out", required=True)

    p = sub.add_parser("finetune", _finetune, record=lambda args: args.run_dir,
                       help="one finetuning run (resumes from RUN_DIR/state.pt)")
    _model_job(p)
    p.add_argument("--criteria", type=Path, nargs="?", default=None,
                   help="criteria.csv of this model and task: the scores a budget arm of a criterion selects by")
    _output(p, "--run-dir", required=True)

    p = sub.add_parser("probe", _probe, record=lambda args: args.out.parent, help="linear-probing baseline")
    _model_job(p)
    _output(p, "--out", required=True)

    p = sub.add_parser("preflight", _preflight,
                       help="a few real training steps and a plasticity batch of each model of a study: "
                            "fit, images/s, MFU and projected device-hours")
    p.add_argument("--settings", required=True, help="the validated study config as one JSON object")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory limit to check against (default: the device's memory)")
    _output(p, "--out", required=True, help="the results as JSON")
    p.set_defaults(gpu=True)

    # Tables and figures are mirrored from their records when the workflow ends (their jobs take seconds).
    p = sub.add_parser("aggregate", _aggregate, record=lambda args: args.out_dir, live=False,
                       help="tables and statistics of one experiment")
    p.add_argument("--settings", required=True)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="metrics.json of every run")
    p.add_argument("--probes", type=Path, nargs="*", default=[])
    p.add_argument("--plasticity", type=Path, nargs="*", default=[])
    p.add_argument("--bounds", type=Path, nargs="*", default=[])
    p.add_argument("--criteria", type=Path, nargs="*", default=[], help="criteria.csv of every (model, task)")
    p.add_argument("--trajectory", type=Path, nargs="*", default=[],
                   help="trajectory.csv of the experiment's model, when its pretraining keeps steps")
    _output(p, "--out-dir", required=True)

    p = sub.add_parser("compare-paper", _compare_paper, help="the reproduction beside the authors' main table")
    p.add_argument("--tables", type=Path, required=True)
    p.add_argument("--probes", type=Path, nargs="*", default=[])
    _output(p, "--out-table", required=True)
    _output(p, "--out-figure", required=True)

    p = sub.add_parser("tracking", _tracking, job=False, help="MLflow store: rebuild it from the run folders")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("rebuild", help="recreate the MLflow runs from the run folders")
    a.add_argument("--uri", default=None,
                   help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<abs>/results/mlflow.db)")
    a.add_argument("--experiment", required=True, help="experiment name (the study name)")
    a.add_argument("--results", type=Path, default=Path("results"), help="the study's results folder")

    p = sub.add_parser("recommend", _recommend, job=False,
                       help="which components to finetune: plasticity of a pretrained ViT on your images",
                       description="Rank the block components of a pretrained timm ViT by plasticity on your images "
                                   "and write a report folder: ranking, figure, parameters to unfreeze, a peft "
                                   "LoraConfig and a workflow config comparing the arms by finetuning.")
    p.add_argument("--model", required=True,
                   help="timm name with tag (vit_base_patch16_224.augreg_in21k; hub cache first), a weights file "
                        "(.safetensors, .pth, ...; give --arch), or a checkpoint written by fetch/pretrain")
    p.add_argument("--arch", default=None, help="timm architecture of a weights file, e.g. vit_base_patch16_224")
    p.add_argument("--arch-kwargs", default="{}",
                   help='timm.create_model keyword arguments of that architecture as JSON, e.g. \'{"img_size": 384}\'')
    p.add_argument("--data", type=Path, required=True,
                   help="your images: a folder, with class sub-folders (and train/val/test sub-folders) or flat")
    p.add_argument("--reference", type=Path, default=None,
                   help="images like the pretraining data (the paper: ImageNet val); without it pairs are two "
                        "different images of --data")
    p.add_argument("--pairs", type=int, default=2000, help="image pairs measured (default: 2000)")
    p.add_argument("--modes", default="embedding",
                   help="comma-separated: embedding (the paper's), hidden (each component's real input), "
                        "scale_free (embedding at unit token RMS); default: embedding")
    p.add_argument("--head", choices=("linear", "native"), default="linear",
                   help="head of the training artefacts: linear (default; replaces an attention-pool MAP head "
                        "by mean pooling + linear) or native (the architecture's own)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sampling and pairing (default: 0)")
    p.add_argument("--criterion", default=None,
                   help=f"the criterion whose first choice (with --budget: its units) the freeze list and peft config "
                        f"train: one of the study's "
                        f"({', '.join(CRITERIA)}); default: plasticity in the first of --modes")
    p.add_argument("--criteria", default=None, dest="others",
                   help=f"comma-separated criteria to measure beside plasticity (default: all of "
                        f"{','.join(name for name in CRITERIA if not name.startswith('plasticity_'))}); '' for "
                        "plasticity alone. On a CPU the gradient criteria cost the most (a ViT-B/16: minutes)")
    p.add_argument("--budget", type=float, default=None,
                   help="turn each criterion's ranking into the (component, layer) units it selects within a budget: "
                        "a fraction of the block parameters (e.g. 0.028) or a count of parameters (e.g. 2000000); "
                        "the freeze list and peft config then train --criterion's units")
    p.add_argument("--pilot", action="store_true",
                   help="with --budget: short finetuning runs on --data, scored on held-out images of it, of each "
                        "distinct selection, the linear probe and a random selection of the same budget")
    p.add_argument("--pilot-steps", type=int, default=None,
                   help="optimizer steps per pilot run (default: as many as fit --pilot-seconds; the report states it)")
    p.add_argument("--pilot-seconds", type=float, default=None,
                   help="seconds the pilot's training steps may take together, which sets its steps per run "
                        "(default: 120 on a CPU, 60 on a GPU; 5 to 100 steps on a CPU, 20 to 500 on a GPU)")
    p.add_argument("--pilot-images", type=int, default=None,
                   help="images of --data the pilot reads, a quarter held out (default: by device, as for the steps)")
    p.add_argument("--pilot-lr", type=float, default=None,
                   help="SGD learning rate of the pilot's runs (default: 0.01; short runs may need a larger one)")
    p.add_argument("--pilot-seeds", type=int, default=None,
                   help="seeds per pilot selection (default: 1 on a CPU, more on a GPU)")
    p.add_argument("--out", type=Path, required=True, help="report folder to write (replaced whole)")

    p = sub.add_parser("figures", _figures, record=lambda args: args.out_dir, live=False,
                       help="figures of one experiment from its tables")
    p.add_argument("--tables", type=Path, required=True)
    _output(p, "--out-dir", required=True)
    parser.epilog = (f"Machine settings (device, batch sizes, MLflow) come from the environment variable "
                     f"{MACHINE_ENV}, which the workflow sets from the study config; without it jobs use "
                     "the defaults and do not track.")
    return parser


def json_option(name: str, text: str) -> dict:
    """A JSON-object option (--settings) or a UserError naming it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--{name} is not valid JSON ({exc}); pass one JSON object, e.g. '{{\"lr\": 0.01}}'") from exc
    if not isinstance(value, dict):
        raise UserError(f"--{name} is a JSON {type(value).__name__}, not an object; pass one JSON object {{...}}")
    return value


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of the command can be created (nothing is created here)."""
    from vitplasticity.fileio import check_writable

    for name in args.outputs:
        path = getattr(args, name)
        if path is not None:
            check_writable(path, "--" + name.replace("_", "-"))


def run(args: argparse.Namespace) -> None:
    if not args.job:
        args.func(args)
        return
    from vitplasticity import settings as typed

    values = json_option("settings", getattr(args, "settings", "{}"))
    # Typed settings (`settings.build`); the preflight takes the validated study config whole.
    is_typed = args.command in typed.COMMANDS
    settings = typed.build(args.command, values) if is_typed else values
    machine = machine_from_env()
    check_outputs(args)
    if args.gpu:  # a model job: a GPU slot of its own (cuda:N names its own GPU), its CPU threads
        from vitplasticity.gpus import claim_gpu
        from vitplasticity.runtime import set_threads

        slot = claim_gpu() if machine.runtime.device in ("auto", "cuda") else None
        if slot is not None:
            print(f"GPU slot {slot}: this job sees only GPU {slot} (CUDA_VISIBLE_DEVICES)", file=sys.stderr)
        set_threads(args.threads)
    from vitplasticity import records, tracking

    folder = args.record(args) if args.record else None
    if folder is not None:  # the record of an earlier run describes outputs this run replaces
        (Path(folder) / records.FILE).unlink(missing_ok=True)
    with tracking.live(machine.tracking, folder if args.live else None, args.command,
                       typed.params(settings) if is_typed else settings) as on_eval:
        args.func(args, settings, machine.runtime, on_eval)


# The jobs (`run`): each imports what it uses, so a job pays start-up only for its own modules.

def _jobs():
    from vitplasticity import jobs  # torch and timm

    return jobs


def _prepare(args, settings, runtime, on_eval) -> None:
    from vitplasticity.datasets.sources import prepare_task

    prepare_task(settings.name, settings.data, args.out, args.raw)


def _pretrain(args, settings, runtime, on_eval) -> None:
    jobs = _jobs()
    metrics = jobs.pretrain(settings, runtime, args.task, args.out, args.run_dir, on_eval)
    jobs.log(f"pretrained: source test accuracy {metrics['source_test_acc']:.4f}")


def _fetch(args, settings, runtime, on_eval) -> None:
    _jobs().fetch(settings, args.out)


def _plasticity(args, settings, runtime, on_eval) -> None:
    _jobs().measure_plasticity(settings, runtime, args.checkpoint, args.reference, args.task, args.out_table,
                               args.out_stats)


def _criteria(args, settings, runtime, on_eval) -> None:
    _jobs().measure_criteria(settings, runtime, args.checkpoint, args.reference, args.task, args.out_table)


def _trajectory(args, settings, runtime, on_eval) -> None:
    _jobs().measure_trajectory(settings, runtime, args.checkpoints, args.reference, args.task, args.out)


def _bounds(args, settings, runtime, on_eval) -> None:
    _jobs().compute_bounds(args.checkpoint, args.stats, args.out)


def _finetune(args, settings, runtime, on_eval) -> None:
    jobs = _jobs()
    metrics = jobs.finetune(settings, runtime, args.task, args.checkpoint, args.run_dir, args.criteria, on_eval)
    jobs.log(f"finetune {metrics['status']}: test accuracy {metrics['test_acc']}")


def _probe(args, settings, runtime, on_eval) -> None:
    jobs = _jobs()
    metrics = jobs.linear_probe(settings, runtime, args.checkpoint, args.task, args.out)
    jobs.log(f"linear probe: test accuracy {metrics['test_acc']:.4f}")


def _preflight(args, settings, runtime, on_eval) -> None:
    from vitplasticity import preflight

    preflight.run(settings, runtime, args.out, args.memory_gib, progress=_jobs().log)


def _aggregate(args, settings, runtime, on_eval) -> None:
    _jobs().aggregate_experiment(settings, args.runs, args.probes, args.plasticity, args.bounds, args.out_dir,
                                 args.criteria, args.trajectory)


def _figures(args, settings, runtime, on_eval) -> None:
    _jobs().draw_figures(args.tables, args.out_dir)


def _compare_paper(args, settings, runtime, on_eval) -> None:
    from vitplasticity.paper import write_comparison

    write_comparison(args.tables, args.probes, args.out_table, args.out_figure)


def _recommend(args: argparse.Namespace) -> None:
    from vitplasticity.recommend import Request, run

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    arch_kwargs = json_option("arch-kwargs", args.arch_kwargs)
    result = run(Request(model=args.model, arch=args.arch, arch_kwargs=arch_kwargs, data=args.data,
                         reference=args.reference, pairs=args.pairs, modes=modes, head=args.head,
                         batch_size=args.batch_size, device=args.device, seed=args.seed, out=args.out,
                         criterion=args.criterion, budget=args.budget, pilot=args.pilot,
                         pilot_steps=args.pilot_steps, pilot_seconds=args.pilot_seconds,
                         pilot_images=args.pilot_images, pilot_seeds=args.pilot_seeds, pilot_lr=args.pilot_lr,
                         others=None if args.others is None else tuple(
                             name.strip() for name in args.others.split(",") if name.strip())))
    ranking = result["ranking"][["mode", "rank", "label", "mean", "ci95"]]
    print(ranking.to_markdown(index=False, floatfmt=".4g"))
    chosen = result["criteria"][["label", "ranking", "wall_s"]].rename(columns={"label": "criterion"})
    print("\n" + chosen.to_markdown(index=False, floatfmt=".3g"))
    for title, frame in (("At the budget", result["budget"]), ("Pilot", result["pilot"])):
        if frame is not None:
            print(f"\n{title}:\n" + frame.to_markdown(index=False))
    print("\n" + "\n".join(result["summary"]))
    print(f"\nreport: {args.out / 'report.md'}")


def _tracking(args: argparse.Namespace) -> None:
    """`tracking rebuild`: a store it cannot use is one line; Ctrl-C leaves nothing the next mirror skips."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from vitplasticity import tracking
    from vitplasticity.machine import Tracking

    uri = tracking.study_uri(args.uri, args.results.resolve().parent)
    try:
        done = tracking.rebuild(args.results, uri, args.experiment)
    except (MlflowException, SQLAlchemyError) as exc:
        raise tracking.unusable(Tracking(uri=args.uri, experiment=args.experiment), exc) from exc
    except KeyboardInterrupt:
        print("vitplasticity tracking rebuild: interrupted; the folders not mirrored yet (and the one being "
              "mirrored) are mirrored by the next snakemake run or by this command again", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"rebuilt {len(done)} runs in {uri}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The `vitplasticity` command: in a child of the run's fork server when one answers (jobs of a
    local run with `runtime.fork_server`), else in this process."""
    from vitplasticity.forkserver import delegate

    argv = sys.argv[1:] if argv is None else list(argv)
    code = delegate(argv)
    return run_in_process(argv) if code is None else code


def run_in_process(argv: list[str]) -> int:
    """Run the command `argv` in this process; its exit status (2 after a one-line error)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        message = str(exc)
    except FileNotFoundError as exc:
        message = f"{exc.filename} does not exist; check the path, or run the step that makes it"
    except OSError as exc:  # the machine refused: permissions, a full disk, a file where a folder should be
        where = f" {exc.filename}" if exc.filename else ""
        message = (f"cannot access{where} ({exc.strerror or exc}); check that the path exists, "
                   "that its folder is writable and that the disk has space")
    else:
        return 0
    print(f"vitplasticity {args.command}: error: {redact(' '.join(message.split()))}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
