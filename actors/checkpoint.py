"""Adapter files and training checkpoints, written atomically.

Layout of a job's output directory::

    out/NAME/
      adapter_config.json            final adapter (PEFT or MixLoRA format)
      adapter_model.safetensors
      metrics.jsonl                  one JSON object per logged optimizer step
      job.json                       summary: state, steps, final loss, spec
      checkpoints/step-000100/       adapter files + optimizer.pt + state.pt + trainer_state.json

Every file is written to a temporary name and renamed into place; a checkpoint directory is
assembled under a temporary name and renamed whole, so a crash never leaves a torn checkpoint
and the newest ``step-*`` directory is always complete.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from actors.storage import CHECKPOINT_MARKER  # trainer_state.json: an object-store upload writes it last

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_adapter_files(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{ADAPTER_WEIGHTS}.", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, directory / ADAPTER_WEIGHTS)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_json(directory / ADAPTER_CONFIG, config)


def write_adapter(directory: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_adapter_files(directory, state, config)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of an adapter directory.

    Reads ``adapter_model.safetensors``, or ``adapter_model.bin`` with ``torch.load(weights_only=True)``
    (never unpickling arbitrary objects).

    Raises:
        FileNotFoundError: no adapter files in ``directory``.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if (directory / ADAPTER_WEIGHTS).is_file():
        path = directory / ADAPTER_WEIGHTS
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
            raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    elif (directory / ADAPTER_WEIGHTS_BIN).is_file():
        path = directory / ADAPTER_WEIGHTS_BIN
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
    else:
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    return state, config


def checkpoint_dir(output: str | Path, step: int) -> Path:
    return Path(output) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    output: str | Path,
    step: int,
    *,
    adapter_state: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    optimizer_state: dict[str, Any],
    tensors: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    final = checkpoint_dir(output, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _write_adapter_files(tmp, adapter_state, adapter_config)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(tensors, tmp / "state.pt")
        atomic_write_json(tmp / CHECKPOINT_MARKER, trainer_state)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-step-*"):  # left by a process killed mid-write (kill -9, power loss)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def drop_checkpoints(output: str | Path) -> int:
    """Delete every checkpoint of a finished job (``train.keep_checkpoints: 0``); returns how many.

    Called by whoever finished the job once it is recorded as finished (the worker after its
    ``finished`` event, ``lorafleet train`` after the evaluation), never at export: a worker lost in
    between has its job requeued, and it resumes from these. The empty ``checkpoints/`` stays, so an
    upload (``actors.storage.sync_up``) deletes the uploaded copies too.
    """
    found = list_checkpoints(output)
    for old in found:
        shutil.rmtree(old, ignore_errors=True)
    return len(found)


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything ``save_checkpoint`` wrote, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: a file is missing or damaged (the message names it).
    """
    path = Path(path)
    try:
        state, config = read_adapter(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    out: dict[str, Any] = {"adapter_state": state, "adapter_config": config}
    for key, name in (("optimizer_state", "optimizer.pt"), ("tensors", "state.pt"), ("trainer_state", CHECKPOINT_MARKER)):
        file = path / name
        try:
            if name.endswith(".json"):
                out[key] = json.loads(file.read_text())
            else:
                out[key] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises RuntimeError, OSError, pickle errors, EOFError
            raise CheckpointError(f"checkpoint {path}: {name} is missing or damaged ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc  # fmt: skip
    return out
