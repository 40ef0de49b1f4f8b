"""Adapter directories lorafleet did not write (PEFT, the ``mixlora`` package) and its own, read back for
``FusedEngine.attach_adapter`` (``lorafleet eval``) and ``adapter.init_from``: what they compute is what PEFT or
the reference package computes from them, and what lorafleet cannot compute is refused with the field named."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors import checkpoint as ckpt
from actors.adapter import AdapterLoadError
from actors.config import AdapterSettings, LoraSettings
from actors.engine import FusedEngine
from actors.mixlora import PEFT_UNSUPPORTED
from tests.actors.test_mixlora import (
    ALL,
    FFN,
    batch_with_pads,
    examples,
    job_config,
    mix_settings,
    randomize,
    rel_err,
)
from tests.conftest import make_tiny_llama, make_tokenizer

SEED = 11  # the base model of every test here


def engine() -> FusedEngine:
    return FusedEngine(make_tiny_llama(seed=SEED), make_tokenizer())


def peft_adapter(directory: Path, **config) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B on the tiny base model."""
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(make_tiny_llama(seed=SEED), LoraConfig(task_type="CAUSAL_LM", **config))
        model.save_pretrained(directory)
    return directory


def peft_logits(directory: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits PEFT computes with the adapter in ``directory`` (loaded as PEFT loads it)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(make_tiny_llama(seed=SEED), str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def edit_config(directory: Path, **changes) -> Path:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return directory


def lora_job(name: str, targets, init_from: Path, out: Path, **lora):
    settings = AdapterSettings("lora", LoraSettings(4, 8, **lora), tuple(targets), init_from=str(init_from))
    return job_config(name, settings, out)


def assert_equals_peft(eng: FusedEngine, name: str, directory: Path) -> None:
    ids, mask = batch_with_pads()
    real = mask.bool()
    want = peft_logits(directory, ids, mask)
    got = eng.logits(name, ids, mask)
    base = eng.logits(None, ids, mask)
    assert rel_err(got[real], want[real]) < 1e-5
    assert rel_err(want[real], base[real]) > 1e-3  # the adapter matters


# ---------------------------------------------------------------- PEFT fields lorafleet does not implement


def test_peft_alora_adapter_is_refused_on_attach_and_init_from(tmp_path):
    directory = peft_adapter(tmp_path / "alora", target_modules=["q_proj", "k_proj", "v_proj"],
                             alora_invocation_tokens=[40, 41])  # fmt: skip
    ids, mask = batch_with_pads()  # PEFT leaves the tokens before the invocation [40, 41] to the base model
    eng = engine()
    assert rel_err(peft_logits(directory, ids, mask)[0, :5], eng.logits(None, ids, mask)[0, :5]) < 1e-6
    want = (f"{directory}: adapter_config.json: alora_invocation_tokens [40, 41] is not supported (aLoRA: PEFT "
            "applies the adapter only from the invocation tokens on); lorafleet loads plain LoRA, rsLoRA and DoRA "
            "adapters")  # fmt: skip
    with pytest.raises(AdapterLoadError) as info:
        eng.attach_adapter("a", directory)
    assert str(info.value) == want
    with pytest.raises(AdapterLoadError) as info:
        eng.add_job(lora_job("j", ["q_proj", "k_proj", "v_proj"], directory, tmp_path / "j"),
                    examples=examples(4, 1, 5, 9))  # fmt: skip
    assert str(info.value) == want
    assert not eng.inference and not eng.jobs
    assert not any(linear.adapters for linear in eng.fused.linears.values())  # nothing stays attached


def test_peft_lora_bias_and_trained_biases_are_refused(tmp_path):
    """PEFT creates these; lorafleet would drop the bias of lora_B / the trained base biases."""
    bias = peft_adapter(tmp_path / "lb", target_modules=["q_proj", "v_proj"], lora_bias=True)
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", bias)
    assert str(info.value) == (f"{bias}: adapter_config.json: lora_bias True is not supported (a bias on lora_B); "
                               "lorafleet loads plain LoRA, rsLoRA and DoRA adapters")  # fmt: skip
    trained = peft_adapter(tmp_path / "ball", target_modules=["q_proj", "v_proj"], bias="all")
    with pytest.raises(AdapterLoadError, match=r"bias 'all' is not supported \(trained biases of the base model"):
        engine().attach_adapter("a", trained)
    saved = peft_adapter(tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(AdapterLoadError, match=r"modules_to_save \['lm_head'\] is not supported \(fully trained"):
        engine().attach_adapter("a", saved)
    tokens = peft_adapter(tmp_path / "tti", target_modules=["q_proj"], trainable_token_indices=[3, 4])
    with pytest.raises(AdapterLoadError, match=r"trainable_token_indices .* is not supported \(trained rows"):
        engine().attach_adapter("a", tokens)


UNSUPPORTED_VALUES = {
    "alora_invocation_tokens": [40, 41],
    "bias": "lora_only",
    "lora_bias": True,
    "fan_in_fan_out": True,
    "modules_to_save": ["lm_head"],
    "trainable_token_indices": {"embed_tokens": [3]},
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "layer_replication": [[0, 2], [1, 2]],
    "layers_to_transform": [0],
    "layers_pattern": "layers",
    "rank_pattern": {"q_proj": 8},
    "alpha_pattern": {"q_proj": 32},
    "megatron_config": {"tensor_model_parallel_size": 2},
    "use_qalora": True,
    "use_bdlora": {"nblocks": 2},
    "kasa_config": {"beta": 0.1},
    "arrow_config": {"top_k": 2},
    "monteclora_config": {"num_samples": 4},
    "velora_config": {"num_groups": 2},
}


def test_every_unsupported_peft_field_has_a_test_value():
    assert set(UNSUPPORTED_VALUES) == set(PEFT_UNSUPPORTED)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_VALUES))
def test_unsupported_peft_field_is_refused_by_name(tmp_path, field):
    directory = edit_config(peft_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj"]),
                            **{field: UNSUPPORTED_VALUES[field]})  # fmt: skip
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", directory)
    assert str(info.value) == (
        f"{directory}: adapter_config.json: {field} {UNSUPPORTED_VALUES[field]!r} is not supported "
        f"({PEFT_UNSUPPORTED[field]}); lorafleet loads plain LoRA, rsLoRA and DoRA adapters"
    )


def test_pissa_adapter_is_refused_peft_applies_it_to_modified_base_weights(tmp_path):
    directory = peft_adapter(tmp_path / "pissa", target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    plain = edit_config(shutil.copytree(directory, tmp_path / "plain"), init_lora_weights=True)
    ids, mask = batch_with_pads()  # same tensors, but PEFT computes another function from a PiSSA config
    assert rel_err(peft_logits(directory, ids, mask), peft_logits(plain, ids, mask)) > 1e-3
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", directory)
    assert str(info.value) == (
        f"{directory}: adapter_config.json: init_lora_weights 'pissa' is not supported (PEFT applies this adapter to "
        "base weights it modified at initialisation); save it converted to plain LoRA with PEFT's "
        "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
    )
    for init in ("pissa_niter_4", "olora", "corda", "loftq"):
        with pytest.raises(AdapterLoadError, match=f"init_lora_weights '{init}' is not supported"):
            engine().attach_adapter("a", edit_config(directory, init_lora_weights=init))


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["k_proj", "down_proj"], "use_rslora": True, "use_dora": True},
        {"target_modules": "all-linear"},
    ],
)
def test_default_peft_adapters_load_and_equal_peft(tmp_path, config):
    directory = peft_adapter(tmp_path / "a", **config)
    eng = engine()
    eng.attach_adapter("a", directory)
    assert_equals_peft(eng, "a", directory)


