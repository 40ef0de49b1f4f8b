"""Fused training equals PEFT alone on decoder families other than LLaMA (tiny random models).

Each family is built from its transformers config at toy size. Two LoRA jobs train fused (one on
every linear layer of the decoder, one on two of them) and each must match the same job trained
alone with PEFT. The families cover what differs from LLaMA: biases on q/k/v (Qwen2), fused qkv
and gate_up projections (Phi-3), GELU MLPs with LayerNorm (Phi, GPT-NeoX, StarCoder2), sliding
windows and soft-capping (Gemma 2/3), a decoder layer that does not pass the packed sequence
bounds to attention (StableLM: the engine detects it and pads), scaled output logits
(Cohere's ``logit_scale``, Granite's ``logits_scaling``), and decoders that keep their layers under
``h`` with their own config names (Falcon and Bloom: fused qkv, no packed bounds; GPT-J, GPT-BigCode).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from actors.config import AdapterSettings, LoraSettings
from actors.engine import FusedEngine
from actors.fused_model import FusedModel, TargetError
from tests.actors.test_fused_vs_peft import rel_err, train_alone_with_peft, train_fused
from tests.conftest import make_tokenizer

pytest.importorskip("peft")

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    "qwen2": {},
    "mistral": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 4},  # eager attention: transformers has no sdpa for it
    "gemma3_text": {"head_dim": 8, "sliding_window": 4},
    "phi3": {"pad_token_id": 0},
    "phi": {},
    "gpt_neox": {},
    "starcoder2": {},
    "olmo2": {},
    "stablelm": {},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
    "falcon": {},
    "bloom": {},
    "gptj": {},
    "gpt_bigcode": {},
}
#: families whose configs take their own names, not SMALL's (their layers are ``transformer.h``)
OWN_CONFIG = {
    "falcon": dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, alibi=False),
    "bloom": dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4),
    "gptj": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256),
    "gpt_bigcode": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


def make_model(family: str, seed: int = 3) -> torch.nn.Module:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = {**OWN_CONFIG[family], "tie_word_embeddings": False} if family in OWN_CONFIG else SMALL
    config = CONFIG_MAPPING[family](**{**kwargs, **FAMILIES[family]})
    config._attn_implementation = "eager" if family in ("gemma2", "bloom") else "sdpa"  # no sdpa in transformers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model


def decoder_linears(model: torch.nn.Module) -> tuple[str, ...]:
    """Last name components of the decoder layers' linear layers (every adapter target there is)."""
    layers = FusedModel(model).decoder_layers_path()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith(layers + ".")}  # fmt: skip
    return tuple(sorted(names))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_lora_equals_peft_alone(family, tmp_path):
    base = make_model(family)
    targets = decoder_linears(base)
    assert len(targets) >= 3, targets  # GPT-BigCode: c_attn, c_fc, c_proj (attention's and the MLP's)
    # name, r, alpha, targets, lr, optimizer, scheduler, lengths, batch, micro, clip, rslora, dora
    jobs = [("a", 4, 8, targets, 5e-3, "adamw", "constant", (6, 12), 4, 2, None, False, False),
            ("b", 2, 4, targets[:2], 3e-3, "adamw", "linear", (10, 20), 4, 4, 1.0, False, False)]  # fmt: skip
    _engine, setups = train_fused(tmp_path, base, jobs, family)
    for job, init, examples, cfg in setups:
        _model, ref = train_alone_with_peft(base, init, examples, job)
        ours = load_file(f"{cfg.output}/adapter_model.safetensors")
        assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:4]
        for key, want in ref.items():
            assert rel_err(ours[key], want) < 1e-4, (family, job[0], key)
        start = load_file(f"{init}/adapter_model.safetensors")
        assert max(rel_err(ref[k], start[k]) for k in ref if "lora_B" in k) > 1e-3  # training moved the weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_falls_back_where_the_decoder_drops_the_sequence_bounds(dtype):
    # StableLM's decoder layer calls attention without the keywords that carry cu_seq_lens, so
    # packed sequences would attend to each other: the probe sees it and the engine pads. In
    # bf16 the probe rests on counting the attention calls that got the bounds.
    assert FusedModel(make_model("stablelm").to(dtype)).packing_supported(16) is False
    assert FusedModel(make_model("qwen2").to(dtype)).packing_supported(16) is True
    # Falcon and Bloom (layers under `h`) compute attention without the bounds too: found, padded
    assert FusedModel(make_model("falcon").to(dtype)).packing_supported(16) is False
    assert FusedModel(make_model("bloom").to(dtype)).packing_supported(16) is False
    assert FusedModel(make_model("gptj").to(dtype)).packing_supported(16) is True


