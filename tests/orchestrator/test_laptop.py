"""A laptop's view: everything through the Ray dashboard address only (Ray Job Submission).

One local cluster on 127.0.0.1 with 2 fake GPUs and the controller; the CLI and the Python client
run in separate processes, as on a laptop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tests.orchestrator.test_train_cli import alpaca_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "LORAFLEET_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "LORAFLEET_OWNER": "alice",
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def lorafleet(home: Path, *args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env_for(home),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("home")
    up = lorafleet(home, "up", "--local", "--num-gpus", "2", "--num-cpus", "2")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads((home / "local-cluster.json").read_text())
        yield {"home": home, "url": state["dashboard"], "model": tiny_model_dir}
    finally:
        down = lorafleet(home, "down", "--local")
        assert down.returncode == 0, down.stderr[-2000:]


def spec_file(directory: Path, name: str, model: Path, *, steps: int = 3, data_name: str = "data.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / data_name, alpaca_records(16, seed=len(name)))
    spec = {
        "name": name,
        "base_model": str(model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": data_name, "format": "alpaca", "max_seq_len": 32},
        "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2,
                  "checkpoint_every": 2},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_unreachable_address_is_a_clear_error(tmp_path):
    res = lorafleet(tmp_path, "status", "--address", "http://127.0.0.1:9")
    assert res.returncode == 2
    assert "cannot reach the Ray dashboard at http://127.0.0.1:9" in res.stderr


def test_cli_submit_wait_status_logs_fetch_plot(cluster, tmp_path):
    home, url = cluster["home"], cluster["url"]
    laptop = tmp_path / "laptop"  # specs name their data relative to the spec's directory, as users write them
    a = spec_file(laptop, "cli-a", cluster["model"])
    b = spec_file(laptop, "cli-b", cluster["model"], steps=2)
    try:
        res = lorafleet(home, "submit", a.name, b.name, "--address", url, "--wait", cwd=laptop, timeout=240)
    except subprocess.TimeoutExpired as exc:
        state = lorafleet(home, "status", "--json", "--address", url)
        pytest.fail(f"submit --wait hung; cluster says: {state.stdout}\n{state.stderr[-2000:]}\n{exc.stderr!r}"[-6000:])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Uploading package" not in res.stderr and "Creating a file package" not in res.stderr  # Ray's INFO lines
    ids = [line.split("\t")[0] for line in res.stdout.splitlines() if line.startswith("lf-")]
    assert len(ids) == 2

    res = lorafleet(home, "status", "--json", "--address", url)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["cli-a"]["state"] == "SUCCEEDED" and rows["cli-a"]["step"] == 3 == rows["cli-a"]["total_steps"]
    assert rows["cli-b"]["state"] == "SUCCEEDED" and rows["cli-b"]["loss"] > 0
    one = json.loads(lorafleet(home, "status", "cli-a", "--json", "--address", url).stdout)
    assert [r["id"] for r in one] == [ids[0]]

    logs = lorafleet(home, "logs", "cli-a", "--address", url)
    assert logs.returncode == 0 and logs.stdout.strip()

    # `policy show` / `explain` through the dashboard (they needed Ray's GCS); `policy set` says where it runs
    shown = lorafleet(home, "policy", "show", "--address", url)
    assert shown.returncode == 0 and shown.stdout.startswith("policy: "), shown.stderr[-2000:]
    explained = lorafleet(home, "policy", "explain", "cli-a", "--address", url)
    assert explained.returncode == 2 and f"job {ids[0]} is SUCCEEDED: explain covers" in explained.stderr
    assert len(explained.stderr.strip().splitlines()) == 1, explained.stderr
    refused = lorafleet(home, "policy", "set", str(ROOT / "examples" / "policy.yaml"), "--address", url)
    assert refused.returncode == 2 and "is a Ray dashboard URL: `lorafleet up`, `down`, `policy set` and `admin` " \
        "talk to Ray itself" in refused.stderr, refused.stderr

    dest = tmp_path / "fetched"
    res = lorafleet(home, "fetch", "cli-a", str(dest), "--address", url)
    assert res.returncode == 0, res.stderr[-2000:]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cluster["model"])
    ids_t = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = base(ids_t).logits
        tuned = PeftModel.from_pretrained(base, dest)(ids_t).logits
    assert float((tuned - plain).abs().max()) > 1e-4  # the fetched adapter is trained and loads in PEFT

    png = tmp_path / "loss.png"
    res = lorafleet(home, "plot", "cli-a", "cli-b", "-o", str(png), "--address", url)
    assert res.returncode == 0, res.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_client_from_a_separate_process(cluster, tmp_path):
    spec = spec_file(tmp_path / "py", "py-job", cluster["model"])
    script = f"""