@pytest.mark.parametrize("init", ["gaussian", "mica", "eva", "orthogonal", "lora_ga", True])
def test_initialisation_only_fields_load(tmp_path, init):
    """init_lora_weights values whose saved adapter PEFT applies to the unchanged base model."""
    directory = edit_config(peft_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj"]), init_lora_weights=init)
    eng = engine()
    eng.attach_adapter("a", directory)
    assert_equals_peft(eng, "a", directory)


def test_lorafleet_own_adapters_load(tmp_path):
    maker = engine()
    ids, mask = batch_with_pads()
    lora = maker.add_job(job_config("l", AdapterSettings("lora", LoraSettings(4, 8, use_dora=True), ALL),
                                    tmp_path / "l"), examples=examples(4, 1, 5, 9))  # fmt: skip
    mix = maker.add_job(job_config("m", mix_settings(targets=("q_proj", *FFN)), tmp_path / "m"),
                        examples=examples(4, 1, 5, 9))  # fmt: skip
    randomize(lora.adapter, seed=1)
    randomize(mix.adapter, seed=2)
    eng = engine()
    for job in (lora, mix):
        directory = ckpt.write_adapter(tmp_path / f"x{job.name}", job.adapter.export_state(),
                                       job.adapter.export_config("tiny"))  # fmt: skip
        eng.attach_adapter(job.name, directory)
        assert rel_err(eng.logits(job.name, ids, mask), maker.logits(job.name, ids, mask)) < 1e-6
    assert_equals_peft(eng, "l", tmp_path / "xl")


# ---------------------------------------------------------------- MixLoRA act_fn


def mixlora_export(tmp_path: Path, act_fn: str) -> tuple[FusedEngine, Path]:
    """A lorafleet MixLoRA adapter with random weights, its config's act_fn set, in the reference package's
    format (adapter_model.bin); lora_dropout 0.05 as the reference insists (off at inference)."""
    maker = engine()
    job = maker.add_job(job_config("m", mix_settings(dropout=0.05), tmp_path / "job"), examples=examples(4, 1, 5, 9))
    randomize(job.adapter, seed=7)
    directory = tmp_path / f"mix-{act_fn}"
    directory.mkdir()
    torch.save({k: v.clone() for k, v in job.adapter.export_state().items()}, directory / "adapter_model.bin")
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        make_tiny_llama(seed=SEED).save_pretrained(base_dir)
    config = {**job.adapter.export_config(str(base_dir)), "act_fn": act_fn}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return maker, directory


def reference_mixlora_logits(directory: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mixlora = pytest.importorskip("mixlora")
    ref, _config = mixlora.MixLoraModelForCausalLM.from_pretrained(str(directory))
    ref.eval()
    for layer in ref.model.layers:  # the reference keeps its experts outside the module tree
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.eval()
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask).logits


def test_mixlora_act_fn_is_honoured_as_the_reference_package_does(tmp_path):
    pytest.importorskip("mixlora")
    ids, mask = batch_with_pads()
    real = mask.bool()
    _maker, own = mixlora_export(tmp_path, "silu")  # lorafleet's own export: the base model's activation
    _maker, gelu = mixlora_export(tmp_path, "gelu")
    eng = engine()
    eng.attach_adapter("own", own)
    eng.attach_adapter("gelu", gelu)
    got, want = eng.logits("gelu", ids, mask), reference_mixlora_logits(gelu, ids, mask)
    assert rel_err(got[real], want[real]) < 1e-5
    assert eng.inference["own"].act_fn_name == "silu" and eng.inference["gelu"].act_fn_name == "gelu"
    assert rel_err(eng.logits("own", ids, mask)[real], reference_mixlora_logits(own, ids, mask)[real]) < 1e-5
    assert rel_err(got[real], eng.logits("own", ids, mask)[real]) > 1e-3  # the activation matters
    # a job continuing from it keeps its activation: same logits at step 0, and it exports it again
    job = eng.add_job(job_config("cont", mix_settings(dropout=0.05, init_from=str(gelu)), tmp_path / "cont"),
                      examples=examples(4, 1, 5, 9))  # fmt: skip
    assert rel_err(eng.logits("cont", ids, mask)[real], want[real]) < 1e-5
    assert job.adapter.export_config("tiny")["act_fn"] == "gelu"


def test_mixlora_unknown_act_fn_is_refused(tmp_path):
    _maker, directory = mixlora_export(tmp_path, "no_such_act")
    with pytest.raises(AdapterLoadError, match=(
        rf"^{directory}: adapter_config.json: act_fn 'no_such_act' is not an activation transformers knows "
        r"\(one of .*gelu.*silu")):  # fmt: skip
        engine().attach_adapter("m", directory)


# ---------------------------------------------------------------- target_modules as a regex, exclude_modules


def test_regex_target_modules_load_on_attach_and_init_from(tmp_path):
    directory = peft_adapter(tmp_path / "re", target_modules=r".*\.(q_proj|v_proj)")
    eng = engine()
    adapter = eng.attach_adapter("a", directory)
    assert adapter.settings.target_modules == ("q_proj", "v_proj")
    assert_equals_peft(eng, "a", directory)
    eng.add_job(lora_job("j", ["q_proj", "v_proj"], directory, tmp_path / "j"), examples=examples(4, 1, 5, 9))
    assert_equals_peft(eng, "j", directory)


def test_exclude_modules_load_exactly_on_attach(tmp_path):
    directory = peft_adapter(tmp_path / "ex", target_modules=["q_proj", "v_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"])  # fmt: skip
    eng = engine()
    adapter = eng.attach_adapter("a", directory)
    assert adapter.settings.target_modules == ("model.layers.1.self_attn.q_proj", "v_proj")
    assert sorted(adapter.modules) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                       "model.layers.1.self_attn.v_proj"]  # fmt: skip
    assert_equals_peft(eng, "a", directory)
    names = peft_adapter(tmp_path / "ex2", target_modules="all-linear", exclude_modules=["k_proj", "down_proj"])
    assert eng.attach_adapter("b", names).settings.target_modules == ("q_proj", "v_proj", "o_proj", "gate_proj",
                                                                      "up_proj")  # fmt: skip
    assert_equals_peft(eng, "b", names)
    # PEFT matches the model as it was: not what lorafleet keeps inside its wrappers (mlp.jobs.m.experts.0.gate_proj)
    eng.add_job(job_config("m", mix_settings(), tmp_path / "m"), examples=examples(4, 1, 5, 9))
    regex = peft_adapter(tmp_path / "ex3", target_modules=r".*proj", exclude_modules=r".*\.0\.mlp\..*")
    adapter = eng.attach_adapter("c", regex)
    assert len(adapter.modules) == 11  # all 7 of layer 1, the 4 attention ones of layer 0
    assert_equals_peft(eng, "c", regex)


