#!/usr/bin/env bash
# Head container entry point (KubeRay): start Ray, then start or reattach to the lorafleet controller.
#
# KubeRay sets KUBERAY_GEN_RAY_START_CMD (`ray start --head ... --block`) because the RayCluster
# has the annotation ray.io/overwrite-container-cmd: "true". Ray runs in the background; this script
# waits until it answers, runs `lorafleet up` (retried: the GCS may still be recovering from Redis
# after a head restart), then waits on Ray so that the container lives and dies with it.
# `lorafleet up` returns once the detached controller actor answers; if the actor already exists
# (head restart with GCS fault tolerance) it reattaches instead of starting a second one.
#
# Environment (set in deploy/kuberay/raycluster.yaml):
#   LORAFLEET_STORE    job store file on the head's own volume
#   LORAFLEET_STORAGE  artifact root on the volume every node mounts (or an s3:// / gs:// URI)
#   LORAFLEET_POLICY   policy YAML used when the store has no saved policy yet (policy.json)
#   LORAFLEET_DATASETS shared data set directory specs may name by absolute path (--allow-path-prefix)
#   LORAFLEET_UP_ATTEMPTS, LORAFLEET_UP_RETRY_S  tries of `lorafleet up` and the pause between them
#                      [30, 10 s]; after the last, the script stops Ray and exits 1 (the pod restarts)
set -uo pipefail

ulimit -n 65536 || true
start_cmd="${KUBERAY_GEN_RAY_START_CMD:-ray start --head --block --port=6379 --dashboard-host=0.0.0.0 --num-gpus=0}"
# A shell runs the command, as KubeRay expects: with gcsFaultToleranceOptions.redisPassword it writes
# `--redis-password=$REDIS_PASSWORD` into it for the shell to expand (a plain ${start_cmd} passed the
# literal text, and the head could not log in to Redis).
bash -c "exec ${start_cmd}" &
ray_pid=$!
# Pod shutdown: hand SIGTERM to Ray (bash as PID 1 would not, and the pod waited out its grace period).
trap 'kill -TERM "${ray_pid}" 2> /dev/null' TERM INT

for _ in $(seq 1 120); do
    if ray health-check > /dev/null 2>&1; then break; fi
    if ! kill -0 "${ray_pid}" 2> /dev/null; then echo "start-head: ray start exited" >&2; wait "${ray_pid}"; exit 1; fi
    sleep 2
done

mkdir -p "$(dirname "${LORAFLEET_STORE}")"
policy_args=()
# A policy set at run time (`lorafleet policy set`) is saved next to the store and must survive a
# head restart: pass the file only when there is no saved policy yet.
if [[ -n "${LORAFLEET_POLICY:-}" && ! -e "$(dirname "${LORAFLEET_STORE}")/policy.json" ]]; then
    policy_args=(--policy "${LORAFLEET_POLICY}")
fi

attempts="${LORAFLEET_UP_ATTEMPTS:-30}"
retry_s="${LORAFLEET_UP_RETRY_S:-10}"
up=0
for attempt in $(seq 1 "${attempts}"); do
    if lorafleet up --address auto --store "${LORAFLEET_STORE}" --storage "${LORAFLEET_STORAGE}" --allow-path-prefix "${LORAFLEET_DATASETS}" "${policy_args[@]}"; then
        up=1
        break
    fi
    echo "start-head: lorafleet up failed (attempt ${attempt}/${attempts}), retrying in ${retry_s} s" >&2
    sleep "${retry_s}"
done
if [[ "${up}" != 1 ]]; then
    # A head without a controller must not look healthy: stop Ray and fail, so Kubernetes restarts the pod.
    echo "start-head: lorafleet up failed ${attempts} times; stopping Ray so the pod restarts" >&2
    kill -TERM "${ray_pid}" 2> /dev/null
    wait "${ray_pid}"
    exit 1
fi

wait "${ray_pid}"