import json, os
os.chdir({str(spec.parent)!r})
from orchestrator.remote import Client
client = Client({cluster['url']!r})
job = client.submit({spec.name!r})
final = job.wait(poll_s=1)
out = job.fetch({str(tmp_path / 'py-out')!r})
print(json.dumps({{"state": final["state"], "files": sorted(p.name for p in out.iterdir())}}))
"""
    res = subprocess.run([sys.executable, "-c", script], env=env_for(cluster["home"]), capture_output=True,
                         text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["state"] == "SUCCEEDED"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"} <= set(out["files"])


def test_cancel_and_bad_spec(cluster, tmp_path):
    home, url = cluster["home"], cluster["url"]
    long = spec_file(tmp_path / "c", "long-job", cluster["model"], steps=5000)
    res = lorafleet(home, "submit", long.name, "--address", url, cwd=long.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    res = lorafleet(home, "cancel", "long-job", "--address", url)
    assert res.returncode == 0 and "CANCELLED" in res.stdout, res.stderr[-2000:]
    state = json.loads(lorafleet(home, "status", "long-job", "--json", "--address", url).stdout)[0]["state"]
    assert state == "CANCELLED"

    # retried under its id (refused for the seconds its worker takes to drop it), then live: nothing to do
    deadline = time.monotonic() + 60
    while "still leaving worker" in (res := lorafleet(home, "retry", "long-job", "--address", url)).stderr:
        assert time.monotonic() < deadline, res.stderr[-2000:]
        time.sleep(1)
    assert res.returncode == 0 and "\tlong-job\tQUEUED\t" in res.stdout, res.stderr[-2000:]
    assert "follow it with `lorafleet logs -f lf-" in res.stdout
    again = lorafleet(home, "retry", "long-job", "--address", url)
    assert again.returncode == 0 and "nothing to retry" in again.stdout, again.stderr[-2000:]
    assert lorafleet(home, "cancel", "long-job", "--address", url).returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndata: {path: x.jsonl}\ntrain:\n  optimizer: adam\n")
    res = lorafleet(home, "submit", str(bad), "--address", url)
    assert res.returncode == 2
    assert f"{bad}:4: train.optimizer: must be one of adamw, sgd (got 'adam')" in res.stderr


def test_ray_job_submit_lorafleet_run(cluster, tmp_path):
    spec = spec_file(tmp_path / "rj", "rayjob", cluster["model"], steps=2)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    res = subprocess.run([ray_bin, "job", "submit", "--address", cluster["url"], "--working-dir", str(spec.parent),
                          "--", "lorafleet", "run", spec.name],
                         env=env_for(cluster["home"]), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "SUCCEEDED" in res.stdout and "adapter:" in res.stdout


def test_no_controller_is_a_clear_error(cluster):
    home, url = cluster["home"], cluster["url"]
    down = lorafleet(home, "down")  # the controller only; the cluster stays
    assert down.returncode == 0, down.stderr[-2000:]
    time.sleep(1)
    res = lorafleet(home, "list", "--address", url)
    assert res.returncode == 2
    assert "no lorafleet controller on this cluster: start one with `lorafleet up`" in res.stderr