def test_init_from_with_other_modules_names_the_target_modules_to_use(tmp_path):
    directory = peft_adapter(tmp_path / "ex", target_modules=["q_proj", "v_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"])  # fmt: skip
    eng = engine()
    with pytest.raises(AdapterLoadError) as info:
        eng.add_job(lora_job("j", ["q_proj", "v_proj"], directory, tmp_path / "j"), examples=examples(4, 1, 5, 9))
    assert str(info.value) == (
        f"adapter.target_modules: [q_proj, v_proj], but {directory} adapts [model.layers.1.self_attn.q_proj, v_proj]; "
        "set adapter.target_modules: [model.layers.1.self_attn.q_proj, v_proj] to continue from it"
    )
    assert not eng.jobs and not any(linear.adapters for linear in eng.fused.linears.values())
    eng.add_job(lora_job("j", ["model.layers.1.self_attn.q_proj", "v_proj"], directory, tmp_path / "j"),
                examples=examples(4, 1, 5, 9))  # fmt: skip
    assert_equals_peft(eng, "j", directory)


def test_selection_of_modules_lorafleet_does_not_adapt_is_refused(tmp_path):
    directory = peft_adapter(tmp_path / "head", target_modules=["q_proj", "lm_head"])
    written = json.loads((directory / "adapter_config.json").read_text())["target_modules"]  # PEFT's order
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", directory)
    assert str(info.value) == (
        f"{directory}: adapter_config.json: target_modules {written} selects lm_head, which lorafleet does "
        "not adapt (it adapts the base model's linear layers, not its output head, embeddings or other modules)"
    )
    edit_config(directory, target_modules="(.*q_proj")
    with pytest.raises(AdapterLoadError, match=r"target_modules '\(\.\*q_proj': not a valid regular expression"):
        engine().attach_adapter("a", directory)
    edit_config(directory, target_modules=r".*\.x_proj")
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", directory)
    assert str(info.value) == (
        rf"{directory}: adapter_config.json: target_modules '.*\\.x_proj' selects no linear layer of the base model"
    )


