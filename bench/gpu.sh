#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes on an H200): CUDA correctness tests, `make bench` on the GPU
# (fixed and mixed lengths), `lorafleet train` on one GPU, and the memory model against NVML.
# Run from the repository root with a CUDA PyTorch, transformers and peft installed. SRC is a directory with
# SmolLM2-135M's config.json and tokenizer files; the weights are drawn at random by bench/random_model.py
# (same shapes, same step time and memory). Results go to $OUT.
# The first run (28 Nov 2026, docs/measurements/h200-2026-11-28) spent its bench stage's 240 s on 10 timed
# steps x 1-16 jobs of the fixed table alone (sequential PEFT over 16 jobs is the slow part): hence the
# defaults below.
set -u
OUT=${OUT:-/tmp/lorafleet-gpu}
# config + tokenizer of SmolLM2-135M: a copy carried to the machine, else the converted builtin model's cache
SRC=${SRC:-.gpu/smollm2-135m}
[ -f "$SRC/config.json" ] || SRC=${LORAFLEET_CACHE:-$HOME/.cache/lorafleet}/models/smollm2-135m-instruct
PY=${PY:-python3}
MODEL=/tmp/smollm2-135m-random
STAGES=${STAGES:-"bench tests train memory"}  # a subset reruns part of it
BENCH_ARGS=${BENCH_ARGS:-"--jobs 1 4 8 16 --steps 5 --warmup 2"}
on() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
# Packages the GPU image may lack (pydantic for the job specs) travel as wheels in .whl/, if present.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

stage() { echo; echo "=== $1 ($(date +%T))"; }

stage environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
$PY bench/random_model.py "$SRC" "$MODEL" --dtype bfloat16 2>&1 | tail -1

on tests && {
stage "correctness on CUDA (engine on the GPU, PEFT references on CPU)"
LORAFLEET_TEST_DEVICE=cuda timeout ${TESTS_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider tests/actors/test_fused_vs_peft.py \
  tests/actors/test_packing.py "tests/actors/test_mixlora.py::test_mixlora_fused_beside_lora_jobs_equals_alone" \
  2>&1 | tee "$OUT/tests.txt" | tail -25
}

if on bench; then
stage "make bench on the GPU (bf16 base, bf16 autocast, fp32 adapters)"
# shellcheck disable=SC2086
timeout ${BENCH_TIMEOUT:-330} $PY bench/bench_fused.py --device cuda --model "$MODEL" --autocast $BENCH_ARGS \
  2>&1 | grep -v -e Warning -e "Loading weights" | tee "$OUT/bench.txt"
fi

on train && {
stage "lorafleet train on one GPU: a LoRA and a MixLoRA job fused, no cluster"
mkdir -p /tmp/specs
for job in arith mix-mixlora; do
  sed -e "s#builtin:smollm2-135m-instruct#$MODEL#" -e "s#^output: .*#output: /tmp/train-out/$job#" \
    "examples/jobs/$job.yaml" > "/tmp/specs/$job.yaml"
done
timeout ${TRAIN_TIMEOUT:-100} $PY -m orchestrator.cli train /tmp/specs/arith.yaml /tmp/specs/mix-mixlora.yaml --plain 2>&1 \
  | grep -v Warning | tail -25 | tee "$OUT/train.txt"
ls /tmp/train-out/* | tee -a "$OUT/train.txt"
}

on memory && {
stage "memory model vs NVML"
timeout ${MEMORY_TIMEOUT:-120} $PY bench/bench_memory.py --device cuda --dtype bfloat16 --model "$MODEL" --shared-process --points 4 \
  2>&1 | tail -30 | tee "$OUT/memory.txt"
}
stage done
