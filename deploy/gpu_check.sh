#!/usr/bin/env bash
# The GPU measurements, on a machine with one CUDA GPU, in under ten minutes: the full model at bf16 / fp8 / int4
# weights, batches 1, 8 and 16, 16 fixed denoising steps: tokens/s, time to the first draft, peak device memory
# against model/memory.py's plan, quantized logits against bf16 (loadtest/gpu_check.py says what each figure is).
# Then the fp8 pool as deploy/gpu.yaml runs it, compiled with CUDA graphs, if time is left.
# Needs torch (a CUDA build), safetensors and tqdm; nothing is downloaded. JSON lines go to $OUT (default runs/).
#
#     bash deploy/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 330 python3 -m loadtest.gpu_check 2>&1 | tee "$out/gpu_check.jsonl"
timeout 200 python3 -m loadtest.gpu_check --formats fp8 --batches 1,16 --repeats 2 --compile 2>&1 \
    | tee "$out/gpu_check_compiled.jsonl"
