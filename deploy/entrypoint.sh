#!/bin/sh
# Entrypoint of the dask-influence images: one image runs a scheduler, a worker or a job.
#
#   scheduler [ARGS...]   -> dask scheduler ARGS        (listens on :8786, dashboard on :8787)
#   worker [ARGS...]      -> dask worker ARGS           (scheduler address as the first ARG,
#                                                        or from DASK_SCHEDULER_ADDRESS)
#   job [ARGS...]         -> dask-influence run ARGS    (no ARGS: $DASK_INFLUENCE_JOB --resume)
#   dask-scheduler ...    -> dask scheduler ...         (the names the Dask Helm chart and older
#   dask-worker ...       -> dask worker ...             examples use; distributed dropped them)
#   anything else         -> run as given, e.g. `dask-influence inspect /data/influences.zarr`
#
# exec replaces the shell, so the Dask process gets the container's signals (SIGTERM on
# `docker stop` or pod deletion) and its exit code becomes the container's.
set -eu

if [ "$#" -eq 0 ]; then
    set -- help
fi

command="$1"
shift
case "$command" in
    scheduler | dask-scheduler)
        exec dask scheduler "$@"
        ;;
    worker | dask-worker)
        exec dask worker "$@"
        ;;
    job)
        if [ "$#" -eq 0 ]; then
            set -- "${DASK_INFLUENCE_JOB:-/job/job.toml}" --resume
        fi
        exec dask-influence run "$@"
        ;;
    help | -h | --help)
        echo "usage: ENTRYPOINT scheduler|worker|job [ARGS...] | COMMAND [ARGS...]"
        exec dask-influence --help
        ;;
    *)
        exec "$command" "$@"
        ;;
esac
