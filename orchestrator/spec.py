"""The job spec: one pydantic model, mirrored one to one by the YAML (or JSON) users write.

Every field is documented here and validated with an error that names the field, says
what was wrong and what is allowed. ``load_spec`` adds the file and line::

    jobs/a.yaml:7: adapter.r: must be >= 1 (got 0)

Example (defaults shown; ``name`` and ``data.path`` have none)::

    name: reverse-words
    base_model: builtin:smollm2-135m-instruct
    adapter: {type: lora, r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear}
    data: {path: examples/data/reverse.jsonl, format: auto, max_seq_len: 512}
    train: {epochs: 1, batch_size: 16, micro_batch_size: 4, learning_rate: 2.0e-4}
    priority: 0
    output: null                    # out/NAME, here out/reverse-words

Types: a number is never a boolean and a boolean never a number. A true/false field
(``use_rslora``, ``shuffle``, ...) takes only ``true`` or ``false`` (not ``1``, ``"yes"``); a number
field refuses ``true``/``false``. A float field takes a number or a string of one (``2e-4``, which
YAML 1.1 reads as a string); an integer field takes an integer, a float with no fraction (``512.0``)
or a string of an integer (``"512"``). A key given twice in one mapping is an error (YAML and JSON),
and ``load_spec`` refuses an ``output`` that is an existing file or lies under one.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from actors.config import (
    AdapterSettings,
    DataSettings,
    EvalSettings,
    JobConfig,
    LoraSettings,
    MixLoraSettings,
    TrainSettings,
)
from actors.models import DEFAULT_BASE_MODEL

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
DEFAULT_TARGETS = ["all-linear"]  # every linear of the decoder layers: q/k/v/o + gate/up/down on LLaMA
MAX_SPEC_BYTES = 1 << 20  # a spec file is a few hundred bytes; refuse megabytes of YAML


class SpecError(ValueError):
    """A job spec is invalid. ``errors`` holds one ``"file:line: field: message"`` per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def _yaml_word(value: Any) -> str:
    """``value`` as a spec author wrote it: ``true`` for True, else its short repr."""
    return str(value).lower() if isinstance(value, bool) else repr(_Short(value))


def _no_bool(kind: str) -> Callable[[Any], Any]:
    """A before-validator refusing a boolean where a number (``kind``) is expected: pydantic's lax
    mode reads ``r: true`` as 1."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be {kind}, not true/false (got {_yaml_word(value)})")
        return value

    return check


def _only_bool(value: Any) -> Any:
    """A before-validator refusing anything but true/false where a boolean is expected: pydantic's
    lax mode reads ``shuffle: 1`` or ``shuffle: "no"`` as booleans."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false (got {_yaml_word(value)})")
    return value


Int = Annotated[int, BeforeValidator(_no_bool("an integer"))]
Float = Annotated[float, BeforeValidator(_no_bool("a number"))]
Bool = Annotated[bool, BeforeValidator(_only_bool)]


class _Strict(BaseModel):
    # allow_inf_nan=False: ``alpha: .inf`` or ``weight_decay: .nan`` would pass the range checks.
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False)


class ExpertSpec(_Strict):
    """LoRA settings of each MixLoRA expert; unset fields inherit the adapter's r/alpha/dropout."""

    r: Int | None = Field(None, ge=1, description="rank of each expert's LoRA")
    alpha: Float | None = Field(None, gt=0, description="expert LoRA alpha")
    dropout: Float | None = Field(None, ge=0, lt=1, description="expert LoRA dropout")


