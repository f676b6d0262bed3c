#!/usr/bin/env bash
# The GPU measurements, on a bare machine with one CUDA GPU, in at most 8 minutes: the released model's shape
# with random weights at bf16 / fp8 / int4; batches 1, 8 and 16 (compiled: 1 and 16); 16 fixed denoising steps;
# our denoiser eager and compiled (torch.compile, fullgraph, CUDA graphs); transformers' generate on the same
# weights (bf16, batch 1, its default and its static cache); tokens/s, time per forward, time to first draft and
# to first canvas, peak memory against the plan, and a profile of one forward (loadtest/gpu_check.py says what
# each figure is). JSON files go to $OUT (default runs/gpu): env.json, results.jsonl, profile.json, summary.json,
# and gpu.txt and log.txt beside them.
#
#     bash deploy/gpu_check.sh
#
# Needs torch (a CUDA build), transformers >= 5.11 (DiffusionGemma), safetensors and tqdm. What is missing is
# installed from the package registry where one is reachable; a machine that reaches none must have them, or be
# given them as wheels (PIP_FIND_LINKS=DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
needs='import torch, safetensors, tqdm; from transformers import DiffusionGemmaForBlockDiffusion'
if ! python3 -c "$needs" 2>/dev/null; then
    python3 -m pip install -q "transformers>=5.11" safetensors tqdm || exit 1
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 480 python3 -m loadtest.gpu_check --out "$out" --budget-s 420 2>&1 | tee "$out/log.txt"
