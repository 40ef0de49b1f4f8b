"""``base_model`` as a hub id: one that is neither cached nor reachable fails at once, naming the field,
the value and what else it could be; one in the local Hugging Face cache keeps loading offline."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors.models import load_base_model

REPO = Path(__file__).resolve().parents[2]
MISSING = "meta-llama/Llama-9-nonexistent"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty hub cache and a hub endpoint that refuses connections (loopback: nothing leaves the machine)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_an_unreachable_hub_is_one_specific_error_without_retries(hub, caplog):
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as err:
        load_base_model(MISSING)
    message = str(err.value)
    assert message.startswith(f"base_model: {MISSING!r} is not a local directory (a path starting with ./")
    assert "nor a builtin: name (builtin:smollm2-135m-instruct)" in message
    assert "not in the local Hugging Face cache, and downloading it failed: the hub (http://127.0.0.1:9) " \
           "cannot be reached (ConnectError: " in message  # fmt: skip
    assert "HF_HUB_OFFLINE=1" in message and "local model directory" in message
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # huggingface_hub's 5 retries per file


def test_offline_and_not_cached_sends_no_request(hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: pytest.fail("a request was sent"))
    with pytest.raises(ValueError) as err:
        load_base_model(MISSING)
    message = str(err.value)
    assert message.startswith(f"base_model: {MISSING!r} is not a local directory")
    assert f"HF_HUB_OFFLINE is set, so only the local Hugging Face cache ({hub.HF_HUB_CACHE}) was searched" in message


def test_not_a_hub_id_at_all(hub):
    with pytest.raises(ValueError, match=r"base_model: 'a/b/c' is not a local directory .* which it is not: "
                                         r"HFValidationError: Repo id must be"):  # fmt: skip
        load_base_model("a/b/c")


LOAD = "from actors.models import load_base_model; m, t = load_base_model('org/tiny'); print(type(m).__name__)"


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "hub-unreachable"])  # fmt: skip
def test_a_cached_hub_id_still_loads(tiny_model_dir, tmp_path, env):
    """A hub id in the local cache loads with HF_HUB_OFFLINE=1, and with a hub that cannot be reached
    (where transformers retried each optional file it had not cached: minutes)."""
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    full.update(PYTHONPATH=str(REPO), HF_HUB_CACHE=str(tmp_path / "cache"), **env)
    res = subprocess.run([sys.executable, "-c", LOAD], env=full, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "LlamaForCausalLM"
    assert "Retry" not in res.stderr  # huggingface_hub's retries of every optional file it has not cached
