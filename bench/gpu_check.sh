#!/usr/bin/env bash
# The GPU measurements, on a bare machine with one CUDA GPU, in under ten minutes, most valuable first
# (bench/gpu_check.py says what each figure is): the released model's shape with random weights; every step
# replayed as a CUDA graph of the eager kernels (no compile) in fp8 and int4 at batches 1 and 16 (int4 with 8
# slots: the 18 GB bar), with a kernel table of one replay; the Triton kernels against torch's grouped GEMMs and
# SDPA at 256, 1,024 and 4,096 tokens; fp8 with compiled regions (recompiles logged, compile seconds, the compile
# cache saved); bf16 graphed; a Gemma 4 MoE of the same shape decoding autoregressively with transformers'
# generate; DiffusionGemma's own generate. 16 fixed denoising steps. JSON files go to $OUT (default runs/gpu):
# env.json, results.jsonl, profile.json, summary.json (the targets, met or not), compile_cache.bin, and gpu.txt
# and log.txt beside them.
#
#     bash bench/gpu_check.sh
#
# Needs torch (a CUDA build), Triton, transformers >= 5.11 (DiffusionGemma), safetensors and tqdm. What is
# missing is installed from the package registry where one is reachable; a machine that reaches none must have
# them, or be given them as wheels (PIP_FIND_LINKS=DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
needs='import torch, triton, safetensors, tqdm; from transformers import DiffusionGemmaForBlockDiffusion, Gemma4ForCausalLM'
if ! python3 -c "$needs" 2>/dev/null; then
    python3 -m pip install -q "transformers>=5.11" safetensors tqdm triton || exit 1
fi
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 540 python3 -m bench.gpu_check --out "$out" --budget-s 480 "$@" 2>&1 | tee "$out/log.txt"
