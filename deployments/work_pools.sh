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

for pool in dax-cpu dax-gpu; do
    "$PREFECT" --no-prompt work-pool create "$pool" --type process --overwrite
done
