#!/usr/bin/env bash
# Submit tonight's nightly run to a Ray cluster with one deterministic submission id per night.
#
# Environment (from the CronJob's ConfigMap and Secrets, or /etc/wbc-batch/nightly.env on one machine):
#   RAY_ADDRESS      dashboard URL, e.g. http://wbc-ray-head-svc:8265
#   RAY_AUTH_MODE    token
#   RAY_AUTH_TOKEN   the cluster's token (Kubernetes Secret wbc-ray-auth); or RAY_AUTH_TOKEN_PATH
#   INPUT_URI        s3://bucket/incoming
#   OUTPUT_URI       s3://bucket/wbc-results
#
# The submission id is nightly-YYYYMMDD (UTC). If it already exists: a running job is followed, a
# succeeded one means the night is done, a failed/stopped one is resubmitted as nightly-YYYYMMDD-rN
# with the same --run-id, so the retry rewrites the same part files (docs: infra/README.md).
set -euo pipefail

night="$(date -u +%Y%m%d)"
run_id="nightly-${night}"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard URL}"
: "${INPUT_URI:?set INPUT_URI}"
: "${OUTPUT_URI:?set OUTPUT_URI}"

status_of() {
    # Prints PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED, or nothing when the id is unknown.
    ray job status --address "$RAY_ADDRESS" "$1" 2>/dev/null | grep -oE 'PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED' | tail -n 1 || true
}

submission_id="$run_id"
for attempt in 1 2 3 4 5; do
    state="$(status_of "$submission_id")"
    case "$state" in
        "")
            break ;;
        SUCCEEDED)
            echo "nightly ${run_id}: submission ${submission_id} already succeeded"; exit 0 ;;
        PENDING|RUNNING)
            echo "nightly ${run_id}: following running submission ${submission_id}"
            ray job logs --address "$RAY_ADDRESS" --follow "$submission_id"
            [ "$(status_of "$submission_id")" = SUCCEEDED ]; exit $? ;;
        *)
            submission_id="${run_id}-r${attempt}" ;;
    esac
done

ray job submit --address "$RAY_ADDRESS" --submission-id "$submission_id" --working-dir /home/ray/app -- \
    python jobs/nightly.py "$INPUT_URI" "$OUTPUT_URI" --run-id "$run_id" --lease-seconds 900
[ "$(status_of "$submission_id")" = SUCCEEDED ]
