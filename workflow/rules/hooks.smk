# What happens when a run starts and ends (not under --dry-run: Snakemake runs no onstart then).
#
# The fork server (`runtime.fork_server`, local runs) starts first, so that its imports overlap
# the MLflow preparation, and stops once every job has ended.
#
# MLflow mirror: before any job, the study's store, experiment and parent runs (one per
# model/task/optimizer) are made once, so parallel jobs never race on creating them, and the
# job records (`record.json`) the experiment lacks are mirrored into it (tracking switched on,
# study renamed, store lost, pulled or copied). None of this is a job, so changing tracking
# settings reruns nothing and needs no second invocation. When the workflow ends, successfully or
# not, the records its jobs wrote and the store lacks are mirrored (all of them with
# `tracking.live: false`, and the tables' and figures' either way). A store the study cannot use
# (another MLflow version, locked, unreachable, a bad URI) is one line at start and at end; the
# jobs run anyway.


onstart:
    start_fork_server()
    prepare_tracking()


onsuccess:
    stop_fork_server()
    mirror_finished_runs()


onerror:
    stop_fork_server()
    mirror_finished_runs()
