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
set -uo pipefail

ulimit -n 65536 || true
start_cmd="${KUBERAY_GEN_RAY_START_CMD:-ray start --head --block --port=6379 --dashboard-host=0.0.0.0 --num-gpus=0}"
${start_cmd} &
ray_pid=$!

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

for attempt in $(seq 1 30); do
    if lorafleet up --address auto --store "${LORAFLEET_STORE}" --storage "${LORAFLEET_STORAGE}" --allow-path-prefix "${LORAFLEET_DATASETS}" "${policy_args[@]}"; then
        break
    fi
    echo "start-head: lorafleet up failed (attempt ${attempt}/30), retrying in 10 s" >&2
    sleep 10
done

wait "${ray_pid}"
