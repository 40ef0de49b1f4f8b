"""MixLoRA in the fused engine: reference package equality, invariants, fused == alone, eval."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from actors import checkpoint as ckpt
from actors.adapter import AdapterLoadError
from actors.config import (
    AdapterSettings,
    DataSettings,
    EngineSettings,
    JobConfig,
    LoraSettings,
    MixLoraSettings,
    TrainSettings,
)
from actors.data import Example
from actors.engine import FusedEngine
from actors.lora import BatchLayout, Segment
from actors.mixlora import MixLoraJobAdapter, load_balance_loss, route
from tests.conftest import TEST_DEVICE, make_tiny_llama, make_tokenizer, token_records

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + FFN


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and fair on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def examples(n: int, seed: int, lo: int, hi: int) -> list[Example]:
    return [Example(r["input_ids"], r["labels"]) for r in token_records(n, seed, lo, hi)]


def mix_settings(
    *, experts=4, top_k=2, routing="topk", r=4, alpha=8, dropout=0.0, dora=False, rslora=False,
    aux=0.01, jitter=0.0, targets=ALL, init_from=None, z=0.001, capacity=1.0,
) -> AdapterSettings:  # fmt: skip
    lora = LoraSettings(r, alpha, dropout, use_rslora=rslora, use_dora=dora)
    mix = MixLoraSettings(
        num_experts=experts, top_k=top_k, routing=routing, router_aux_loss_coef=aux, jitter_noise=jitter,
        router_z_loss_coef=z, capacity_factor=capacity, expert=lora,
    )  # fmt: skip
    return AdapterSettings("mixlora", lora, tuple(targets), mixlora=mix, init_from=init_from)


def job_config(name, adapter, out, *, steps=3, batch=4, micro=2, lr=1e-2, checkpoint_every=100) -> JobConfig:
    return JobConfig(
        name=name,
        base_model="tiny",
        adapter=adapter,
        data=DataSettings("unused.jsonl", format="tokens", shuffle=False),
        train=TrainSettings(
            max_steps=steps, batch_size=batch, micro_batch_size=micro, learning_rate=lr, warmup_steps=0,
            checkpoint_every=checkpoint_every,
        ),
        output=str(out),
    )


def randomize(adapter, seed: int, router_std: float = 1.0) -> None:
    """Non-zero B, decisive routers, perturbed magnitudes: every term of the math matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters().items():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("moe_gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * router_std)
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(1.0 + 0.1 * torch.rand(p.shape, generator=gen).to(p.device))


def batch_with_pads():
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7, 8, 9], [6, 8, 10, 12, 14, 16, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    return ids, mask


# ---------------------------------------------------------------- the reference package


def reference_logits(mixlora, adapter, base_model: str, out, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Export ``adapter`` to ``out`` as the reference package reads it (a pickled state dict and its
    config), load it with ``mixlora`` over ``base_model`` and return its logits (no dropout)."""
    out.mkdir()
    torch.save({k: v.clone() for k, v in adapter.export_state().items()}, out / "adapter_model.bin")
    (out / "adapter_config.json").write_text(json.dumps(adapter.export_config(base_model)))
    ref, _config = mixlora.MixLoraModelForCausalLM.from_pretrained(str(out))
    ref.eval()
    for layer in ref.model.layers:  # the reference keeps its experts outside the module tree: eval() misses them
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.eval()
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask).logits


def test_reference_package_loads_export_and_gives_our_logits(tmp_path, tiny_model_dir):
    mixlora = pytest.importorskip("mixlora")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = FusedEngine(base, make_tokenizer(), base_model_id=str(tiny_model_dir))
    # lora_dropout > 0: the reference refuses 0; evaluation runs without dropout on both sides
    job = engine.add_job(job_config("m", mix_settings(dropout=0.05), tmp_path / "m"), examples=examples(4, 1, 5, 9))
    randomize(job.adapter, seed=7)
    ids, mask = batch_with_pads()
    want = reference_logits(mixlora, job.adapter, str(tiny_model_dir), tmp_path / "export", ids, mask)
    got = engine.logits("m", ids, mask)
    base_logits = engine.logits(None, ids, mask)
    real = mask.bool()
    err = rel_err(got[real], want[real])
    print(f"reference logits rel err {err:.2e}")
    assert err < 1e-5
    assert rel_err(got[real], base_logits[real]) > 1e-2  # the adapter changes the output a lot


# ---------------------------------------------------------------- invariants


def test_zero_lora_b_gives_base_output():
    engine = FusedEngine(make_tiny_llama(seed=1), make_tokenizer())
    job = engine.add_job(job_config("m", mix_settings(experts=4, top_k=2), "unused"), examples=examples(4, 1, 5, 9))
    with torch.no_grad():
        for name, p in job.adapter.named_parameters().items():
            if "moe_gate" in name:
                p.normal_(0, 1.0)  # decisive routing; B stays zero as initialised
    ids, mask = batch_with_pads()
    real = mask.bool()
    err = rel_err(engine.logits("m", ids, mask)[real], engine.logits(None, ids, mask)[real])
    assert err < 1e-6, err


@pytest.mark.parametrize(("top_k", "dora", "rslora"), [(1, False, False), (2, False, True), (4, False, False), (2, True, False)])
def test_identical_experts_equal_single_lora(top_k, dora, rslora):
    engine = FusedEngine(make_tiny_llama(seed=2), make_tokenizer())
    ex = examples(4, 1, 5, 9)
    lora_settings = LoraSettings(4, 8, 0.0, use_rslora=rslora, use_dora=dora)
    plain = engine.add_job(job_config("l", AdapterSettings("lora", lora_settings, ALL), "u1"), examples=ex)
    mix = engine.add_job(
        job_config("m", mix_settings(experts=4, top_k=top_k, dora=dora, rslora=rslora), "u2"), examples=ex
    )
    randomize(plain.adapter, seed=3)
    randomize(mix.adapter, seed=4)  # routers random, then every expert := the plain LoRA
    adapter: MixLoraJobAdapter = mix.adapter
    with torch.no_grad():
        for path, weights in plain.adapter.modules.items():
            name = path.rsplit(".", 1)[-1]
            if name in FFN:
                layer = int(path.split(".layers.")[1].split(".")[0])
                for expert in adapter.layers[layer].experts:
                    expert[name].load_state_dict(weights.state_dict())
            else:
                adapter.attention[path].load_state_dict(weights.state_dict())
    ids, mask = batch_with_pads()
    real = mask.bool()
    err = rel_err(engine.logits("m", ids, mask)[real], engine.logits("l", ids, mask)[real])
    print(f"identical experts (k={top_k}, dora={dora}) rel err {err:.2e}")
    assert err < 1e-5


def test_aux_loss_is_top_k_for_uniform_routing():
    engine = FusedEngine(make_tiny_llama(seed=1), make_tokenizer())
    for top_k in (1, 2, 3):
        job = engine.add_job(
            job_config(f"m{top_k}", mix_settings(experts=4, top_k=top_k, aux=1.0), "u"), examples=examples(4, 1, 5, 9)
        )
        with torch.no_grad():
            for layer in job.adapter.layers.values():
                layer.router.zero_()
        ids, mask = batch_with_pads()
        layout = BatchLayout((Segment(job.name, 0, 2),), training=True, padding_mask=mask.bool())
        engine.fused.hidden_states(ids, mask, layout)
        assert float(job.adapter.aux_loss(layout).detach()) == pytest.approx(top_k, abs=1e-6)
        engine.remove_job(job.name)


def test_load_balance_loss_equals_mixtral_with_pads():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    layers, batch, length, experts, top_k = 3, 2, 7, 5, 2
    logits = torch.randn(layers, batch * length, experts, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    want = load_balancing_loss_func(tuple(logits), experts, top_k, mask)
    real = mask.reshape(-1).bool()
    ours_logits = torch.cat([lg[real] for lg in logits])
    picks = torch.topk(ours_logits, top_k, dim=-1).indices
    assert float(load_balance_loss(ours_logits, picks)) == pytest.approx(float(want), rel=1e-6)


def naive_weights(logits: torch.Tensor, settings: MixLoraSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (T, E) routing weights, token by token, and the (T,) mask of switch-dropped tokens."""
    probs = torch.softmax(logits, dim=-1)
    dense = torch.zeros_like(probs)
    dropped = torch.zeros(len(probs), dtype=torch.bool)
    taken = [0] * probs.shape[1]
    capacity = math.ceil(settings.capacity_factor * len(probs) / probs.shape[1])
    for t, p in enumerate(probs):
        order = sorted(range(len(p)), key=lambda e: -float(p[e]))
        if settings.routing == "topk":
            chosen = order[: settings.top_k]
        elif settings.routing == "dynamic":
            chosen, mass = [], 0.0
            for e in order:
                if mass >= settings.top_p:
                    break
                chosen.append(e)
                mass += float(p[e])
        else:  # switch
            e = order[0]
            taken[e] += 1
            dense[t, e] = p[e]
            dropped[t] = taken[e] > capacity
            continue
        total = sum(float(p[e]) for e in chosen)
        for e in chosen:
            dense[t, e] = p[e] / total
    return dense, dropped


def merged_linear(x, base, weights):
    """The expert's projection recomputed from merged weights: W + s B A (DoRA: m / ||.|| scaling)."""
    if weights is None:
        return F.linear(x, base.weight)
    merged = base.weight + weights.scaling * weights.lora_B @ weights.lora_A
    if weights.lora_magnitude_vector is not None:
        merged = merged * (weights.lora_magnitude_vector / merged.norm(dim=1))[:, None]
    return F.linear(x, merged)


@pytest.mark.parametrize(
    ("routing", "dora", "targets"),
    [("topk", False, FFN), ("topk", True, ("gate_proj", "down_proj")), ("dynamic", False, FFN), ("switch", False, FFN)],
)
def test_shared_base_path_equals_per_expert_recomputation(routing, dora, targets):
    engine = FusedEngine(make_tiny_llama(seed=5), make_tokenizer())
    ex = examples(4, 1, 5, 9)
    plain = engine.add_job(job_config("l", AdapterSettings("lora", LoraSettings(4, 8), FFN), "u1"), examples=ex)
    settings = mix_settings(experts=4, top_k=2, routing=routing, dora=dora, targets=targets, capacity=0.6)
    mix = engine.add_job(job_config("m", settings, "u2"), examples=ex)
    randomize(plain.adapter, seed=1)
    randomize(mix.adapter, seed=2)
    mlp = engine.fused.mlps[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=gen)  # rows 0-1: plain LoRA job, 2-3: MixLoRA job
    pad = torch.ones(4, 6, dtype=torch.bool)
    pad[3, 4:] = False
    # training=True exercises the switch capacity; dropout and jitter are 0 so nothing random happens
    layout = BatchLayout((Segment("l", 0, 2), Segment("m", 2, 4)), training=True, padding_mask=pad)
    engine.fused.context.layout = layout
    try:
        with torch.no_grad():
            got = mlp(x)
            engine.fused.context.layout = BatchLayout((Segment("l", 0, 2),), training=False)
            want_plain = mlp(x[:2])  # the model's own MLP with the plain LoRA
    finally:
        engine.fused.context.layout = None
    assert rel_err(got[:2], want_plain) < 1e-6
    # the naive MixLoRA: every expert's full FFN from merged weights on every real token
    layer = mix.adapter.layers[0]
    tokens = x[2:][pad[2:]]  # (T, H)
    with torch.no_grad():
        dense, dropped = naive_weights(F.linear(tokens, layer.router), settings.mixlora)
        want = torch.zeros_like(tokens)
        for e, expert in enumerate(layer.experts):
            g = merged_linear(tokens, mlp.gate_proj.base, expert["gate_proj"] if "gate_proj" in expert else None)
            u = merged_linear(tokens, mlp.up_proj.base, expert["up_proj"] if "up_proj" in expert else None)
            d_in = F.silu(g) * u
            y = merged_linear(d_in, mlp.down_proj.base, expert["down_proj"] if "down_proj" in expert else None)
            keep = dense[:, e] * (~dropped)
            want += keep[:, None] * y
        base_ffn = F.linear(F.silu(F.linear(tokens, mlp.gate_proj.base.weight)) * F.linear(tokens, mlp.up_proj.base.weight), mlp.down_proj.base.weight)  # fmt: skip
        want += (dense.sum(dim=1) * dropped)[:, None] * base_ffn
    err = rel_err(got[2:][pad[2:]], want)
    print(f"shared base vs per-expert ({routing}, dora={dora}) rel err {err:.2e}")
    assert err < 1e-5
    assert float(got[3, 4:].abs().max()) == 0.0  # pads are not routed
    if routing == "switch":
        assert bool(dropped.any())  # the capacity limit was exercised


def test_route_shapes_and_capacity():
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    weights, chosen, picks, dropped = route(logits, MixLoraSettings(num_experts=4, routing="switch", capacity_factor=1.0))
    kept = chosen[chosen >= 0]
    assert int(torch.bincount(kept, minlength=4).max()) <= 5
    assert weights.shape == chosen.shape == picks.shape == (20, 1) and dropped.shape == (20,)
    weights, chosen, _, _ = route(logits, MixLoraSettings(num_experts=4, routing="dynamic", top_p=0.5))
    assert torch.allclose(weights.sum(-1), torch.ones(20))
    assert bool((chosen[:, 0] >= 0).all())


# ---------------------------------------------------------------- training: fused beside LoRA jobs == alone

VARIANTS = {
    # name: (MixLoRA settings kwargs, uses init_from)
    "topk-attn-ffn": (dict(targets=ALL, aux=0.05), True),
    "dynamic-dora-dropout-jitter": (
        dict(targets=FFN, routing="dynamic", dora=True, dropout=0.1, jitter=0.1, aux=0.05), False,
    ),
    "switch-rslora-dropout": (dict(targets=("up_proj", "down_proj"), routing="switch", rslora=True, dropout=0.1), False),
}  # fmt: skip


def _train(base, tmp, jobs, tag):
    engine = FusedEngine(copy.deepcopy(base).to(TEST_DEVICE), make_tokenizer(), base_model_id="tiny")
    for name, adapter, ex, kwargs in jobs:
        engine.add_job(job_config(name, adapter, tmp / f"{tag}-{name}", **kwargs), examples=ex)
    engine.run()
    return engine


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixlora_fused_beside_lora_jobs_equals_alone(tmp_path, variant):
    base = make_tiny_llama(seed=3)
    kwargs, use_init = VARIANTS[variant]
    init_from = None
    if use_init:  # start from an exported adapter with non-zero B (also covers init_from)
        engine = FusedEngine(copy.deepcopy(base).to(TEST_DEVICE), make_tokenizer(), base_model_id="tiny")
        seed_job = engine.add_job(job_config("s", mix_settings(**kwargs), tmp_path / "s"), examples=examples(4, 1, 5, 9))
        randomize(seed_job.adapter, seed=11, router_std=0.5)
        init_from = str(ckpt.write_adapter(tmp_path / "init", seed_job.adapter.export_state(),
                                           seed_job.adapter.export_config("tiny")))  # fmt: skip
    mix = ("m", mix_settings(**kwargs, init_from=init_from), examples(12, 20, 4, 14), dict(steps=3, batch=4, micro=2))
    others = [
        ("a", AdapterSettings("lora", LoraSettings(4, 8), ("q_proj", "v_proj")), examples(6, 21, 10, 25),
         dict(steps=3, batch=2, micro=1, lr=5e-3)),
        ("b", AdapterSettings("lora", LoraSettings(2, 4, 0.1), ALL), examples(12, 22, 3, 8),
         dict(steps=2, batch=4, micro=4, lr=5e-3)),
    ]  # fmt: skip
    fused = _train(base, tmp_path, [others[0], mix, others[1]], "fused")
    alone = _train(base, tmp_path, [mix], "alone")
    _train(base, tmp_path, [others[1]], "alone")  # a LoRA job with dropout on down_proj beside MixLoRA rows
    lora_got, lora_want = (ckpt.read_adapter(tmp_path / f"{t}-b")[0] for t in ("fused", "alone"))
    assert max(rel_err(lora_got[k], lora_want[k]) for k in lora_want) < 1e-4
    got = ckpt.read_adapter(tmp_path / "fused-m")[0]
    want = ckpt.read_adapter(tmp_path / "alone-m")[0]
    assert set(got) == set(want)
    worst = max(rel_err(got[k], want[k]) for k in want)
    start = {k: v.detach().clone() for k, v in fused.jobs["m"].adapter.export_state().items()}  # final = got
    print(f"{variant}: max rel err fused vs alone {worst:.2e}")
    assert worst < 1e-4
    # training moved the weights far beyond the tolerance
    init = ckpt.read_adapter(init_from)[0] if init_from else None
    moved_keys = [k for k in want if "lora_B" in k or "moe_gate" in k]
    if init is not None:
        assert max(rel_err(want[k], init[k]) for k in moved_keys) > 1e-3
    else:
        assert max(float(want[k].abs().max()) for k in moved_keys if "lora_B" in k) > 1e-4
    assert start.keys() == got.keys()
    metrics = [json.loads(line) for line in (tmp_path / "fused-m" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all("aux_loss" in m and "router_balance" in m for m in metrics)
    load = metrics[-1]["expert_load"]
    assert len(load) == 2 and all(abs(sum(row) - 1.0) < 1e-3 for row in load)
    assert alone.jobs["m"].last_loss == pytest.approx(fused.jobs["m"].last_loss, rel=1e-4)


def test_mixlora_resume_equals_uninterrupted(tmp_path):
    base = make_tiny_llama(seed=4)
    ex = examples(16, 30, 4, 12)
    settings = mix_settings(targets=("q_proj", *FFN), aux=0.05)

    def config(out):
        return job_config("m", settings, out, steps=4, batch=4, micro=2, checkpoint_every=2)

    whole = FusedEngine(copy.deepcopy(base), make_tokenizer())
    whole.add_job(config(tmp_path / "whole"), examples=ex)
    whole.run()
    first = FusedEngine(copy.deepcopy(base), make_tokenizer())
    job = first.add_job(config(tmp_path / "split"), examples=ex)
    while job.step < 3:  # checkpoint at step 2, then one step that is thrown away
        first.step()
    second = FusedEngine(copy.deepcopy(base), make_tokenizer())
    resumed = second.add_job(config(tmp_path / "split"), examples=ex)
    assert resumed.step == 2
    second.run()
    got = ckpt.read_adapter(tmp_path / "split")[0]
    want = ckpt.read_adapter(tmp_path / "whole")[0]
    assert max(rel_err(got[k], want[k]) for k in want) < 1e-5


# ---------------------------------------------------------------- evaluation


def _export(engine, name, adapter, directory, seed):
    job = engine.add_job(job_config(name, adapter, directory), examples=examples(4, 1, 5, 9))
    randomize(job.adapter, seed=seed)
    out = ckpt.write_adapter(directory, job.adapter.export_state(), job.adapter.export_config("tiny"))
    engine.remove_job(name)
    return out


def test_fused_multi_adapter_eval_equals_one_by_one(tmp_path):
    base = make_tiny_llama(seed=6)
    maker = FusedEngine(copy.deepcopy(base), make_tokenizer())
    lora_dir = _export(maker, "l", AdapterSettings("lora", LoraSettings(4, 8, use_dora=True), ALL), tmp_path / "l", 1)
    mix_dir = _export(maker, "m", mix_settings(targets=("q_proj", "v_proj", *FFN)), tmp_path / "m", 2)
    switch_dir = _export(maker, "s", mix_settings(routing="switch", targets=FFN, capacity=0.5), tmp_path / "s", 3)
    data = examples(11, 40, 4, 16)

    engine = FusedEngine(copy.deepcopy(base), make_tokenizer())
    for name, directory in (("l", lora_dir), ("m", mix_dir), ("s", switch_dir)):
        engine.attach_adapter(name, directory)
    fused = engine.evaluate(["l", "m", None, "s"], data, micro_batch_size=3)
    for name, (loss, tokens) in zip(["l", "m", None, "s"], fused, strict=True):
        alone_loss, alone_tokens = engine.evaluate([name], data, micro_batch_size=5)[0]
        assert tokens == alone_tokens
        assert abs(loss - alone_loss) / alone_loss < 1e-5, name
    assert len({round(loss, 4) for loss, _ in fused}) == 4  # the adapters really differ
    # an exported MixLoRA adapter gives the same loss as the live training job it came from
    check = FusedEngine(copy.deepcopy(base), make_tokenizer())
    job = check.add_job(job_config("m", mix_settings(targets=("q_proj", "v_proj", *FFN), init_from=str(mix_dir)),
                                   tmp_path / "x"), examples=data)  # fmt: skip
    assert check.evaluate([job.name], data, 4)[0][0] == pytest.approx(fused[1][0], rel=1e-5)


def test_attach_errors(tmp_path):
    maker = FusedEngine(make_tiny_llama(seed=6), make_tokenizer())
    mix_dir = _export(maker, "m", mix_settings(), tmp_path / "m", 2)
    other = FusedEngine(make_tiny_llama(seed=6, hidden_size=48, intermediate_size=64), make_tokenizer())
    with pytest.raises(AdapterLoadError, match="shape"):
        other.attach_adapter("m", mix_dir)
    assert not other.fused.mlps[0].jobs  # nothing stays attached
    with pytest.raises(FileNotFoundError):
        other.attach_adapter("x", tmp_path / "missing")


def _step_records(engine, job_name: str) -> list:
    """The router records of ``job_name`` from the next fused step (aux_loss reads them)."""
    seen = []
    adapter = engine.jobs[job_name].adapter
    original = adapter.aux_loss

    def spy(layout):
        seen.extend(layout.aux.get(job_name) or [])
        return original(layout)

    adapter.aux_loss = spy
    engine.step()
    adapter.aux_loss = original
    return seen


def test_dynamic_routing_with_a_different_width_per_layer_trains(tmp_path):
    """Decisive routers keep a different number of experts per layer: the aux loss concatenated the
    layers' picks and the step failed ("Sizes of tensors must match")."""
    engine = FusedEngine(copy.deepcopy(make_tiny_llama(seed=2)), make_tokenizer())
    job = engine.add_job(job_config("d", mix_settings(experts=8, routing="dynamic", targets=FFN), tmp_path / "d",
                                    steps=2, batch=2, micro=2), examples=examples(4, 1, 6, 10))  # fmt: skip
    params = job.adapter.named_parameters()
    with torch.no_grad():  # layer 0 decisive (one expert reaches top_p), layer 1 uniform (seven needed)
        params["mixlora.layers.0.mlp.moe_gate.weight"].normal_(0.0, 20.0, generator=torch.Generator().manual_seed(1))
        params["mixlora.layers.1.mlp.moe_gate.weight"].zero_()
    records = _step_records(engine, "d")
    assert len({r.picks.shape[1] for r in records}) > 1  # the case: layers of different widths
    assert job.error is None and job.step == 1
    logits = torch.cat([r.logits for r in records]).detach()
    probs, counts = torch.softmax(logits, -1).mean(0), torch.zeros(8)
    for r in records:
        for e in r.picks[r.picks >= 0].tolist():
            counts[e] += 1
    want = 8 * float((counts / logits.shape[0] * probs).sum())  # E * sum_e f_e P_e over all layers' tokens
    got = json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[0])["router_balance"]
    assert got == pytest.approx(want, rel=1e-5)


def test_the_router_runs_in_fp32_under_autocast(tmp_path):
    """With ``autocast`` (the GPU setting) the router's logits were bf16: top-2 sets and the
    load-balance loss changed."""
    base = make_tiny_llama(seed=2)
    logits = {}
    for autocast in (False, True):
        engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), settings=EngineSettings(autocast=autocast))
        job = engine.add_job(job_config("m", mix_settings(experts=8, targets=FFN), tmp_path / f"m{autocast}",
                                        steps=1, batch=2, micro=2), examples=examples(4, 1, 6, 10))  # fmt: skip
        randomize(job.adapter, 3, router_std=0.02)
        logits[autocast] = [r.logits.detach() for r in _step_records(engine, "m")]
    assert all(t.dtype == torch.float32 for t in logits[True])
    for plain, auto in zip(logits[False], logits[True], strict=True):
        assert rel_err(auto, plain) < 1e-2  # the router's input is the bf16 hidden state; the GEMM is fp32
    assert [torch.topk(a, 2).indices.sort(-1).values.tolist() for a in logits[True]] == [
        torch.topk(p, 2).indices.sort(-1).values.tolist() for p in logits[False]]


def test_an_idle_dora_expert_is_stepped_like_an_idle_lora_expert(tmp_path):
    """MoE-PEFT runs every expert, idle ones on no token: a zero gradient, so AdamW keeps moving them
    with their momentum. DoRA experts skipped the idle ones (no gradient: AdamW left them as they were)."""
    moved = {}
    for dora in (False, True):
        engine = FusedEngine(copy.deepcopy(make_tiny_llama(seed=3)), make_tokenizer())
        job = engine.add_job(job_config("m", mix_settings(experts=8, top_k=1, dora=dora, targets=FFN), tmp_path / f"{dora}",
                                        steps=4, batch=1, micro=1), examples=examples(8, 3, 4, 6))  # fmt: skip
        randomize(job.adapter, 1, router_std=1.0)
        params = job.adapter.named_parameters()
        used = {r.layer: set(r.picks.flatten().tolist()) for r in _step_records(engine, "m")}
        before = {k: v.detach().clone() for k, v in params.items()}
        now = {r.layer: set(r.picks.flatten().tolist()) for r in _step_records(engine, "m")}
        idle = sorted(used[0] - now[0])  # used in step 1 (momentum), idle in step 2
        assert idle, "the case needs an expert idle in step 2"
        key = f"mixlora.layers.0.mlp.up_proj.experts.{idle[0]}.lora_B.weight"
        moved[dora] = float((params[key] - before[key]).abs().max())
    assert moved[False] > 1e-3 and moved[True] > 1e-3  # DoRA: was 0.0


@pytest.mark.parametrize(
    "adapter",
    [AdapterSettings("lora", LoraSettings(4, 8), ALL), AdapterSettings("lora", LoraSettings(4, 8, dropout=0.1), ALL),
     mix_settings(aux=0.0), mix_settings(aux=0.05), mix_settings(routing="switch", aux=0.0, z=0.0, capacity=1.0)],
    ids=["lora", "lora-dropout", "topk-no-aux", "topk-aux", "switch"],
)
def test_micro_batch_dependence_says_when_a_smaller_micro_batch_changes_the_steps(tmp_path, adapter):
    """What the controller's OOM back-off and a resume at another micro_batch_size promise: the same
    adapter at any micro-batch, unless ``micro_batch_dependence`` names why not (dropout masks, MixLoRA's
    router losses)."""
    import dataclasses

    base = make_tiny_llama(seed=5)
    ex = examples(12, 40, 4, 14)
    engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), base_model_id="tiny")
    init = _export(engine, "s", adapter, tmp_path / "init", seed=13)  # non-zero B: the routers get real gradients
    adapter = dataclasses.replace(adapter, init_from=str(init))
    got = {}
    for micro in (4, 2, 1):  # SGD: Adam would turn float noise in near-zero gradients into lr-sized steps
        config = job_config("m", adapter, tmp_path / f"micro{micro}", steps=3, batch=4, micro=micro, lr=0.1)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, optimizer="sgd"))
        engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), base_model_id="tiny")
        engine.add_job(config, examples=ex)
        engine.run()
        got[micro] = ckpt.read_adapter(tmp_path / f"micro{micro}")[0]
    start = ckpt.read_adapter(init)[0]
    assert max(rel_err(got[4][k], start[k]) for k in start) > 0.03  # the steps moved the adapter
    diff = max(rel_err(got[m][k], got[4][k]) for m in (2, 1) for k in got[4])
    if adapter.micro_batch_dependence() is None:
        assert diff < 1e-6  # measured 5e-8
    else:
        assert diff > 1e-3  # measured 1.6e-2 (load-balance loss 0.05), 2.6e-2 (switch), dropout: see the test


def test_a_mixlora_resume_at_another_micro_batch_warns(tmp_path, caplog):
    base = make_tiny_llama(seed=4)
    ex = examples(16, 30, 4, 12)
    settings = mix_settings(targets=("q_proj", *FFN), aux=0.05)
    first = FusedEngine(copy.deepcopy(base), make_tokenizer())
    job = first.add_job(job_config("m", settings, tmp_path, steps=4, micro=2, checkpoint_every=2), examples=ex)
    while job.step < 2:
        first.step()
    with caplog.at_level("WARNING", logger="actors.job"):
        resumed = FusedEngine(copy.deepcopy(base), make_tokenizer()).add_job(
            job_config("m", settings, tmp_path, steps=4, micro=1, checkpoint_every=2), examples=ex)
    assert resumed.step == 2
    assert "resuming at train.micro_batch_size 1 (was 2 at" in caplog.text and "load-balance" in caplog.text