def test_decoder_layers_are_found_under_other_names():
    falcon = FusedModel(make_model("falcon"))
    assert falcon.decoder_layers_path() == "transformer.h"
    assert falcon.expand_targets(("all-linear",)) == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    assert FusedModel(make_model("qwen2")).decoder_layers_path() == "model.layers"
    no_list = make_model("qwen2")
    no_list.model.layers = torch.nn.Sequential(*no_list.model.layers)  # no ModuleList anywhere: refused
    with pytest.raises(TargetError, match="cannot find the decoder layers"):
        FusedModel(no_list).decoder_layers_path()


def test_a_packing_probe_that_raises_makes_the_engine_pad(caplog):
    model = FusedModel(make_model("qwen2"))

    def refuses(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cu_seq_lens_q'")

    model._probe_packing = refuses
    assert model.packing_supported(16) is False
    assert "packing probe failed (TypeError" in caplog.text


def test_an_output_head_the_loss_does_not_reproduce_is_refused():
    model = make_model("qwen2")
    forward = model.forward

    def doubled(*args, **kwargs):  # a model that scales its logits in its own forward, unknown to us
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(TargetError, match="transforms its output logits"):
        FusedEngine(model, make_tokenizer(), base_model_id="odd")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gemma2", "phi3", "phi"])
def test_mixlora_export_gives_the_reference_packages_logits(family, tmp_path):
    """The ``mixlora`` package (which supports these families) loads our MixLoRA export on each
    and computes the logits our engine computes: experts on every MLP projection (gate/up/down,
    Phi-3's fused gate_up/down, Phi's fc1/fc2) and plain LoRA on every attention linear."""
    mixlora = pytest.importorskip("mixlora")

    from tests.actors.test_mixlora import (
        batch_with_pads,
        job_config,
        mix_settings,
        randomize,
        reference_logits,
    )
    from tests.actors.test_mixlora import examples as token_examples

    base_dir = tmp_path / family
    make_model(family).save_pretrained(base_dir)
    make_tokenizer().save_pretrained(base_dir)
    model = make_model(family)
    targets = decoder_linears(model)
    engine = FusedEngine(model, make_tokenizer(), base_model_id=str(base_dir))
    # lora_dropout > 0: the reference refuses 0; evaluation runs without dropout on both sides
    settings = mix_settings(dropout=0.05, targets=targets)
    job = engine.add_job(job_config("m", settings, tmp_path / "m"), examples=token_examples(4, 1, 5, 9))
    assert {k.split(".experts.")[0].rsplit(".", 1)[-1] for k in job.adapter.export_state() if ".experts." in k} == {
        t for t in targets if t in job.adapter.ffn_projections}
    randomize(job.adapter, seed=7)
    ids, mask = batch_with_pads()
    want = reference_logits(mixlora, job.adapter, str(base_dir), tmp_path / "export", ids, mask)
    got = engine.logits("m", ids, mask)
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-5, family
    assert rel_err(got[real], engine.logits(None, ids, mask)[real]) > 1e-2  # the adapter matters


def test_loader_falls_back_to_eager_attention_where_there_is_no_sdpa(tmp_path):
    from actors.models import load_base_model

    make_model("gemma2").save_pretrained(tmp_path)  # transformers 5 has no sdpa path for Gemma 2
    make_tokenizer().save_pretrained(tmp_path)
    model, _tok = load_base_model(str(tmp_path))
    assert model.config._attn_implementation == "eager"
    engine = FusedEngine(model, make_tokenizer(), base_model_id="gemma2")
    assert engine.fused.packing_supported(8) is False  # attention soft-capping: padded batches


@pytest.mark.parametrize(("family", "dora"), [("phi3", False), ("phi", False), ("phi3", True)])
def test_mixlora_fused_beside_lora_equals_alone_on_other_mlp_shapes(family, dora, tmp_path):
    """Phi-3's fused gate_up MLP and Phi's fc1/fc2 MLP: a MixLoRA job (experts on the MLP, LoRA on
    attention) trained beside a plain LoRA job on every linear gives the adapter it gives alone,
    and so does the LoRA job (its rows take the plain-MLP path around the MixLoRA rows)."""
    from actors import checkpoint as ckpt
    from tests.actors.test_mixlora import examples as token_examples
    from tests.actors.test_mixlora import job_config, mix_settings

    base = make_model(family)
    targets = decoder_linears(base)
    mix = ("m", mix_settings(targets=targets, dropout=0.1, dora=dora, aux=0.05), token_examples(12, 20, 4, 14),
           dict(steps=3, batch=4, micro=2))  # fmt: skip
    lora = ("b", AdapterSettings("lora", LoraSettings(2, 4, 0.1), targets), token_examples(12, 22, 3, 8),
            dict(steps=2, batch=4, micro=4, lr=5e-3))  # fmt: skip

    def train(jobs, tag):
        engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), base_model_id=family)
        for name, adapter, ex, kwargs in jobs:
            engine.add_job(job_config(name, adapter, tmp_path / f"{tag}-{name}", **kwargs), examples=ex)
        engine.run()

    train([mix, lora], "fused")
    train([mix], "alone")
    train([lora], "alone")
    for name in ("m", "b"):
        got = ckpt.read_adapter(tmp_path / f"fused-{name}")[0]
        want = ckpt.read_adapter(tmp_path / f"alone-{name}")[0]
        assert set(got) == set(want)
        assert max(rel_err(got[k], want[k]) for k in want) < 1e-4, name
    want = ckpt.read_adapter(tmp_path / "alone-m")[0]
    assert max(float(want[k].abs().max()) for k in want if "lora_B" in k) > 1e-4  # training moved B off zero


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
def test_all_linear_targets_every_decoder_linear_by_the_models_own_names(family, tmp_path):
    """``target_modules: [all-linear]`` (as in PEFT) trains the same adapter as naming every decoder
    linear, exports the real names (PEFT loads them), and works for MixLoRA too."""
    import json

    from tests.actors.test_mixlora import examples as token_examples
    from tests.actors.test_mixlora import job_config, mix_settings

    base = make_model(family)
    names = decoder_linears(base)
    engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), base_model_id=family)
    ex = token_examples(8, 3, 4, 12)
    for tag, targets in (("all", ("all-linear",)), ("named", names)):
        adapter = AdapterSettings("lora", LoraSettings(4, 8), targets)
        engine.add_job(job_config(tag, adapter, tmp_path / tag, steps=2, batch=4, micro=2), examples=ex)
    mix = engine.add_job(job_config("mix", mix_settings(targets=("all-linear",)), tmp_path / "mix", steps=2),
                         examples=ex)  # fmt: skip
    engine.run()
    assert sorted(engine.jobs["all"].config.adapter.target_modules) == sorted(names)
    exported = json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    assert exported == sorted(names)
    got, want = (load_file(tmp_path / t / "adapter_model.safetensors") for t in ("all", "named"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert set(json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["target_modules"]) == set(names)
    assert any(".experts." in k for k in mix.adapter.export_state())


@pytest.mark.parametrize("family", ["falcon", "bloom", "gptj", "gpt_bigcode", "gemma2", "qwen2", "stablelm",
                                    "gemma3_text"])  # fmt: skip
def test_a_worker_loads_the_family_and_reports_its_shape(family, tmp_path):
    """The worker read ``cfg.intermediate_size`` and failed to load Falcon, Bloom, GPT-J and GPT-BigCode
    (their configs name it ``ffn_hidden_size`` / ``n_inner`` or leave it out); the controller then
    sized their jobs with a 135M fallback shape. The report is what the memory model reads."""
    import time

    from actors.worker import TrainingWorker
    from policies.memory_model import ModelShape

    model = make_model(family)
    model.save_pretrained(tmp_path / family)
    make_tokenizer().save_pretrained(tmp_path / family)
    worker = TrainingWorker(f"w-{family}", str(tmp_path / family), device="cpu", profile="off")
    try:
        deadline = time.time() + 120
        while worker.progress()["state"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        snap = worker.progress()
        assert snap["state"] == "ready", snap.get("error")
        shape = ModelShape(**snap["model_shape"])  # the controller builds it so
        cfg = model.config
        assert shape.num_parameters == sum(p.numel() for p in model.parameters())
        assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads) == (
            cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads)  # fmt: skip
        mlp = max(m.out_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in (
                      "dense_h_to_4h", "fc_in", "c_fc", "up_proj", "gate_up_proj"))  # fmt: skip
        assert shape.intermediate_size == (mlp // 2 if family == "phi3" else mlp)
        want_kv = {"falcon": 1, "gpt_bigcode": 1}.get(family, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        assert shape.kv_heads == want_kv
        assert shape.eager_attention == (family in ("gemma2", "bloom"))
        # where the engine pads, the memory model counts sdpa's copy of the padding mask per layer
        assert shape.packing_max_len == snap["packing_max_len"] == worker.engine.packing_max_len
        from policies.memory_model import PACK_ANY_LENGTH, padded_mask_bytes

        pads = shape.packing_max_len < PACK_ANY_LENGTH and not shape.eager_attention
        assert padded_mask_bytes(shape) == (cfg.num_hidden_layers * 4 if pads else 0.0)
    finally:
        worker.shutdown(checkpoint=False)


def saved_tensor_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward over one forward (each storage once, weights excluded)."""
    weights = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in seen and t.data_ptr() not in weights:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(inputs_embeds=embeds).logits
    return total, logits


@pytest.mark.parametrize("family", ["phi", "gptj"])
def test_tanh_gelu_runs_as_one_kernel_keeping_three_fewer_intermediate_tensors(family):
    """``gelu_new`` as transformers writes it keeps 4 intermediate-wide tensors per token per layer for
    backward; the engine runs the same formula as one kernel, which keeps its input only."""
    from transformers.activations import NewGELUActivation

    base = make_model(family)
    assert any(isinstance(m, NewGELUActivation) for m in base.modules())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    before, want = saved_tensor_bytes(base, ids)
    fused = FusedModel(copy.deepcopy(base))
    after, got = saved_tensor_bytes(fused.model, ids)
    cfg = base.config
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
    assert before - after == 3 * inter * 4 * ids.numel() * cfg.num_hidden_layers
    assert (got - want).abs().max().item() < 1e-5
    assert fused.activation_name() == "gelu_new"  # the module keeps its class


def moe_job(tmp_path, name: str, targets: tuple[str, ...]):
    from actors.config import DataSettings, JobConfig, TrainSettings
    from tests.conftest import token_records, write_jsonl

    data = write_jsonl(tmp_path / f"{name}.jsonl", token_records(12, seed=4, min_len=5, max_len=14))
    return JobConfig(name=name, base_model="moe",
                     adapter=AdapterSettings("lora", LoraSettings(4, 8, 0.0), targets),
                     data=DataSettings(str(data), format="tokens", shuffle=False),
                     train=TrainSettings(max_steps=3, batch_size=4, micro_batch_size=2, learning_rate=5e-2,
                                         checkpoint_every=100),
                     output=str(tmp_path / f"out-{name}"))  # fmt: skip


def test_lora_on_a_linear_fed_flattened_tokens_pads_and_evaluates_as_it_packs(tmp_path):
    """Qwen2-MoE's shared expert runs on the batch's tokens flattened to (N * L, H): its adapters must
    reach each job's own tokens on padded batches (training with packing off, evaluation) too."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from actors.config import EngineSettings

    config = Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16)  # fmt: skip
    torch.manual_seed(3)
    base = Qwen2MoeForCausalLM(config).eval()
    targets = ("q_proj", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")
    adapters = {}
    for packing in (True, False):
        engine = FusedEngine(copy.deepcopy(base), make_tokenizer(), base_model_id="moe",
                             settings=EngineSettings(packing=packing))  # fmt: skip
        cfg = moe_job(tmp_path / str(packing), "a", targets)
        engine.add_job(cfg)
        engine.run()
        assert engine.jobs["a"].error is None, engine.jobs["a"].error
        adapters[packing] = load_file(f"{cfg.output}/adapter_model.safetensors")
    assert any("shared_expert.down_proj" in k for k in adapters[True])
    for key, want in adapters[True].items():
        assert rel_err(adapters[False][key], want) < 1e-5, key
    # evaluation (padded rows) gives the logits of the adapter merged into the weights
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key in (k for k in adapters[False] if k.endswith("lora_A.weight")):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            merged.get_submodule(path).weight += 2.0 * adapters[False][key.replace("lora_A", "lora_B")] @ adapters[False][key]
    ids = torch.tensor([[5, 9, 17, 33, 12, 40, 41, 7], [6, 8, 10, 12, 14, 16, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    with torch.no_grad():
        want = merged(input_ids=ids, attention_mask=mask).logits
        got = engine.logits("a", ids, mask)
        plain = engine.logits(None, ids, mask)
    real = mask.bool()
    assert rel_err(plain[real], want[real]) > 1e-2  # the adapter moves the logits
    assert rel_err(got[real], want[real]) < 1e-5


def test_an_adapted_linear_fed_a_subset_of_the_tokens_fails_with_a_clear_error():
    from actors.lora import BatchLayout, ForwardContext, MultiLoraLinear, Segment, TokenLayoutError

    context = ForwardContext()
    layer = MultiLoraLinear(torch.nn.Linear(8, 8), context)
    layer.add_adapter("a", LoraSettings(2, 4, 0.0), None)
    context.layout = BatchLayout((Segment("a", 0, 2),), training=False, padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert layer(torch.randn(10, 8)).shape == (10, 8)  # every token, flattened
    with pytest.raises(TokenLayoutError, match=r"ran on 7 tokens of a batch of 10.*routed"):
        layer(torch.randn(7, 8))  # a routed expert's share of the tokens
    context.layout = BatchLayout((Segment("a", 0, 10),), training=True, packed=True)
    with pytest.raises(TokenLayoutError, match="ran on 4 tokens of a batch of 10"):
        layer(torch.randn(1, 4, 8))
