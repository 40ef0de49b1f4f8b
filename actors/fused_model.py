"""One frozen base model shared by many jobs' adapters.

``FusedModel`` wraps the base model's linear layers in ``MultiLoraLinear`` on demand, runs a
forward over a fused batch with a ``BatchLayout``, and computes each job's loss on its own rows.

Packed batches (one row of sequences laid end to end, ``cu_seqlens`` marking where each starts)
run attention per sequence through ``varlen_sdpa_attention``, registered with transformers as the
``lorafleet_varlen`` attention implementation and switched on only for the packed forward (and
its recomputation under activation checkpointing). Sequences of equal length share one causal
``scaled_dot_product_attention`` call, so attention costs sum(L_i^2), never (sum L_i)^2.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from actors.data import IGNORE_INDEX
from actors.lora import BatchLayout, ForwardContext, MultiLoraLinear
from policies.memory_model import PACK_ANY_LENGTH

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"  # a target_modules entry: every linear layer of the decoder layers
VARLEN_CALLS = {"bounds": 0, "plain": 0}  # varlen attention calls with / without sequence bounds (packing probe)
VARLEN_ATTENTION = "lorafleet_varlen"
PACKABLE_ATTENTION = ("sdpa", "eager", VARLEN_ATTENTION)  # implementations whose math varlen_sdpa reproduces
#: Names a decoder gives its list of layers, tried in this order (decoder_layers_path).
DECODER_LAYER_LISTS = ("layers", "h", "blocks", "block", "layer")


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence: q (1, H, T, D), k/v (1, H_kv, T, D) -> (1, T, H, D).

    Sequence boundaries come from ``cu_seq_lens_q`` (S+1,), the keyword transformers forwards to
    attention (flash-attention's name). Without it, this is transformers' own sdpa attention.
    """
    cu = kwargs.get("cu_seq_lens_q")
    VARLEN_CALLS["bounds" if cu is not None else "plain"] += 1
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # (1, H, T, D), as transformers' repeat_kv
        value = value.repeat_interleave(groups, dim=1)  # (1, H, T, Dv)
    q, k, v = query[0], key[0], value[0]  # (H, T, D)
    heads, total, _ = q.shape
    bounds = cu.tolist()
    by_length: dict[int, list[int]] = {}
    for start, stop in itertools.pairwise(bounds):
        by_length.setdefault(stop - start, []).append(start)

    def attend(idx: torch.Tensor | None, count: int, length: int) -> torch.Tensor:
        parts = [t if idx is None else t.index_select(1, idx) for t in (q, k, v)]  # (H, count*length, D)
        qs, ks, vs = (t.reshape(heads, count, length, -1).transpose(0, 1) for t in parts)  # (count, H, length, D)
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling)
        return out.transpose(0, 1).reshape(heads, count * length, -1)  # (H, count*length, Dv)

    if len(by_length) == 1:
        (length, starts), = by_length.items()
        out = attend(None, len(starts), length)  # (H, T, Dv): every sequence has one length
    else:
        outs, order = [], []
        for length, starts in by_length.items():
            idx = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1).to(q.device, non_blocking=True)
            outs.append(attend(idx, len(starts), length))
            order.append(idx)
        parts = torch.cat(outs, 1)  # (H, T, Dv), in sdpa's output dtype (bf16 under CUDA autocast even for fp32 q)
        out = parts.new_zeros(heads, total, v.shape[-1]).index_copy(1, torch.cat(order), parts)  # (H, T, Dv)
    return out.transpose(0, 1).unsqueeze(0), None  # (1, T, H, Dv)


def _no_mask(*args, **kwargs) -> None:
    return None  # varlen attention needs no mask: boundaries travel as cu_seq_lens


