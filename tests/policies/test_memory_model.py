import json
import random

import pytest

from policies.catalogue import CATALOGUE
from policies.memory_model import (
    GIB,
    ActivationFit,
    AdapterShape,
    MemoryModelError,
    ModelShape,
    ProfileCache,
    ProfileKey,
    adapter_bytes,
    adapter_param_count,
    analytic_activation,
    fit_activation,
    group_peak_bytes,
    static_bytes,
)

LLAMA7 = CATALOGUE["llama-2-7b"]


def test_lora_params_llama7b_q_v_rank8():
    # q: 8 * (4096 + 4096) = 65,536; v: same (32 kv heads * 128 = 4096) -> 131,072 per layer * 32 layers
    assert adapter_param_count(LLAMA7, AdapterShape("lora", 8, ("q_proj", "v_proj"))) == 4_194_304


def test_lora_params_gqa_and_ffn():
    model = CATALOGUE["llama-3-8b"]  # kv = 8 heads * 128 = 1024
    # k: 16 * (4096 + 1024) = 81,920; down: 16 * (14336 + 4096) = 294,912; per layer 376,832; * 32
    assert adapter_param_count(model, AdapterShape("lora", 16, ("k_proj", "down_proj"))) == 376_832 * 32


def test_mixlora_params_router_and_experts():
    tiny = ModelShape(1000, 64, 2, 4, 128, 100)
    shape = AdapterShape("mixlora", 4, ("q_proj", "gate_proj", "up_proj", "down_proj"), num_experts=3, top_k=2,
                         expert_r=2)  # fmt: skip
    # q LoRA: 4 * (64 + 64) = 512; router 64 * 3 = 192; experts 3 * 2 * (64+128) * 3 modules = 3456
    # per layer 512 + 192 + 3456 = 4160; two layers 8320
    assert adapter_param_count(tiny, shape) == 8320
    assert adapter_bytes(tiny, shape) == 8320 * 16
    # experts only where the targets say: gate alone is 3 * 2 * (64 + 128) = 1152 per layer
    partial = AdapterShape("mixlora", 4, ("q_proj", "gate_proj"), num_experts=3, top_k=2, expert_r=2)
    assert adapter_param_count(tiny, partial) == 2 * (512 + 192 + 1152)


def test_static_bytes_is_weights_plus_reserve():
    assert static_bytes(LLAMA7) == 6_738_415_616 * 2 + GIB


def test_group_peak_pads_to_longest():
    a = ActivationFit(0.0, 1.0, 0.0)  # 1 byte per token
    # rows padded to 1000: (100 + 2*1000) + (50 + 1*1000) = 3150; * 1.1 = 3465; + static 10,000
    peak = group_peak_bytes(10_000, [(100, a, 2, 500), (50, a, 1, 1000)], 0.1)
    assert peak == pytest.approx(13_465)
    assert group_peak_bytes(10_000, [], 0.5) == 10_000


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"kind": "dora"}, "kind"), ({"r": 0}, "r"), ({"target_modules": ("lm_head",)}, "target_modules"),
     ({"kind": "mixlora", "num_experts": 2, "top_k": 3}, "top_k"), ({"kind": "lora", "num_experts": 4}, "num_experts")],
)  # fmt: skip
def test_adapter_shape_errors_name_the_field(kwargs, field):
    with pytest.raises(MemoryModelError, match=f"^{field}:"):
        AdapterShape(**kwargs)


def test_model_shape_errors():
    with pytest.raises(MemoryModelError, match="dtype_bytes"):
        ModelShape(10, 64, 2, 4, 128, 100, dtype_bytes=3)
    with pytest.raises(MemoryModelError, match="hidden_size"):
        ModelShape(10, 65, 2, 4, 128, 100)
    for kv in (3, 8):  # 4 query heads cannot share 3 key/value heads evenly, nor 8
        with pytest.raises(MemoryModelError, match=rf"^num_key_value_heads: must divide num_attention_heads \(4\).*got {kv}"):
            ModelShape(10, 64, 2, 4, 128, 100, num_key_value_heads=kv)
    assert ModelShape(10, 64, 2, 4, 128, 100, num_key_value_heads=2).kv_heads == 2


