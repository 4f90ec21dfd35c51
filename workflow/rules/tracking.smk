# MLflow mirror. Before any job (not under --dry-run: Snakemake runs no onstart then), the
# study's store, experiment and parent runs (one per model/task/optimizer) are made once, so
# parallel jobs never race on creating them, and finished run folders the experiment lacks are
# mirrored into it (tracking switched on, study renamed, store lost, pulled or copied). None of
# this is a job, so changing tracking settings reruns nothing and needs no second invocation.
# With `tracking.live: false` the jobs do not log while they run; the folders they finished are
# mirrored when the workflow ends, successfully or not.


onstart:
    prepare_tracking()


onsuccess:
    mirror_finished_runs()


onerror:
    mirror_finished_runs()
