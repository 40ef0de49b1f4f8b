"""Packed (padding-free) batches, stacked adapter math, activation checkpointing and autocast.

Each engine option must leave the adapters a job gets unchanged: packing and checkpointing
exactly (fp32, dropout on, MixLoRA jitter on), bf16 autocast approximately.
"""

from __future__ import annotations

import pytest
import torch

from actors.config import AdapterSettings, EngineSettings, LoraSettings
from actors.data import IGNORE_INDEX, Example, pack
from actors.engine import FusedEngine
from actors.fused_model import FusedModel
from actors.lora import BatchLayout, ForwardContext, MultiLoraLinear, Segment, apply_segments, stackable
from tests.actors.test_mixlora import _one_thread, examples, job_config, mix_settings, randomize, rel_err  # noqa: F401
from tests.conftest import TEST_DEVICE, make_tiny_llama, make_tokenizer

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



def lora(r: int, dropout: float, *, dora: bool = False, targets=ALL) -> AdapterSettings:
    return AdapterSettings("lora", LoraSettings(r, 2 * r, dropout, use_dora=dora), tuple(targets))


# name, adapter, (min_len, max_len): mixed lengths, ranks, DoRA, dropout everywhere, MixLoRA with jitter
JOBS = [
    ("a", lora(4, 0.1), (3, 12)),
    ("b", lora(8, 0.2, dora=True, targets=("q_proj", "v_proj", "down_proj")), (15, 30)),
    ("m", mix_settings(r=4, dropout=0.1, jitter=0.1), (5, 20)),
    ("c", lora(4, 0.05), (4, 6)),
]


def train(
    tmp_path, settings: EngineSettings, jobs=JOBS, steps: int = 2, loss_chunk: int | None = None
) -> tuple[dict, list[float]]:
    """Every job's parameters after ``steps`` optimizer steps, and every reported loss."""
    engine = FusedEngine(make_tiny_llama(seed=3).to(TEST_DEVICE), make_tokenizer(), settings=settings)
    if loss_chunk is not None:
        engine.fused.loss_chunk = loss_chunk
    for k, (name, adapter, (lo, hi)) in enumerate(jobs):
        config = job_config(name, adapter, tmp_path / name, steps=steps, batch=4, micro=2)
        job = engine.add_job(config, examples=examples(8, k + 10, lo, hi), resume=False)
        randomize(job.adapter, seed=k)
    losses: list[float] = []
    engine.run(lambda result: losses.extend(r.loss for r in result.reports))
    params = {
        f"{name}/{key}": value.detach().clone()
        for name, job in engine.jobs.items()
        for key, value in job.adapter.named_parameters().items()
    }
    return params, losses


# CUDA kernels (sdpa, reductions) group sums differently for packed and padded rows, and Adam turns
# ~1e-7 gradient differences into ~1e-5 parameter ones: a looser bound there, 1e-4 as fused == PEFT.
EXACT = 1e-5 if TEST_DEVICE == "cpu" else 1e-4
IDENTICAL = 1e-6 if TEST_DEVICE == "cpu" else 1e-4


def max_rel_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- packing


def test_pack_lays_sequences_end_to_end_and_cuts_the_loss_at_boundaries():
    first = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [8, 9])]
    second = [Example([10, 11, 12, 13], [10, 11, 12, 13])]
    packed = pack([first, second])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # a sequence's first label is never a target: token 7 must not be trained to predict token 8
    assert packed.labels.tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12, 13]]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert packed.spans == ((0, 5), (5, 9))
    assert packed.reals[0].tolist() == [[True, True, True], [True, True, False]]
    assert packed.reals[1].tolist() == [[True, True, True, True]]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_logits_equal_each_sequence_alone(kv_heads):
    model = make_tiny_llama(seed=5, num_key_value_heads=kv_heads)
    fused = FusedModel(model)
    seqs = [[5, 9, 17, 33, 2], [40, 41, 7, 8, 9, 10, 11, 12, 13], [6, 8, 10, 12, 14, 16, 18, 20, 22], [4, 5, 6]]
    packed = pack([[Example(s, s)] for s in seqs])
    layout = BatchLayout((), training=False, packed=True)
    with torch.no_grad():
        ours = fused.logits(
            fused.hidden_states(packed.input_ids, None, layout, position_ids=packed.position_ids,
                                cu_seqlens=packed.cu_seqlens)
        )[0]  # (T, V)
        # transformers' own packed path: attention_mask None + restarting position ids -> block-diagonal sdpa
        # mask, but only without a KV cache (use_cache defaults to True and then silently attends across sequences)
        theirs = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        leaky = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits[0]  # (T, V)
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])  # (T, V)
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward
    assert rel_err(ours, alone) < 1e-5
    assert rel_err(theirs, alone) < 1e-5
    assert rel_err(leaky, alone) > 1e-2


