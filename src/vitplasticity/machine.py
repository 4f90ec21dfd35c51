"""Machine settings: how and where jobs compute and are mirrored, never what a result means.

A study config holds science and machine settings (its `runtime` and `tracking` sections and
the `study` name). Science reaches jobs as Snakemake params, which are rerun triggers; machine
settings reach them through the environment variable `MACHINE_ENV`, which Snakemake does not
record, so changing one reruns nothing. Kept free of heavy imports: every job reads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from vitplasticity.errors import UserError

# The environment variable through which the workflow hands machine settings to its jobs.
MACHINE_ENV = "VITPLASTICITY_MACHINE"


@dataclass(frozen=True)
class Runtime:
    """How a job computes; none of it changes what a result means (config section `runtime`).

    These defaults are the only ones: jobs also run outside the workflow (the schema lives with it).
    """

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    micro_batch: int | None = None  # micro-batch of gradient accumulation; None: the largest that fits
    eval_batch: int = 256  # images per evaluation forward pass
    compile: bool = False  # torch.compile the training forward pass
    plasticity_batch: int = 64  # image pairs per plasticity forward pass
    prefetch: int = 2  # training batches gathered ahead on a worker thread (0: none)
    fork_server: bool = False  # local runs: jobs fork from one process that has imported torch (forkserver)


@dataclass(frozen=True)
class Tracking:
    """Where a job is mirrored (config section `tracking`, experiment = `study`)."""

    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the study's own results/mlflow.db
    experiment: str = ""
    live: bool = True  # jobs log while they run; False: the workflow mirrors their run folders when it ends


@dataclass(frozen=True)
class Machine:
    runtime: Runtime = Runtime()
    tracking: Tracking = Tracking(enabled=False)

    def to_env(self) -> str:
        """The JSON the workflow exports as `MACHINE_ENV`."""
        return json.dumps(asdict(self), sort_keys=True)


def machine(config: Mapping) -> Machine:
    """The machine settings of a validated study config."""
    return Machine(Runtime(**config.get("runtime", {})), Tracking(**config.get("tracking", {}),
                                                                  experiment=config["study"]))


def machine_from_env(environ: Mapping[str, str] = os.environ) -> Machine:
    """The machine settings the workflow exported to this job; outside the workflow the defaults,
    tracking off. A value that is not the workflow's JSON raises UserError."""
    text = environ.get(MACHINE_ENV)
    if not text:
        return Machine()
    try:
        values = json.loads(text)
        return Machine(Runtime(**values["runtime"]), Tracking(**values["tracking"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{MACHINE_ENV} is not the JSON of the machine settings ({exc}); unset it "
                        "(jobs run through snakemake get it from the study config)") from exc