def register_varlen_attention() -> None:
    """Register ``lorafleet_varlen`` with transformers (idempotent; its documented extension point)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)


#: PyTorch's one-kernel tanh GELU: the formula of transformers' ``gelu_new`` and ``gelu_fast``.
tanh_gelu = functools.partial(F.gelu, approximate="tanh")


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Run ``model``'s ``gelu_new`` and ``gelu_fast`` activations (Phi-1/2, GPT-2, GPT-J, CodeGen)
    as :data:`tanh_gelu`, and return how many modules changed.

    transformers computes both as a chain of elementwise ops, and autograd keeps three more
    intermediate-wide tensors per token per layer than the one kernel of the same formula, which
    keeps only its input (for Phi-2 in bf16 at 4 x 2,048 tokens, 16 GB). The outputs agree to the
    float rounding transformers itself names (``GELUTanh``'s docstring): logits of a tiny fp32 Phi
    within 2e-7. Each module keeps its class (the engine names the activation by it); only the
    instance's ``forward`` changes, so other models in the process are untouched.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation

    changed = 0
    for module in model.modules():
        if isinstance(module, NewGELUActivation | FastGELUActivation) and "forward" not in vars(module):
            module.forward = tanh_gelu
            changed += 1
    return changed


class TargetError(ValueError):
    """``adapter.target_modules`` names a module the base model does not have."""


class FusedModel:
    """The base causal LM, frozen, with adapter hooks on its linear layers."""

    def __init__(self, model: nn.Module, *, name: str = ""):
        self.model = model
        self.name = name
        self.context = ForwardContext()
        self.linears: dict[str, MultiLoraLinear] = {}
        self.mlps: dict[int, nn.Module] = {}  # decoder layer index -> MultiMixMLP (MixLoRA)
        self.model.requires_grad_(False)
        fuse_tanh_gelu(self.model)
        self.activation_checkpointing = False
        self.loss_chunk = 512  # label tokens per output-head chunk under activation checkpointing
        self._packing_exact: bool | None = None  # packed == padded on this model (probed once)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):  # transformers PretrainedConfig
        return self.model.config

    def candidate_linears(self) -> dict[str, nn.Module]:
        """Every linear layer an adapter may target (all but the output head), by module path."""
        head = self.model.get_output_embeddings()
        out = {}
        for path, module in self.model.named_modules():
            if isinstance(module, MultiLoraLinear):
                out[path] = module
            elif isinstance(module, nn.Linear) and module is not head and not path.endswith(".base"):
                out[path] = module
        return out

    def expand_targets(self, targets: Iterable[str]) -> tuple[str, ...]:
        """``targets`` with ``all-linear`` (as in PEFT) replaced by the last name of every linear layer
        in the decoder layers (the output head excluded), in module order: q/k/v/o and gate/up/down
        for LLaMA, ``qkv_proj``/``o_proj``/``gate_up_proj``/``down_proj`` for Phi-3, ..."""
        targets = tuple(targets)
        if ALL_LINEAR not in targets:
            return targets
        every = [p.rsplit(".", 1)[-1] for p in self.decoder_linear_paths()]
        return tuple(dict.fromkeys([*(t for t in targets if t != ALL_LINEAR), *every]))

    def decoder_linear_paths(self) -> list[str]:
        """Module paths of the linear layers inside the decoder layers, in module order."""
        prefix = self.decoder_layers_path() + "."
        return [p for p in self.candidate_linears() if p.startswith(prefix)]

    def wrap_targets(self, targets: Iterable[str]) -> dict[str, MultiLoraLinear]:
        """Wrap (once) and return every linear that a target names: its last name component (or a
        longer suffix of its path, or its whole path), as PEFT matches a list of ``target_modules``.

        Raises:
            TargetError: a target matches no linear layer; the message lists what exists.
        """
        targets = list(targets)
        candidates = self.candidate_linears()
        found: dict[str, MultiLoraLinear] = {}
        for target in targets:
            paths = _suffix_matches(target, candidates)
            if not paths:
                names = sorted({p.rsplit(".", 1)[-1] for p in candidates})
                raise TargetError(
                    f"adapter.target_modules: {target!r} matches no linear layer of {self.name or 'the base model'}; "
                    f"available: {', '.join(names)}"
                )
            for path in paths:
                found[path] = self._wrap(path, candidates[path])
        return dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))

    def target_names(self, paths: Iterable[str]) -> tuple[str, ...]:
        """The ``target_modules`` that make :meth:`wrap_targets` adapt exactly the linear layers at ``paths``:
        the last name of a module where every linear of that name is among them (``q_proj``), its whole
        path otherwise (``model.layers.1.self_attn.q_proj``); in module order.

        Raises:
            TargetError: ``paths`` holds a module that is not a candidate linear, or no list of names
                selects exactly these modules (a whole path that is also the tail of another one).
        """
        chosen = set(paths)
        candidates = self.candidate_linears()
        strangers = sorted(chosen - set(candidates), key=_natural_key)
        if strangers:
            raise TargetError(f"{', '.join(strangers[:3])}: not a linear layer lorafleet adapts")
        groups: dict[str, list[str]] = {}
        for path in candidates:
            groups.setdefault(path.rsplit(".", 1)[-1], []).append(path)
        names: list[str] = []
        for name, group in groups.items():
            picked = [p for p in group if p in chosen]
            if picked:
                names.extend([name] if len(picked) == len(group) else picked)
        if {p for name in names for p in _suffix_matches(name, candidates)} != chosen:
            raise TargetError(f"no list of module names selects exactly {', '.join(sorted(chosen, key=_natural_key))}")
        return tuple(names)

    def module_paths(self) -> dict[str, nn.Module]:
        """Every module of the base model by path, as the model was before lorafleet wrapped it (what PEFT
        matches ``target_modules`` against): a ``MultiLoraLinear`` stands for the linear it wraps, and
        what lorafleet keeps inside its wrappers (the wrapped linear, adapters, MixLoRA experts) is left out."""
        from actors.mixlora import MultiMixMLP

        out: dict[str, nn.Module] = {}
        inside: str | None = None  # named_modules is depth first: a subtree follows its root
        experts: set[str] = set()  # the MixLoRA weights of each wrapped MLP
        for path, module in self.model.named_modules():
            if inside is not None and path.startswith(inside):
                continue
            inside = None
            if path in experts:
                inside = path + "."
                continue
            out[path] = module
            if isinstance(module, MultiLoraLinear):
                inside = path + "."
            elif isinstance(module, MultiMixMLP):
                experts.add(f"{path}.jobs")
        return out

    def _wrap(self, path: str, module: nn.Module) -> MultiLoraLinear:
        if isinstance(module, MultiLoraLinear):
            return module
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapped = MultiLoraLinear(module, self.context)
        setattr(parent, child, wrapped)
        self.linears[path] = wrapped
        return wrapped

    def decoder_layers_path(self) -> str:
        """Module path of the decoder's list of layers: ``model.layers`` for LLaMA, ``transformer.h``
        for Falcon, GPT-J, Bloom and GPT-BigCode, ``transformer.blocks`` for MPT; failing those names,
        the decoder's longest ``nn.ModuleList``.

        Raises:
            TargetError: the decoder has no list of layers.
        """
        decoder = self.model.get_decoder()
        lists = {name: m for name, m in decoder.named_children() if isinstance(m, nn.ModuleList) and len(m)}
        name = next((n for n in DECODER_LAYER_LISTS if n in lists), None)
        if name is None and lists:
            name = max(lists, key=lambda n: len(lists[n]))
        if name is not None:
            for path, module in self.model.named_modules():
                if module is lists[name]:
                    return path
        raise TargetError(f"{self.name or 'the base model'}: cannot find the decoder layers")

    def activation_name(self) -> str:
        """The ACT2FN name of the FFN activation (``config.hidden_act``, ``hidden_activation`` or
        ``activation_function``: GPT-2, GPT-J, GPT-BigCode)."""
        from transformers.activations import ACT2FN

        names = [n for n in (getattr(self.config, a, None) for a in ("hidden_act", "hidden_activation", "activation_function")) if n]
        if not names:
            raise TargetError(f"{self.name or 'the base model'}: config names no hidden activation")
        mlp = getattr(self.model.get_submodule(self.decoder_layers_path())[0], "mlp", None)
        if self.mlps:
            mlp = self.mlps[0].original
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
        for name in names:  # the one the model's MLP really uses
            if name in ACT2FN and act is not None and type(ACT2FN[name]) is type(act):
                return name
        return names[0]

    def wrap_mlps(self) -> dict[int, nn.Module]:
        """Wrap (once) every decoder layer's MLP in a ``MultiMixMLP`` and return them by layer index.

        Its projections (gate/up/down for a gated MLP) are wrapped in ``MultiLoraLinear`` first, so plain LoRA jobs
        and MixLoRA jobs share them and module paths stay as they were.

        Raises:
            MlpStructureError: the MLPs have none of the shapes of ``actors.mixlora.FFN_SHAPES``.
        """
        from actors.mixlora import MultiMixMLP, mlp_of

        if self.mlps:
            return self.mlps
        prefix = self.decoder_layers_path()
        layers = self.model.get_submodule(prefix)
        model_type = getattr(self.config, "model_type", type(self.model).__name__)
        mlps = [mlp_of(layer, model_type) for layer in layers]  # check all before changing any
        for index, (layer, (mlp, shape)) in enumerate(zip(layers, mlps, strict=True)):
            for name in shape.projections:
                self._wrap(f"{prefix}.{index}.mlp.{name}", getattr(mlp, name))
            wrapped = MultiMixMLP(mlp, self.context, index, shape)
            layer.mlp = wrapped
            self.mlps[index] = wrapped
        return self.mlps

    def packing_supported(self, longest: int) -> bool:
        """Whether packed batches give exactly the unpacked attention for sequences up to ``longest``.

        Needs an sdpa/eager attention implementation, no attention-logit soft-capping, and no
        sliding window shorter than ``longest``. Otherwise the engine pads instead.
        """
        config = self.config
        if getattr(config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
            return False
        if getattr(config, "attn_logit_softcapping", None):
            return False
        window = self.sliding_window()
        if window and window < longest:
            return False
        if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
            return False
        if self._packing_exact is None:
            try:
                self._packing_exact = self._probe_packing()
            except Exception as exc:  # a decoder that refuses the packed call (or its keywords): pad
                log.warning("%s: the packing probe failed (%s: %s); batches are padded instead",
                            self.name or "model", type(exc).__name__, exc)  # fmt: skip
                self._packing_exact = False
        return self._packing_exact

    def packing_limit(self) -> int:
        """The longest sequence :meth:`packing_supported` packs: 0 where it never does, the sliding
        window where one applies, else :data:`PACK_ANY_LENGTH`."""
        if not self.packing_supported(1):
            return 0
        return self.sliding_window() or PACK_ANY_LENGTH

    def sliding_window(self) -> int | None:
        """The attention's sliding window where the config turns one on for some layer, else None
        (a Qwen2 config with ``use_sliding_window`` whose ``layer_types`` are all full attention
        limited packing to the window for nothing)."""
        window = getattr(self.config, "sliding_window", None)
        if not window or not getattr(self.config, "use_sliding_window", True):
            return None
        types = getattr(self.config, "layer_types", None)
        if types and not any("sliding" in str(t) for t in types):
            return None
        return int(window)

    def _probe_packing(self) -> bool:
        """Whether packing is exact on this model: one packed forward of two short sequences.

        Packing relies on the sequence bounds reaching every layer's attention through the
        ``cu_seq_lens_q`` keyword. Some decoders drop the keywords on the way (StableLM's layer
        calls its attention without them), or compute attention without transformers' attention
        interface: the sequences would then attend to each other. The probe counts the varlen
        attention calls that received bounds (one per decoder layer, none without); an fp32 model
        must also give, token by token, the hidden states it gives padded (in half precision the
        kernels' own differences would blur that comparison). Where it fails, the engine pads
        (slower, exact) and logs why.
        """
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if vocab < 2:
            return False
        lengths = (3, 5)
        rows = [[(7 * i + 3 * n + 1) % vocab for i in range(n)] for n in lengths]
        device = self.device
        padded = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids = torch.tensor([[t for row in rows for t in row]], device=device)
        positions = torch.tensor([[i for n in lengths for i in range(n)]], device=device)
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        layers = len(self.model.get_submodule(self.decoder_layers_path()))
        before = dict(VARLEN_CALLS)
        with torch.no_grad():
            got = self.hidden_states(ids, None, BatchLayout((), training=False, packed=True),
                                     position_ids=positions, cu_seqlens=cu)  # fmt: skip
            calls = {k: VARLEN_CALLS[k] - before[k] for k in before}
            if calls != {"bounds": layers, "plain": 0}:
                log.warning("%s: %d of %d decoder layers' attention received the packed sequence bounds; batches are "
                            "padded instead", self.name or "model", calls["bounds"], layers)  # fmt: skip
                return False
            if self.dtype != torch.float32:
                return True
            want = self.hidden_states(padded.to(device), mask.to(device),
                                      BatchLayout((), training=False, padding_mask=mask.bool().to(device)))  # fmt: skip
        want = torch.cat([want[i, :n] for i, n in enumerate(lengths)]).float()  # (8, H)
        # per token: a leak shows at the second sequence's tokens whatever the first's look like
        err = float(((got[0].float() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).max())
        if err > 1e-3:
            log.warning("%s: packed sequences do not match padded ones (relative error %.2g); batches are padded "
                        "instead", self.name or "model", err)  # fmt: skip
            return False
        return True

    @contextlib.contextmanager
    def attention(self, implementation: str | None) -> Iterator[None]:
        """Switch the model's attention implementation for one forward (``None``: leave it)."""
        if implementation is None or implementation == self.config._attn_implementation:
            yield
            return
        register_varlen_attention()
        previous = self.config._attn_implementation
        self.config._attn_implementation = implementation
        try:
            yield
        finally:
            self.config._attn_implementation = previous

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layout: BatchLayout,
        *,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (N, L, H) of the fused batch, every layer seeing ``layout``.

        With ``cache`` (a transformers ``Cache``), keys and values are appended to it (decoding).
        With ``cu_seqlens`` ((S+1,) int32), the batch is packed: ``input_ids`` (1, T) holds S
        sequences end to end, ``position_ids`` restart at 0 for each, ``attention_mask`` is
        ``None`` and ``layout.packed`` is set; attention stays within each sequence.
        """
        extra: dict = {}
        implementation = None
        if cu_seqlens is not None:
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            cu = cu_seqlens.cpu()  # read on the host by the attention of every layer: no device sync there
            extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
            implementation = VARLEN_ATTENTION
        self.context.layout = layout
        try:
            decoder = self.model.get_decoder()
            # transformers >= 5.2x names the KV cache argument `cache`; older releases `past_key_values`.
            cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
            with self.attention(implementation):
                out = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=cache is not None,
                    **({cache_arg: cache} if cache is not None else {}),
                    **extra,
                )
        finally:
            self.context.layout = None
        return out.last_hidden_state

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations.

        Gradients are identical: the recomputation sees the same ``BatchLayout`` and attention
        implementation, and every job's dropout generator is rewound to where it stood when the
        layer first ran (then restored), so it draws the same masks.
        """
        layers = self.model.get_submodule(self.decoder_layers_path())
        for layer in layers:
            if "forward" in layer.__dict__:  # our wrapper from an earlier call
                del layer.forward
            if enabled:
                layer.forward = self._checkpointed(layer.forward)
        self.activation_checkpointing = enabled

    def _checkpointed(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            layout = self.context.layout
            if not torch.is_grad_enabled() or layout is None or kwargs.get("use_cache"):
                return forward(*args, **kwargs)
            generators = dict(layout.generators)
            saved = {job: gen.get_state() for job, gen in generators.items()}
            implementation = self.config._attn_implementation
            calls = [0]

            def replayable(*a, **k):
                calls[0] += 1
                if calls[0] == 1:
                    return forward(*a, **k)
                now = {job: gen.get_state() for job, gen in generators.items()}
                for job, gen in generators.items():
                    gen.set_state(saved[job])
                previous, self.context.layout = self.context.layout, layout
                try:
                    with self.attention(implementation):
                        return forward(*a, **k)
                finally:
                    self.context.layout = previous
                    for job, gen in generators.items():
                        gen.set_state(now[job])

            return checkpoint(replayable, *args, use_reentrant=False, **kwargs)

        return run

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states, with the model's own scaling of the logits: Cohere's
        ``logit_scale``, Granite's ``logits_scaling``, Falcon-H1's ``lm_head_multiplier`` and Gemma's
        final soft-capping. :meth:`check_head` verifies the result against the model's forward."""
        logits = self.model.get_output_embeddings()(hidden)
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, int | float) and scale != 1:
            logits = logits * scale
        divisor = getattr(self.config, "logits_scaling", None)
        if isinstance(divisor, int | float) and divisor != 1:
            logits = logits / divisor
        multiplier = getattr(getattr(self.model, "model", None), "lm_head_multiplier", None)
        if isinstance(multiplier, int | float) and multiplier != 1:
            logits = logits * multiplier
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def check_head(self) -> None:
        """Check once, on 6 tokens, that hidden states + :meth:`logits` reproduce the model's logits.

        Raises:
            TargetError: the architecture transforms its logits in a way lorafleet does not
                reproduce (training would optimise a different loss than the model's).
        """
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if vocab < 2 or self.context.layout is not None:
            return
        ids = torch.tensor([[(5 * i + 1) % vocab for i in range(6)]], device=self.device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = self.model(input_ids=ids, attention_mask=mask).logits.float()
            got = self.logits(self.hidden_states(ids, mask, BatchLayout((), training=False,
                                                                        padding_mask=mask.bool()))).float()  # fmt: skip
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        bound = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not err <= bound:
            raise TargetError(
                f"{self.name or 'the base model'} ({type(self.model).__name__}) transforms its output logits in a way "
                f"lorafleet does not reproduce (relative difference {err:.2g}); this architecture is not supported"
            )

    def token_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over label tokens of these rows, and their count.

        Only positions with a label run through the output head (saves the (N, L, V) logits).
        """
        targets = labels[:, 1:]  # (n, L-1)
        keep = targets != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0:
            return hidden.sum() * 0.0, 0
        picked = hidden[:, :-1][keep]  # (T, H)
        logits = self.logits(picked).float()  # (T, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum"), count

    def packed_loss_sums(
        self, hidden: torch.Tensor, labels: torch.Tensor, spans: Iterable[tuple[int, int]]
    ) -> list[tuple[torch.Tensor, int]]:
        """``token_loss_sum`` of each token span of a packed row, with one pass through the output head.

        ``hidden`` (1, T, H), ``labels`` (1, T), best on the CPU (then no device sync); the label of
        each sequence's first token is ``IGNORE_INDEX`` (see ``actors.data.pack``), so no pair crosses
        from one span into the next.
        Under activation checkpointing the head runs on ``loss_chunk`` tokens at a time and is
        recomputed in backward, so the (K, V) logits never exist at once.
        """
        targets = labels[0, 1:]  # (T-1,): target of position t is label t+1
        found = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (K,) increasing, on the labels' device
        # labels on the host (the engine's case) keep every index computation off the GPU's queue
        where = found.to(hidden.device, non_blocking=True)  # (K,)
        losses = hidden.new_zeros(0)
        if where.numel():
            picked = hidden[0, :-1].index_select(0, where)  # (K, H)
            picked_targets = targets.index_select(0, found).to(hidden.device, non_blocking=True)  # (K,)
            if self.activation_checkpointing and torch.is_grad_enabled() and len(where) > self.loss_chunk:
                losses = torch.cat([
                    checkpoint(self._token_losses, h, t, use_reentrant=False)
                    for h, t in zip(picked.split(self.loss_chunk), picked_targets.split(self.loss_chunk), strict=True)
                ])  # (K,)
            else:
                losses = self._token_losses(picked, picked_targets)  # (K,)
        spans = list(spans)
        starts = torch.tensor([start for start, _ in spans] + [spans[-1][1] if spans else 0], device=found.device)
        cuts = torch.searchsorted(found, starts).tolist()  # label positions of span j: [cuts[j], cuts[j+1])
        out = []
        for lo, hi in itertools.pairwise(cuts):
            out.append((losses[lo:hi].sum() if hi > lo else hidden.sum() * 0.0, hi - lo))
        return out

    def _token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each row: hidden (K, H), targets (K,) -> (K,) fp32."""
        return F.cross_entropy(self.logits(hidden).float(), targets, reduction="none")


def _suffix_matches(target: str, paths: Iterable[str]) -> list[str]:
    """The paths that ``target`` names in a list of PEFT ``target_modules``: itself, or ending in ``.target``."""
    return [p for p in paths if p == target or p.endswith("." + target)]


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]
