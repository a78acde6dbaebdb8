#!/usr/bin/env bash
# A local Ray cluster with token authentication, and the `ray job submit` workflow against it.
#
#   deploy/ray-local.sh up                     start a head node on 127.0.0.1 (token in ~/.ray/auth_token)
#   deploy/ray-local.sh token                  make the token, readable by this user only (`up` does it)
#   deploy/ray-local.sh submit SPEC [ID]       submit `python -m service.train SPEC` with this folder as working dir
#   deploy/ray-local.sh logs ID | status ID    follow the job's logs / print its status
#   deploy/ray-local.sh stop ID                stop the job: the run ends STOPPED after a last checkpoint
#   deploy/ray-local.sh down                   stop the head node
#
# Submitting the same spec again resumes the run. S3 credentials (AWS_*) must be in the environment of `up`:
# the cluster's processes, not the job, carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:${DASHBOARD_PORT}}
# A stopped job gets SIGTERM, then SIGKILL after this many seconds: room for the last checkpoint.
STOP_WAIT_S=${STOP_WAIT_S:-120}

# Ray writes the token, and the session's files, with our umask: nobody else on the machine may read them.
umask 077

private_token() {
  ray get-auth-token --generate >/dev/null
  if [ -f "${HOME}/.ray/auth_token" ]; then  # one written before with a looser umask
    chmod 700 "${HOME}/.ray" && chmod 600 "${HOME}/.ray/auth_token"
  fi
}

case "${1:-}" in
  token) private_token ;;
  up)
    private_token
    ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port="${DASHBOARD_PORT}" \
      --disable-usage-stats
    echo "jobs: ${ADDRESS} (clients need RAY_AUTH_MODE=token; the token is in ~/.ray/auth_token)"
    ;;
  submit)
    spec=${2:?usage: $0 submit SPEC [SUBMISSION_ID]}
    ray job submit --address "${ADDRESS}" --working-dir . ${3:+--submission-id "$3"} --no-wait \
      --runtime-env-json "{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"${STOP_WAIT_S}\"}}" \
      -- python -m service.train "${spec}"
    ;;
  logs) ray job logs --address "${ADDRESS}" --follow "${2:?job id}" ;;
  status) ray job status --address "${ADDRESS}" "${2:?job id}" ;;
  stop) ray job stop --address "${ADDRESS}" "${2:?job id}" ;;
  down) ray stop ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