def _samples(b0, b1, b2, noise=0.0, seed=0):
    rng = random.Random(seed)
    out = []
    for batch in (1, 2, 4, 8):
        for seq in (128, 256, 512, 1024, 2048):
            v = b0 + b1 * batch * seq + b2 * batch * seq * seq
            out.append((batch, seq, v * (1 + rng.uniform(-noise, noise))))
    return out


def test_fit_recovers_exact_coefficients():
    fit = fit_activation(_samples(3e8, 4.5e6, 120.0))
    assert fit.b0 == pytest.approx(3e8, rel=1e-6)
    assert fit.b1 == pytest.approx(4.5e6, rel=1e-6)
    assert fit.b2 == pytest.approx(120.0, rel=1e-6)


def test_fit_true_zero_coefficient_stays_zero():
    fit = fit_activation(_samples(2e8, 1e6, 0.0))
    assert fit.b2 == 0.0 or fit.b2 < 1e-6
    assert fit.b1 == pytest.approx(1e6, rel=1e-6)


def test_fit_with_noise_is_close_and_non_negative():
    fit = fit_activation(_samples(5e8, 2e6, 0.0, noise=0.02, seed=3))
    assert min(fit.b0, fit.b1, fit.b2) >= 0
    assert fit.b1 == pytest.approx(2e6, rel=0.05)
    # prediction error on a sample shape stays within the noise level
    assert fit.predict(4, 1024) == pytest.approx(5e8 + 2e6 * 4096, rel=0.03)


def test_fit_clamps_negative_unconstrained_solution():
    # bytes fall with B*L: unconstrained least squares would give b1 < 0; NNLS keeps b1 = b2 = 0
    fit = fit_activation([(1, 100, 1000.0), (1, 200, 900.0), (1, 400, 800.0)])
    assert (fit.b1, fit.b2) == (0.0, 0.0)
    assert fit.b0 == pytest.approx(900.0)


def test_fit_rejects_bad_samples():
    with pytest.raises(MemoryModelError, match="samples"):
        fit_activation([])
    with pytest.raises(MemoryModelError, match=r"samples\[0\]"):
        fit_activation([(0, 10, 5.0)])


def test_analytic_activation_formula():
    fit = analytic_activation(LLAMA7, AdapterShape())
    # b1 = 32 layers * 34 * 4096 * 2 / 2 + 32000 * (2 + 8) = 4,456,448 + 320,000
    assert fit.b1 == 4_776_448
    assert fit.b2 == 0.0
    assert analytic_activation(LLAMA7, AdapterShape(), flash_attention=False).b2 == 32 * 5 * 32


def test_profile_cache_round_trip(tmp_path):
    cache = ProfileCache()
    key = ProfileKey("llama-2-7b", AdapterShape("lora", 16).key(), "H100", "bfloat16")
    cache.put(key, ActivationFit(1.0, 2.0, 3.0))
    path = tmp_path / "profiles.json"
    cache.save(path)
    loaded = ProfileCache.load(path)
    assert loaded.get(key) == ActivationFit(1.0, 2.0, 3.0)
    assert loaded.get(ProfileKey("x", "y", "z", "w")) is None
    path.write_text(json.dumps({"version": 1, "profiles": [{"base_model": "m"}]}))
    with pytest.raises(MemoryModelError, match=r"profiles\[0\]"):
        ProfileCache.load(path)


def test_canonical_targets_map_other_families_names_to_the_llama_projections():
    from policies.memory_model import ALL_TARGETS, canonical_targets

    assert canonical_targets(["all-linear"]) == ALL_TARGETS
    assert canonical_targets(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]) == ALL_TARGETS
    assert canonical_targets(["dense", "fc1", "fc2", "q_proj"]) == ("o_proj", "up_proj", "down_proj", "q_proj")
    assert canonical_targets(["q_proj", "q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert canonical_targets(["lm_head", "unknown"]) == ()