def test_tensor_mismatch_on_attach_names_the_directory_not_init_from(tmp_path):
    directory = peft_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj"])
    state = load_file(directory / "adapter_model.safetensors")
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, directory / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError) as info:
        engine().attach_adapter("a", directory)
    assert str(info.value) == (
        f"{directory} does not match the adapter its adapter_config.json describes on this base model: 1 tensors "
        "missing (first: ['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight']), 0 unexpected "
        "(first: []); check r, target_modules and the base model"
    )


def test_tensor_mismatch_on_init_from_names_the_job(tmp_path):
    maker = FusedEngine(make_tiny_llama(seed=SEED, hidden_size=48, intermediate_size=64), make_tokenizer())
    job = maker.add_job(job_config("m", mix_settings(), tmp_path / "m"), examples=examples(4, 1, 5, 9))
    directory = ckpt.write_adapter(tmp_path / "other", job.adapter.export_state(), job.adapter.export_config("x"))
    with pytest.raises(AdapterLoadError) as info:
        engine().add_job(job_config("j", mix_settings(init_from=str(directory)), tmp_path / "j"),
                         examples=examples(4, 1, 5, 9))  # fmt: skip
    assert str(info.value) == (
        f"{directory}: tensor mixlora.layers.0.mlp.moe_gate.weight has shape (4, 48), the adapter of job 'j' "
        "(its adapter.init_from) expects (4, 32) (check r and the base model)"
    )


