#!/bin/bash
# The GPU checks and benchmark of one lent-GPU session, in ONE device call of <= 600 s.
#
# Before the call, on the CPU machine, from the repo root (fills the git-ignored .whl/ with the
# wheels the GPU machine lacks: bitsandbytes, deepspeed, hydra/omegaconf, datasets, liger-kernel):
#     bash /work/shared/tools/gpu-wheels.sh
# The call:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Cheaper fallback (~3-4 min): run(command="SHAPE=llama3-1b STEPS=10 bash bench/gpu_session.sh", ...)
# With device time to spare, a separate call measures the dequantized merge at the 8B shape (CPU
# figures for the 1B shape are in bench/RESULTS.md): ... command="bash -c 'pip install -q --no-index
# --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site python3 bench/merge_tolerance.py --shape llama3-8b'"
#
# What it does, writing everything under $OUT (it comes back with the call):
#   1. installs the carried wheels into /tmp/site;
#   2. runs the gpu-marked tests (python -m pytest -m gpu): pytest_gpu.log (GPU_TESTS=0: skipped);
#   3. (DIAG=1, the default) per-layer costs on a 4-layer model of SHAPE's width: diag.log, and an
#      entry in RESULTS.md;
#   4. benchmarks SHAPE (default llama3-8b) for int8, nf4 and bf16, the hand-written HF recipe and
#      dialtune, STEPS measured steps after WARMUP: bench.log, bench.jsonl, and RESULTS.md = this
#      tree's bench/RESULTS.md with the new entry appended (copy it over bench/RESULTS.md);
#      PROFILE=1: one more step per dialtune row under torch.profiler, its top kernels in profile.txt.
# Time for llama3-8b, measured on an H200 on 2026-11-28 (495 s in all, plus ~40 s to start the
# machine): setup 40 s, gpu tests 45 s, the random 16 GB base 20 s, then per row (process start,
# load + quantize from the page cache, 8 steps) 56 s for hf int8, 25 s for the other hf rows,
# 40-45 s for a dialtune row; 11 rows fit in the default DEADLINE.
# Rows that would not finish before DEADLINE (seconds after the start, default 550: the call's
# timeout_s of 600 minus a margin) are reported as skipped or killed in the table instead of losing
# the whole call; the lever rows come last, so they are the ones dropped when time runs short.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
OUT=${OUT:-/tmp/dialtune-gpu-out}
SHAPE=${SHAPE:-llama3-8b}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
DEADLINE=${DEADLINE:-550}
# hf and dialtune for each quantization, then one row per lever changed (QUANT/ITEM: that quant only),
# in this order, as long as --time-budget lasts (bench/run.py skips a row that would not fit)
# (2026-11-28, three H200 calls: hf, dialtune, the varlen/fast_int8/liger/fused_ce/ckpt=2 levers, the
# memory budget at 24 GiB and auto with the first fused-LoRA version; bench/RESULTS.md. Next: the fused
# LoRA branch as it now is (kernels.fused_lora: shared inputs, recomputed norm outputs and SwiGLU
# input, 0.38 GiB a layer by the estimate: every layer should fit 24 GiB for int8 and nf4) against
# PEFT's modules at the same settings, compile (skipped for time in every call so far), the int8
# default. The hf rows are in bench/RESULTS.md:
# put `hf,dialtune,` in front to measure them and the defaults again, ~210 s)
WHICH=${WHICH:-int8/dialtune:budget=24:fused_lora=1,nf4/dialtune:budget=24:fused_lora=1,bf16/dialtune:budget=auto:fused_lora=1,bf16/dialtune:budget=auto,bf16/dialtune:compile=1,bf16/dialtune:ckpt=2:fused_lora=1,int8/dialtune:budget=24,nf4/dialtune:budget=24,nf4/dialtune:budget=auto:fused_lora=1,int8/dialtune}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       WANDB_MODE=disabled

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# the carried wheels were built on the CPU machine: say which import here. accelerate imports
# deepspeed whenever it is installed (the hf rows' Trainer), and nothing in this call needs it,
# so a deepspeed that does not import is removed rather than failing every hf row
for m in bitsandbytes liger_kernel.transformers omegaconf hydra datasets deepspeed; do
    python3 -c "import $m" >> "$OUT/gpu.txt" 2>&1 && echo "import $m: ok" >> "$OUT/gpu.txt" \
        || { echo "import $m: FAILED" >> "$OUT/gpu.txt"; [ $m = deepspeed ] && rm -rf /tmp/site/deepspeed /tmp/site/deepspeed-*; }
done
echo "setup done at $((SECONDS - t0)) s"

# only the files that hold gpu-marked tests: the others import wandb, which this machine lacks
# (exit code 5 = no gpu-marked test collected)
# GPU_TESTS=0 skips them (~45 s, one more benchmark row) when nothing they cover has changed
if [ "${GPU_TESTS:-1}" = 1 ]; then
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee "$OUT/pytest_gpu.log"
    echo "gpu tests done at $((SECONDS - t0)) s"
fi

cp bench/RESULTS.md "$OUT/RESULTS.md"
# per-layer costs on a 4-layer model of the shape's width (~75 s; DIAG=0 skips it): what one
# recomputed layer costs in int8 against bf16 (int8 with every layer recomputed ran far slower than
# the layer count explains, 2026-11-28), and the fused LoRA branch against PEFT's modules
if [ "${DIAG:-1}" = 1 ]; then
    python3 bench/run.py --shape "$SHAPE" --layers 4 --quant int8,bf16 --which "dialtune,dialtune:ckpt=0,bf16/dialtune:ckpt=0:fused_lora=1" \
        --steps 10 --warmup 3 --time-budget 120 --append-results --results-file "$OUT/RESULTS.md" --jsonl "$OUT/diag.jsonl" \
        $([ "${PROFILE:-0}" = 1 ] && echo --profile "$OUT/profile_diag.txt") 2>&1 | tee "$OUT/diag.log"
    echo "per-layer diagnosis done at $((SECONDS - t0)) s"
fi
budget=$((DEADLINE - (SECONDS - t0) - 20))
[ "$budget" -gt 30 ] || budget=30  # (0 would mean no limit)
python3 bench/run.py --shape "$SHAPE" --quant int8,nf4,bf16 --which "$WHICH" --steps "$STEPS" --warmup "$WARMUP" \
    --time-budget "$budget" --append-results --results-file "$OUT/RESULTS.md" --jsonl "$OUT/bench.jsonl" \
    $([ "${PROFILE:-0}" = 1 ] && echo --profile "$OUT/profile.txt") \
    2>&1 | tee "$OUT/bench.log"
echo "total $((SECONDS - t0)) s"
