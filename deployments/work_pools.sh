#!/usr/bin/env bash
# Create (or update) the two process work pools that prefect.yaml's deployments name.
# Needs PREFECT_API_URL pointing at the server (or a Prefect Cloud profile). Idempotent.
#
#   dax-cpu  ingestion, heads, the whole pipeline   (workers: `prefect worker start --pool dax-cpu`)
#   dax-gpu  pretraining with torchrun              (workers: `prefect worker start --pool dax-gpu`)
#
# PREFECT=/path/to/prefect overrides which CLI runs (default: the one on PATH).
set -euo pipefail

PREFECT="${PREFECT:-prefect}"

"$PREFECT" --no-prompt work-pool create dax-cpu --type process --overwrite
# one training at a time on the GPU pool (the retrain deployments share the GPUs of its machine):
# raise it with `prefect work-pool set-concurrency-limit dax-gpu N` when N GPU machines serve the pool
"$PREFECT" --no-prompt work-pool create dax-gpu --type process --overwrite
"$PREFECT" --no-prompt work-pool set-concurrency-limit dax-gpu "${DAX_GPU_POOL_CONCURRENCY:-1}"