def test_tensor_mismatch_says_the_adapter_was_trained_on_another_base_model(tmp_path):
    """An adapter of a 2-layer model attached to (or continued from on) a 3-layer one: tensors are
    missing, and its adapter_config.json names the base model it was trained on."""
    maker = FusedEngine(make_tiny_llama(seed=SEED), make_tokenizer(), base_model_id="/models/tiny-2-layers")
    job = maker.add_job(job_config("m", mix_settings(), tmp_path / "m"), examples=examples(4, 1, 5, 9))
    directory = ckpt.write_adapter(tmp_path / "other", job.adapter.export_state(),
                                   job.adapter.export_config("/models/tiny-2-layers"))  # fmt: skip
    here = FusedEngine(make_tiny_llama(seed=SEED, num_hidden_layers=3), make_tokenizer(),
                       base_model_id="builtin:smollm2-135m-instruct")  # fmt: skip
    said = ("the adapter was trained on /models/tiny-2-layers (adapter_config.json: base_model_name_or_path), and "
            "the base model here is builtin:smollm2-135m-instruct: load it on the base model it was trained on")  # fmt: skip
    with pytest.raises(AdapterLoadError) as info:
        here.attach_adapter("a", directory)
    assert str(info.value).startswith(f"{directory} does not match the adapter its adapter_config.json describes")
    assert str(info.value).endswith(f" 0 unexpected (first: []); {said}")
    with pytest.raises(AdapterLoadError) as info:
        here.add_job(job_config("j", mix_settings(init_from=str(directory)), tmp_path / "j"),
                     examples=examples(4, 1, 5, 9))  # fmt: skip
    assert str(info.value).endswith(said)


