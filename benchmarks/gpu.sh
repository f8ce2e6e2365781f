#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call on a lent GPU machine (see the device notes in BENCHMARKS.md), most
# wanted first: apply_tou on a Llama-2-7B-shaped model in chunks of 16 same-shape matrices, ViT-B/16 at the paper's
# batch 64 in bf16 for FT / LoRA / full TOU / TOU frozen FFN eager and compiled (torch.compile) side by side, a
# profile of one FT and one TOU step in bf16 and fp32 (kernel time by category, how busy the GPU was, the matrix
# products' roofline), the same methods in fp32 eager and compiled, then the 7B shape unchunked. Each part has its
# own time limit, so one that hangs leaves the others' results; the limits add up to 590 s, within one 600 s call.
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
part factorize_llama2_7b_cuda_bf16_chunk16 70 factorize-llm --precision bf16 --chunk 16 --svd-methods gram
part methods_vit_b16_cuda_bf16 190 methods --batch-size 64 --precision bf16 --warmup 4 --steps 10 --eager-and-compiled --methods ft lora tou tou_frozen_ffn
part profile_vit_b16_cuda_bf16 45 profile --batch-size 64 --precision bf16 --warmup 3 --steps 3 --top 25
part profile_vit_b16_cuda_fp32 45 profile --batch-size 64 --precision fp32 --warmup 3 --steps 3 --top 25
part methods_vit_b16_cuda_fp32 180 methods --batch-size 64 --precision fp32 --warmup 4 --steps 10 --eager-and-compiled --methods ft tou tou_frozen_ffn
part factorize_llama2_7b_cuda_bf16 60 factorize-llm --precision bf16 --svd-methods gram