def test_packed_training_equals_padded_training(tmp_path):
    packed, packed_losses = train(tmp_path / "packed", EngineSettings(packing=True))
    padded, padded_losses = train(tmp_path / "padded", EngineSettings(packing=False))
    err = max_rel_err(packed, padded)
    print(f"packed vs padded: max param rel err {err:.2e}")
    assert err < EXACT
    assert packed_losses == pytest.approx(padded_losses, rel=1e-5)


def test_packed_step_processes_no_pads(tmp_path):
    engine = FusedEngine(make_tiny_llama(seed=3), make_tokenizer())
    for k, (name, adapter, (lo, hi)) in enumerate(JOBS):
        config = job_config(name, adapter, tmp_path / name, steps=5)
        engine.add_job(config, examples=examples(8, k, lo, hi), resume=False)
    result = engine.step()
    assert result.padded_tokens == result.tokens
    engine.settings = EngineSettings(packing=False)
    result = engine.step()
    assert result.padded_tokens > result.tokens  # lengths 3..30 cannot fill rows of the longest


def test_packing_falls_back_to_padding_for_a_short_sliding_window():
    fused = FusedModel(make_tiny_llama(seed=1, sliding_window=8))
    assert fused.packing_supported(8)
    assert not fused.packing_supported(9)


# ---------------------------------------------------------------- stacked adapters


@pytest.mark.parametrize("alphas", [(8, 9, 10), (8, 8, 8)], ids=["per-job-scale", "one-scale"])
def test_stacked_adapters_equal_one_adapter_at_a_time(alphas):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = MultiLoraLinear(base, ForwardContext())
    jobs = ["j0", "j1", "j2"]
    for k, job in enumerate(jobs):
        weights = layer.add_adapter(job, LoraSettings(4, alphas[k], dropout=0.2), torch.Generator().manual_seed(k))
        with torch.no_grad():
            weights.lora_B.normal_()
    segments = tuple(Segment(job, 2 * k, 2 * k + 2, 5) for k, job in enumerate(jobs))
    assert stackable(segments, layer.adapters, 6)
    x = torch.randn(6, 7, 12, requires_grad=True)  # rows beyond length 5 are padding of the fused batch

    def run(stacked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gens = {job: torch.Generator().manual_seed(100 + k) for k, job in enumerate(jobs)}
        layout = BatchLayout(segments, generators=gens)
        base_out = base(x)
        if stacked:
            y = apply_segments(x, base_out, base, layer.adapters, layout)
        else:  # the per-adapter loop, one segment at a time
            y = torch.cat([apply_segments(x, base_out, base, layer.adapters, layout, [seg]) for seg in segments])
        y.square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad] + [x.grad.clone()]
        layer.zero_grad()
        x.grad = None
        return y.detach(), grads

    y_stacked, g_stacked = run(True)
    y_loop, g_loop = run(False)
    assert rel_err(y_stacked, y_loop) < 1e-6
    assert max(rel_err(a, b) for a, b in zip(g_stacked, g_loop, strict=True)) < 1e-5


@pytest.mark.parametrize("per_job_scale", [False, True])
def test_stacked_backward_passes_gradcheck(per_job_scale):
    """The hand-written backward of the stacked update against finite differences (float64)."""
    from actors.lora import _StackedLora

    torch.manual_seed(1)
    n, m, din, dout, r = 3, 4, 5, 6, 2
    args = [torch.randn(n, m, dout, dtype=torch.float64, requires_grad=True),
            torch.randn(n, m, din, dtype=torch.float64, requires_grad=True),
            torch.randn(n, r, din, dtype=torch.float64, requires_grad=True),
            torch.randn(n, dout, r, dtype=torch.float64, requires_grad=True)]  # fmt: skip
    scale = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64).view(n, 1, 1) if per_job_scale else None
    assert torch.autograd.gradcheck(lambda *t: _StackedLora.apply(*t, scale, 1.0 if per_job_scale else 1.7), args)


