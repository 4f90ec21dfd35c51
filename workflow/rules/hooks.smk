# What happens when a run starts and ends (not under --dry-run: Snakemake runs no onstart then).
#
# The fork server (`runtime.fork_server`, local runs) starts first, so that its imports overlap
# the MLflow preparation, and stops once every job has ended.
#
# MLflow mirror: before any job, the study's store, experiment and parent runs (one per
# model/task/optimizer) are made once, so parallel jobs never race on creating them, and
# finished run folders the experiment lacks are mirrored into it (tracking switched on, study
# renamed, store lost, pulled or copied). None of this is a job, so changing tracking settings
# reruns nothing and needs no second invocation. With `tracking.live: false` the jobs do not log
# while they run; the folders they finished are mirrored when the workflow ends, successfully or
# not.


onstart:
    start_fork_server()
    prepare_tracking()


onsuccess:
    stop_fork_server()
    mirror_finished_runs()


onerror:
    stop_fork_server()
    mirror_finished_runs()
