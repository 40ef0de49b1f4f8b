"""Fused training equals training each job alone with PEFT + torch AdamW (fp32, dropout 0)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from actors.config import AdapterSettings, DataSettings, JobConfig, LoraSettings, TrainSettings
from actors.data import IGNORE_INDEX, collate, load_examples
from actors.engine import FusedEngine
from tests.conftest import TEST_DEVICE, make_tiny_llama, make_tokenizer, token_records, write_jsonl

peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name, r, alpha, targets, lr, optimizer, scheduler, (min_len, max_len), batch, micro, clip, rslora, dora
JOBS = [
    ("a", 4, 8, ("q_proj", "v_proj"), 5e-3, "adamw", "constant", (6, 12), 4, 2, None, False, False),
    ("b", 8, 32, ALL, 2e-3, "adamw", "cosine", (15, 30), 6, 3, 0.5, False, False),
    ("c", 2, 4, ("down_proj", "o_proj"), 0.5, "sgd", "linear", (4, 9), 2, 1, None, True, False),
    ("d", 6, 12, ("k_proj", "up_proj"), 3e-3, "adamw", "linear", (10, 20), 4, 4, 1.0, False, True),
]
STEPS = 4


def peft_init_dir(tmp_path, base, name, r, alpha, targets, rslora, dora, seed):
    """A PEFT adapter with random (non-zero) A and B, saved to disk: the common starting point."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False,
        use_rslora=rslora, use_dora=dora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), cfg)
    if dora:  # make the magnitude differ from the weight norm so it matters
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.1 * torch.rand_like(p))
    out = tmp_path / f"init-{name}"
    model.save_pretrained(out)
    return out


def schedule(kind, total):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    return {
        "constant": lambda opt: get_constant_schedule_with_warmup(opt, 1),
        "linear": lambda opt: get_linear_schedule_with_warmup(opt, 1, total),
        "cosine": lambda opt: get_cosine_schedule_with_warmup(opt, 1, total),
    }[kind]


def train_alone_with_peft(base, init_dir, examples, job):
    """The reference: PEFT model, own batches padded to their own length, token-weighted loss."""
    from peft import PeftModel

    _name, _r, _alpha, _targets, lr, opt_name, sched, _, batch, micro, clip, _, _ = job
    model = PeftModel.from_pretrained(copy.deepcopy(base), init_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    scheduler = schedule(sched, STEPS)(opt)
    for step in range(STEPS):
        chunk = examples[step * batch : (step + 1) * batch]
        n_tokens = sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in chunk)
        for i in range(0, len(chunk), micro):
            ids, labels, mask = collate(chunk[i : i + micro], 0)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # as the engine's loss
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            ) / n_tokens
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        scheduler.step()
        opt.zero_grad()
    from peft import get_peft_model_state_dict

    return model, get_peft_model_state_dict(model)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def train_fused(tmp, base, jobs, base_model_id, device="cpu", settings=None):
    """Every job of ``jobs`` (JOBS' tuple layout) from its own PEFT init, fused in one engine on a
    copy of ``base``; returns (engine, [(job, init dir, examples, JobConfig)])."""
    tok = make_tokenizer()
    engine = FusedEngine(copy.deepcopy(base).to(device), tok, base_model_id=base_model_id,
                         settings=settings)  # PEFT stays on CPU  # fmt: skip
    setups = []
    for k, job in enumerate(jobs):
        name, r, alpha, targets, lr, opt_name, sched, (lo, hi), batch, micro, clip, rslora, dora = job
        data = write_jsonl(tmp / f"{name}.jsonl", token_records(batch * STEPS, seed=10 + k, min_len=lo, max_len=hi))
        init = peft_init_dir(tmp, base, name, r, alpha, targets, rslora, dora, seed=100 + k)
        cfg = JobConfig(
            name=name,
            base_model=base_model_id,
            adapter=AdapterSettings(
                "lora", LoraSettings(r, alpha, 0.0, use_rslora=rslora, use_dora=dora), targets, init_from=str(init)
            ),
            data=DataSettings(str(data), format="tokens", shuffle=False),
            train=TrainSettings(
                max_steps=STEPS, batch_size=batch, micro_batch_size=micro, learning_rate=lr, optimizer=opt_name,
                lr_scheduler=sched, warmup_steps=1, max_grad_norm=clip, checkpoint_every=100,
            ),
            output=str(tmp / f"out-{name}"),
        )
        engine.add_job(cfg)
        setups.append((job, init, load_examples(cfg.data, tok), cfg))
    engine.run()
    return engine, setups


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused-vs-peft")
    base = make_tiny_llama(seed=3)
    engine, setups = train_fused(tmp, base, JOBS, "tiny", TEST_DEVICE)
    return base, make_tokenizer(), engine, setups


@pytest.mark.parametrize("index", range(len(JOBS)), ids=[j[0] for j in JOBS])
def test_fused_adapter_equals_peft_alone(trained, index):
    base, _tok, _engine, setups = trained
    job, init, examples, cfg = setups[index]
    _model, ref = train_alone_with_peft(base, init, examples, job)
    ours = load_file(f"{cfg.output}/adapter_model.safetensors")
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:4]
    start = load_file(f"{init}/adapter_model.safetensors")
    for key, want in ref.items():
        assert rel_err(ours[key], want) < 1e-4, key
    # and training moved the weights well beyond the tolerance, so the comparison means something
    moved = max(rel_err(ref[k], start[k]) for k in ref if "lora_B" in k)
    assert moved > 1e-3


def test_exported_adapter_gives_engine_logits_in_peft(trained):
    from peft import PeftModel

    base, _tok, engine, setups = trained
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7], [6, 8, 10, 12, 14, 16, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    for job, _init, _examples, cfg in setups:
        engine_logits = engine.logits(cfg.name, ids, mask).cpu()
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), cfg.output)
        with torch.no_grad():
            want = peft_model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert rel_err(engine_logits[real], want[real]) < 1e-5, job[0]
        assert math.isfinite(float(engine_logits.sum()))


def test_bf16_padded_training_gives_peft_bf16s_adapters(tmp_path):
    """On a bf16 base PEFT adds the fp32 update to the base output and rounds the sum once; the
    engine does the same (``LoraWeights.round_once``), so a job padded as PEFT pads it gets PEFT's
    adapters to fp32 rounding (rounding the update first drifted by 6e-4 to 2e-3 after 4 steps).
    Fused beside jobs of other lengths, rows pad to the longest and bf16 rounding differs by as much."""
    from actors.config import EngineSettings

    base = make_tiny_llama(seed=3).to(torch.bfloat16)
    for job in JOBS:  # LoRA, rsLoRA with SGD, DoRA
        _engine, setups = train_fused(tmp_path / job[0], base, [job], "tiny", settings=EngineSettings(packing=False))
        (_, init, examples, cfg), = setups
        _model, ref = train_alone_with_peft(base, init, examples, job)
        ours = load_file(f"{cfg.output}/adapter_model.safetensors")
        assert max(rel_err(ours[k], ref[k].float()) for k in ref) < 1e-5, job[0]