@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_adapters_over_a_bf16_base(autocast):
    """A bf16 base (the GPU default of ``lorafleet train``) with fp32 adapters, with and without autocast:
    stacked equals one adapter at a time, and every gradient keeps its parameter's dtype."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)  # frozen, as in the engine
    layer = MultiLoraLinear(base, ForwardContext())
    jobs = ["j0", "j1"]
    for k, job in enumerate(jobs):
        weights = layer.add_adapter(job, LoraSettings(4, 8), torch.Generator().manual_seed(k))
        with torch.no_grad():
            weights.lora_B.normal_()
    segments = tuple(Segment(job, 3 * k, 3 * k + 3, 5) for k, job in enumerate(jobs))
    x = torch.randn(6, 5, 16, dtype=torch.bfloat16, requires_grad=True)

    def run(stacked: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layout = BatchLayout(segments)
            base_out = base(x)
            if stacked:
                y = apply_segments(x, base_out, base, layer.adapters, layout)
            else:
                y = torch.cat([apply_segments(x, base_out, base, layer.adapters, layout, [seg]) for seg in segments])
        y.float().square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        assert all(g.dtype == torch.float32 for g in grads) and x.grad.dtype == torch.bfloat16
        layer.zero_grad()
        x.grad = None
        return y.detach().float(), grads

    y_stacked, g_stacked = run(True)
    y_loop, g_loop = run(False)
    assert y_stacked.dtype == y_loop.dtype
    assert rel_err(y_stacked, y_loop) < 2e-2
    assert max(rel_err(a, b) for a, b in zip(g_stacked, g_loop, strict=True)) < 3e-2


def test_unequal_segments_are_not_stacked():
    layer = MultiLoraLinear(torch.nn.Linear(4, 4), ForwardContext())
    layer.add_adapter("a", LoraSettings(2, 4), None)
    layer.add_adapter("b", LoraSettings(2, 4), None)
    layer.add_adapter("c", LoraSettings(3, 4), None)
    assert not stackable((Segment("a", 0, 2), Segment("b", 2, 3)), layer.adapters, 3)  # 2 rows vs 1
    assert not stackable((Segment("a", 0, 2), Segment("c", 2, 4)), layer.adapters, 4)  # rank 2 vs 3
    assert not stackable((Segment("a", 0, 2), Segment("zz", 2, 4)), layer.adapters, 4)  # a row without adapter


# ---------------------------------------------------------------- activation checkpointing, autocast


@pytest.mark.parametrize("packing", [True, False])
def test_activation_checkpointing_gives_identical_training(tmp_path, packing):
    plain, plain_losses = train(tmp_path / "plain", EngineSettings(packing=packing))
    ckpt, ckpt_losses = train(tmp_path / "ckpt", EngineSettings(packing=packing, activation_checkpointing=True))
    err = max_rel_err(ckpt, plain)
    print(f"checkpointing (packing={packing}): max param rel err {err:.2e}")
    assert err < IDENTICAL  # same dropout masks and jitter in the recomputation
    assert ckpt_losses == pytest.approx(plain_losses, rel=IDENTICAL)


def test_chunked_loss_under_checkpointing_gives_identical_training(tmp_path):
    plain, plain_losses = train(tmp_path / "plain", EngineSettings())
    # a step has ~100 label tokens: chunks of 7 give many chunks and a partial one
    ckpt, ckpt_losses = train(tmp_path / "ckpt", EngineSettings(activation_checkpointing=True), loss_chunk=7)
    assert max_rel_err(ckpt, plain) < IDENTICAL
    assert ckpt_losses == pytest.approx(plain_losses, rel=IDENTICAL)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    jobs = [job for job in JOBS if job[0] != "b"]  # DoRA's weight norm in bf16 is a looser match
    fp32, fp32_losses = train(tmp_path / "fp32", EngineSettings(), jobs, steps=1)
    bf16, bf16_losses = train(tmp_path / "bf16", EngineSettings(autocast=True), jobs, steps=1)
    assert all(value.dtype == torch.float32 for value in bf16.values())  # adapters stay fp32
    assert bf16_losses == pytest.approx(fp32_losses, rel=3e-2)
    assert bf16_losses != fp32_losses  # the autocast path really ran in bf16
    err = max_rel_err(bf16, fp32)
    print(f"bf16 autocast vs fp32 after one step: max param rel err {err:.2e}")
    assert err < 1e-1  # Adam's first step is ~lr * sign(grad): tiny gradients that flip sign in bf16 move fully


def test_a_sliding_window_no_layer_uses_does_not_limit_packing():
    """Qwen2 with ``use_sliding_window`` and every layer full attention (``max_window_layers`` at or
    above the layer count): packing was limited to the window; with one sliding layer it still is."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from actors.fused_model import FusedModel

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 use_sliding_window=True, sliding_window=8, num_hidden_layers=2)  # fmt: skip
    assert FusedModel(Qwen2ForCausalLM(Qwen2Config(**small)).eval()).sliding_window() is None
    assert FusedModel(Qwen2ForCausalLM(Qwen2Config(**small, max_window_layers=1)).eval()).sliding_window() == 8
