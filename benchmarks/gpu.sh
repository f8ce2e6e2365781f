#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call on a lent GPU machine (see the device notes in BENCHMARKS.md):
# a profile of one FT and one TOU step (by kernel category, with the matrix products' roofline) in bf16 and fp32,
# every method's training step on ViT-B/16 at the paper's batch 64 in fp32 and bf16, FT / LoRA / full TOU / TOU
# frozen FFN compiled too (torch.compile), then apply_tou on a Llama-2-7B-shaped model, whole and in chunks of 16
# same-shape matrices. Each part has its own time limit, so one that hangs leaves the others' results; the limits
# add up to about 11 minutes, the parts' expected times to about 7.
# Usage: OUT=<folder> bash benchmarks/gpu.sh
set -u
OUT="${OUT:-benchmarks/results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, timm, transformers, peft; print('torch', torch.__version__, 'timm', timm.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
part() {  # part NAME LIMIT ARGS...: one bench.py command, its table to $OUT/NAME.txt and its numbers to NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" python3 benchmarks/bench.py "$@" --device cuda --json "$OUT/$name.json" 2>"$OUT/$name.err" \
    | tee "$OUT/$name.txt" || { echo "$name failed or timed out:"; tail -5 "$OUT/$name.err"; }
}
part profile_vit_b16_cuda_bf16 60 profile --batch-size 64 --precision bf16 --warmup 3 --steps 3 --top 25
part profile_vit_b16_cuda_fp32 60 profile --batch-size 64 --precision fp32 --warmup 3 --steps 3 --top 25
part methods_vit_b16_cuda_fp32 190 methods --batch-size 64 --precision fp32 --warmup 3 --steps 10
part methods_vit_b16_cuda_bf16 120 methods --batch-size 64 --precision bf16 --warmup 3 --steps 10 --methods ft lora tou tou_frozen_ffn adapter
part methods_vit_b16_cuda_bf16_compiled 150 methods --batch-size 64 --precision bf16 --warmup 4 --steps 10 --compile --methods ft lora tou tou_frozen_ffn
part factorize_llama2_7b_cuda_bf16_chunk16 90 factorize-llm --precision bf16 --chunk 16 --svd-methods gram
part factorize_llama2_7b_cuda_bf16 90 factorize-llm --precision bf16 --svd-methods gram