class AdapterSpec(_Strict):
    type: Literal["lora", "mixlora"] = Field("lora", description="plain LoRA, or MixLoRA experts on the FFN")
    r: Int = Field(8, ge=1, le=4096, description="LoRA rank")
    alpha: Float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: Float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input (training only)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="names of the linear layers that get LoRA (suffix match, as in PEFT), or all-linear: every "
        "linear layer of the decoder layers (the model's own names: Phi-3's qkv_proj, gate_up_proj, ...)",
    )
    init_from: str | None = Field(None, description="an adapter directory (PEFT LoRA or MixLoRA) to start from")
    use_rslora: Bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: Bool = Field(False, description="weight-decomposed LoRA (DoRA); trains magnitude vectors too")
    # MixLoRA only
    num_experts: Int | None = Field(None, ge=1, le=64, description="MixLoRA: experts per FFN block [8]")
    top_k: Int | None = Field(None, ge=1, description="MixLoRA: experts chosen per token [2]")
    routing: Literal["topk", "dynamic", "switch"] | None = Field(None, description="MixLoRA routing [topk]")
    top_p: Float | None = Field(None, gt=0, le=1, description="MixLoRA dynamic routing threshold [0.8]")
    capacity_factor: Float | None = Field(None, gt=0, description="MixLoRA switch routing capacity [1.0]")
    router_z_loss_coef: Float | None = Field(None, ge=0, description="MixLoRA switch z-loss weight [0.001]")
    router_aux_loss_coef: Float | None = Field(None, ge=0, description="MixLoRA load-balance loss weight [0.001]")
    router_init_range: Float | None = Field(None, gt=0, description="MixLoRA router init std [0.02]")
    jitter_noise: Float | None = Field(None, ge=0, lt=1, description="MixLoRA router input jitter [0.0]")
    expert: ExpertSpec | None = Field(None, description="MixLoRA: overrides for the expert LoRAs")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # target_modules: all-linear

    @field_validator("target_modules")
    @classmethod
    def _targets_are_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == "all-linear":
                continue
            if not name or not name.replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"{name!r} is not a module name (letters, digits, '_' and '.') or all-linear")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value

    @model_validator(mode="after")
    def _mixlora_fields(self) -> AdapterSpec:
        moe_fields = [
            "num_experts", "top_k", "routing", "top_p", "capacity_factor", "router_z_loss_coef",
            "router_aux_loss_coef", "router_init_range", "jitter_noise", "expert",
        ]  # fmt: skip
        if self.type == "lora":
            given = [f for f in moe_fields if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only valid with type: mixlora (type is lora)")
            return self
        experts = self.num_experts or 8
        top_k = self.top_k or 2
        if top_k > experts:
            raise ValueError(f"top_k: must be <= num_experts ({experts}) (got {top_k})")
        return self


class DataSpec(_Strict):
    path: str = Field(..., min_length=1, description="training data: .json, .jsonl, .csv or .parquet")
    format: Literal["auto", "alpaca", "text", "chat", "tokens"] = Field(
        "auto",
        description="record layout: alpaca {instruction,input,output}; text {text} or {prompt,completion}; "
        "chat {messages}; tokens {input_ids[,labels]}; auto picks by the first record's keys",
    )
    max_seq_len: Int = Field(512, ge=2, le=131072, description="longer examples are truncated")
    train_on_inputs: Bool = Field(False, description="false: prompt tokens are masked out of the loss")
    shuffle: Bool = Field(True, description="reshuffle every epoch (seeded by train.seed)")


class TrainSpec(_Strict):
    epochs: Int = Field(1, ge=1, le=1_000_000, description="passes over the data (ignored when max_steps is set)")
    max_steps: Int | None = Field(None, ge=1, le=1_000_000_000, description="optimizer steps; overrides epochs")
    batch_size: Int = Field(16, ge=1, le=1_000_000, description="sequences per optimizer step")
    micro_batch_size: Int = Field(4, ge=1, le=1_000_000, description="sequences per forward pass")
    learning_rate: Float = Field(2e-4, gt=0, le=10, description="peak learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="torch.optim.AdamW or SGD")
    weight_decay: Float = Field(0.0, ge=0, description="decoupled weight decay (AdamW) / L2 (SGD)")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas (torch defaults)")
    eps: Float = Field(1e-8, gt=0, description="AdamW epsilon (torch default)")
    momentum: Float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warmup")
    warmup_steps: Int = Field(0, ge=0, description="linear warmup from 0 over this many steps")
    max_grad_norm: Float | None = Field(None, gt=0, description="clip the job's gradient norm; null: no clipping")
    seed: Int = Field(42, ge=0, le=2**63 - 1, description="adapter init, data order and dropout masks")
    checkpoint_every: Int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: Int = Field(3, ge=0, le=1000, description="newest checkpoints kept while training (at least "
                                  "1, to resume); once the job has finished, 0 deletes them all")
    log_every: Int = Field(1, ge=1, description="optimizer steps between metrics-log lines")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1) (got {list(value)})")
        return value

    @field_validator("micro_batch_size")
    @classmethod
    def _micro_divides_batch(cls, value: int, info: ValidationInfo) -> int:
        # A field validator, not a model one: it runs (and is reported) beside other fields' errors.
        batch = info.data.get("batch_size")
        if batch is None:  # batch_size itself is invalid: its own error says so
            return value
        if value > batch:
            raise ValueError(f"micro_batch_size: must be <= batch_size ({batch}) (got {value})")
        if batch % value:
            raise ValueError(f"batch_size: must be a multiple of micro_batch_size ({value}) (got {batch})")
        return value


class EvalSpec(_Strict):
    data: str | None = Field(None, min_length=1, description="held-out data file; null: use held_out_fraction")
    held_out_fraction: Float = Field(
        0.0, ge=0, lt=1, description="share of the training data held out (seeded by train.seed) when data is null"
    )
    metrics: list[Literal["loss", "exact_match", "multiple_choice"]] = Field(
        default_factory=lambda: ["loss"], min_length=1,
        description="loss (mean token loss, perplexity); exact_match (greedy generation with the job's prompt "
        "template); multiple_choice (records {question, choices, answer})",
    )
    max_new_tokens: Int = Field(32, ge=1, le=4096, description="exact_match: generation length limit")
    normalize: Literal["exact", "squad"] = Field("exact", description="exact_match: answer normalisation")
    max_examples: Int | None = Field(None, ge=1, description="evaluate at most this many held-out records")
    batch_size: Int = Field(8, ge=1, description="records per evaluation batch")

    @model_validator(mode="after")
    def _has_source(self) -> EvalSpec:
        if self.data is None and self.held_out_fraction == 0:
            raise ValueError("data: set eval.data or eval.held_out_fraction > 0")
        return self


class JobSpec(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="job name: [A-Za-z0-9._-]{1,64}")
    base_model: str = Field(
        DEFAULT_BASE_MODEL, min_length=1, description="builtin:NAME, a local model directory, or a hub id"
    )
    trust_remote_code: Bool = Field(
        False, description="run Python code shipped with the base model; a cluster refuses it unless the "
        "admin enabled it (`lorafleet up --allow-remote-code`)"
    )
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    priority: Int = Field(0, ge=-1000, le=1000, description="higher runs first under priority policies")
    owner: str | None = Field(None, pattern=NAME_PATTERN, description="set by the client from its identity")
    output: str | None = Field(None, description="output directory [out/NAME]")
    eval: EvalSpec | None = Field(None, description="held-out evaluation after training (base vs adapter)")

    @field_validator("name", "owner")
    @classmethod
    def _not_hidden(cls, value: str | None) -> str | None:
        # Names become directory names (out/NAME, the job area): never '.', '..' or hidden.
        if value is not None and value.startswith("."):
            raise ValueError(f"must not start with '.' (got {value!r})")
        return value

    def output_dir(self) -> str:
        return self.output or f"out/{self.name}"

    def to_job_config(self) -> JobConfig:
        """The engine's view of this spec (``actors.config``)."""
        a = self.adapter
        lora = LoraSettings(r=a.r, alpha=a.alpha, dropout=a.dropout, use_rslora=a.use_rslora, use_dora=a.use_dora)
        mix = None
        if a.type == "mixlora":
            e = a.expert or ExpertSpec()
            mix = MixLoraSettings(
                num_experts=a.num_experts or 8,
                top_k=a.top_k or 2,
                routing=a.routing or "topk",
                top_p=0.8 if a.top_p is None else a.top_p,
                capacity_factor=1.0 if a.capacity_factor is None else a.capacity_factor,
                router_z_loss_coef=0.001 if a.router_z_loss_coef is None else a.router_z_loss_coef,
                router_aux_loss_coef=0.001 if a.router_aux_loss_coef is None else a.router_aux_loss_coef,
                router_init_range=0.02 if a.router_init_range is None else a.router_init_range,
                jitter_noise=a.jitter_noise or 0.0,
                expert=LoraSettings(
                    r=e.r or a.r,
                    alpha=a.alpha if e.alpha is None else e.alpha,
                    dropout=a.dropout if e.dropout is None else e.dropout,
                    use_rslora=a.use_rslora,
                    use_dora=a.use_dora,
                ),
            )
        t = self.train
        return JobConfig(
            name=self.name,
            base_model=self.base_model,
            adapter=AdapterSettings(
                kind=a.type, lora=lora, target_modules=tuple(a.target_modules), mixlora=mix, init_from=a.init_from
            ),
            data=DataSettings(**self.data.model_dump()),
            train=TrainSettings(**{**t.model_dump(), "betas": tuple(t.betas)}),
            output=self.output_dir(),
            priority=self.priority,
            eval=None if self.eval is None else EvalSettings(
                **{**self.eval.model_dump(), "metrics": tuple(self.eval.metrics)}
            ),
        )


# ---------------------------------------------------------------- loading and error messages


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            break
        model = nxt
    return list(model.model_fields)


# Values echoed in error messages are shortened: a hostile spec can hold megabytes of text or a
# YAML alias tree whose full repr would be enormous (or recurse too deep to print).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


class _Short:
    """Wraps an echoed value so ``f"{x!r}"`` prints its shortened repr."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return _SHORT.repr(self.value)


def _format_error(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    kind = err["type"]
    raw = tuple(err["loc"])
    # Drop pydantic's validator names ("function-after[...]") from the path, but never the user's own
    # key that an unknown-field error names last (a spec may well contain a key "function-x").
    loc = tuple(p for i, p in enumerate(raw) if not (isinstance(p, str) and p.startswith("function-"))
                or (kind == "extra_forbidden" and i == len(raw) - 1))  # fmt: skip
    given = _Short(err["input"]) if "input" in err else None
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return loc, f"unknown field{hint}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return loc, f"must be one of {', '.join(allowed)} (got {given!r})"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return loc, f"must be {op} {bound} (got {given!r})"
    if kind == "string_pattern_mismatch":
        return loc, f"must match {ctx.get('pattern')} (got {given!r})"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        # Model-level validators name their own field as "field: message".
        head, sep, rest = msg.partition(": ")
        if sep and head.replace("_", "").replace(", ", "").isalnum() and " " not in head.replace(", ", ""):
            first = head.split(", ")[0]
            if (loc and isinstance(loc[-1], str) and {loc[-1], first} <= set(_allowed_fields(loc[:-1]))
                    and _allowed_fields(loc) == _allowed_fields(loc[:-1])):  # fmt: skip
                # a field validator (loc ends at a leaf field, not a section) naming itself or a sibling
                # field: micro_batch_size's check reports batch_size
                loc = loc[:-1]
            return (*loc, first), f"{rest}" if "," not in head else msg
        return loc, msg
    return loc, f"{err['msg'].lower()} (got {given!r})" if given is not None else err["msg"].lower()


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse_spec(data: Any, *, source: str = "<spec>", text: str | None = None) -> JobSpec:
    """Validate an already-parsed mapping; raise ``SpecError`` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError([f"{source}: a job spec must be a mapping of fields (got {type(data).__name__})"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        root = None
        if text is not None:
            try:
                root = yaml.compose(text)
            except (yaml.YAMLError, ValueError, RecursionError):
                root = None
        lines = []
        for err in exc.errors(include_url=False):
            loc, msg = _format_error(err)
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
            field = ".".join(str(p) for p in loc) or "(spec)"
            lines.append(f"{where}: {field}: {msg}")
        raise SpecError(lines) from None


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a spec file: the later one would silently replace the first."""

    def __init__(self, field: str, line: int | None = None, first: int | None = None):
        self.field, self.line, self.first = field, line, first
        super().__init__(field)


def _short_key(key: str) -> str:
    return key if len(key) <= 80 else f"{key[:77]}..."


def _check_unique_keys(root: yaml.Node) -> None:
    """Raise ``_DuplicateKey`` for the first key (in document order) given twice in one YAML mapping.

    Iterative, and each node is visited once, so neither deep nesting nor an alias tree is a problem.
    Merge keys (``<<: *base``) are left out: a key beside them overrides the merged one, as YAML intends.
    """
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    visited: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        children: list[tuple[yaml.Node, tuple[str, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = _short_key(str(key.value)) if isinstance(key, yaml.ScalarNode) else "?"
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in first:
                        raise _DuplicateKey(".".join((*loc, name)), line, first[key.tag, key.value])
                    first[key.tag, key.value] = line
                children.append((value, (*loc, name)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*loc, str(i))) for i, item in enumerate(node.value)]
        stack.extend(reversed(children))


def _load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document of a YAML spec and its node tree (for line numbers); ``_DuplicateKey`` if a key repeats."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_unique_keys(root)
        return loader.construct_document(root), root
    finally:
        loader.dispose()


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a dict, or ``_DuplicateKey`` when a key repeats."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(_short_key(key))
        obj[key] = value
    return obj


def output_problem(output: str) -> str | None:
    """Why ``output`` cannot be a job's output directory on this machine, or None.

    Refused: an existing path that is not a directory (a file, a broken link), and a path whose
    nearest existing parent is not a directory. A URI, or a path this process may not look at, is
    left to training to report.
    """
    if "://" in output:
        return None
    path = Path(output)
    try:
        if path.exists():
            if path.is_dir():
                return None
            return f"{output} is a file, not a directory" if path.is_file() else f"{output} is not a directory"
        if path.is_symlink():
            return f"{output} is a link to a missing path, not a directory"
        for parent in path.parents:
            if parent.exists():
                return None if parent.is_dir() else f"{output} is under {parent}, which is a file, not a directory"
    except OSError:
        return None
    return None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML or JSON job spec file.

    Besides the fields, a key given twice and an ``output`` (or the default ``out/NAME``) that is an
    existing file or lies under one are errors: they would replace a section silently, or fail the
    job after its first training step.

    Raises:
        SpecError: unreadable file, YAML syntax error, or invalid fields (all listed, with lines).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: spec file is {size} bytes; the limit is {MAX_SPEC_BYTES}"])
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"{path}: cannot read spec file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: spec file is not valid UTF-8: {exc.reason} at byte {exc.start}"]) from None
    is_json = path.suffix == ".json"
    root = None
    try:
        if is_json:
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            data, root = _load_yaml(text)
    except _DuplicateKey as dup:
        where = f"{path}:{dup.line}" if dup.line else str(path)
        also = f" (first on line {dup.first})" if dup.first else ""
        raise SpecError([f"{where}: {dup.field}: key given twice{also}; give each key once (the second "
                         f"would replace the first)"]) from None  # fmt: skip
    except yaml.MarkedYAMLError as exc:  # one line naming the file and the line, not "<unicode string>"
        from policies.values import yaml_problem

        raise SpecError([f"{path}: {yaml_problem(exc)}"]) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: JSON syntax, or an integer literal past Python's 4300-digit limit (JSON and
        # YAML); RecursionError: thousands of nested brackets.
        kind = "JSON" if is_json else "YAML"
        raise SpecError([f"{path}: not valid {kind}: {exc or type(exc).__name__}"]) from None
    spec = parse_spec(data, source=str(path), text=text)
    problem = output_problem(spec.output_dir())
    if problem is not None:
        line = _line_of(root, ("output",)) if spec.output is not None else None
        where = f"{path}:{line}" if line else str(path)
        default = "" if spec.output is not None else " (output is unset: the default is out/NAME)"
        raise SpecError([f"{where}: output: {problem}{default}"])
    return spec