def test_the_same_base_model_written_two_ways_is_not_called_another(tmp_path, monkeypatch):
    from actors.adapter import other_base_model

    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    converted = str(tmp_path / "cache" / "models" / "smollm2-135m-instruct")
    assert other_base_model("builtin:smollm2-135m-instruct", converted) == ""
    assert other_base_model(converted, "builtin:smollm2-135m-instruct") == ""
    assert other_base_model("./m", str(tmp_path / "m")) == ""
    assert other_base_model("Org/Model", "org/model") == ""
    assert other_base_model(None, "org/model") == "" and other_base_model("org/model", "") == ""
    assert other_base_model("org/a", "org/b").startswith("the adapter was trained on org/a")
    assert other_base_model(str(tmp_path / "m"), "builtin:smollm2-135m-instruct") != ""


MIX_CONFIG = {"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "num_experts": 4, "top_k": 2,
              "routing_strategy": "mixlora", "target_modules": ["gate_proj", "up_proj", "down_proj"]}  # fmt: skip


@pytest.mark.parametrize(
    ("patch", "message"),
    [({"top_k": 5}, r"top_k: must be <= num_experts \(4\) \(got 5\)"),
     ({"top_k": 0}, r"top_k: must be >= 1 \(got 0\)"),
     ({"top_k": 2.5}, r"top_k: must be an integer \(got 2.5\)"),
     ({"num_experts": True}, r"num_experts: must be an integer \(got True\)"),
     ({"num_experts": None}, r"num_experts: missing \(must be an integer\)"),
     ({"r": 0}, r"r: must be >= 1 \(got 0\)"),
     ({"lora_alpha": "16"}, r"lora_alpha: must be a number \(got '16'\)"),
     ({"lora_dropout": 1.0}, r"lora_dropout: must be >= 0 and < 1 \(got 1.0\)"),
     ({"top_p": 0}, r"top_p: must be > 0 and <= 1 \(got 0\)"),
     ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef: must be >= 0 \(got -0.1\)"),
     ({"router_init_range": float("nan")}, r"router_init_range: must be a number \(got nan\)"),
     ({"expert_lora": {"r": 0}}, r"expert_lora.r: must be >= 1 \(got 0\)"),
     ({"expert_lora": [8]}, r"expert_lora: must be a mapping \(got \[8\]\)")],
)  # fmt: skip
def test_a_hand_edited_mixlora_config_fails_at_load_naming_the_field(patch, message):
    """A MixLoRA export edited by hand (top_k above the experts, a zero rank...) was accepted at
    attach and failed at the first forward inside torch (``selected index k out of range``) or with
    a ZeroDivisionError; it is an AdapterLoadError naming the file and the field."""
    from actors.mixlora import settings_from_export

    settings = settings_from_export(MIX_CONFIG, "/adapters/x")  # the unedited config loads
    assert (settings.mixlora.num_experts, settings.mixlora.top_k, settings.lora.r) == (4, 2, 4)
    one = {k: v for k, v in MIX_CONFIG.items() if k != "top_k"} | {"num_experts": 1, "routing_strategy": "mixlora-dynamic"}
    assert settings_from_export(one, "/adapters/x").mixlora.top_k == 1  # no top_k (dynamic routing): not 2 > 1
    with pytest.raises(AdapterLoadError, match=r"^/adapters/x: adapter_config.json: " + message + "$"):
        settings_from_export({**MIX_CONFIG, **patch}, "/adapters/x")
    if set(patch) <= {"r", "lora_alpha", "lora_dropout"}:  # the same fields of a PEFT LoRA config
        lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **patch}
        with pytest.raises(AdapterLoadError, match=r"^/adapters/x: adapter_config.json: " + message + "$"):
            settings_from_export(lora, "/adapters/x")
