"""The two commands of model/, run as a user runs them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from transformers import AutoTokenizer

from model.denoiser import Denoiser, Request
from model.weights import load_network


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_decoded_generation(window):
    proc = run(
        "model.generate",
        "--model",
        str(window.path),
        "--prompt",
        "w5 w6 w7",
        "--max-new-tokens",
        "12",
        "--steps",
        "2",
        "--seed",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(window.path)
    net, ckpt = load_network(str(window.path))
    ids = tok("w5 w6 w7")["input_ids"]
    assert ids[0] == 2  # the tokenizer adds BOS
    d = Denoiser(net, slots=1, max_context=64, eos_token_ids=ckpt.generation.eos_token_ids)
    settings = dataclasses.replace(ckpt.generation.sampler, max_denoising_steps=2)
    expected = tok.decode(d.generate([Request(ids, 12, settings, seed=4)])[0].tokens, skip_special_tokens=True)
    assert expected.strip()
    assert proc.stdout.strip() == expected.strip()


def test_generate_rejects_bad_arguments(window, tmp_path):
    proc = run("model.generate", "--model", str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = run("model.generate", "--model", str(window.path), "--prompt", "hi", "--steps", "0")
    assert proc.returncode == 2 and "--steps" in proc.stderr


def test_bench_prints_one_json_line_last():
    proc = run("bench.bench_denoiser", "--preset", "tiny", "--batch", "2", "--steps", "2", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("preset", "batch", "steps", "ours_tokens_per_s", "transformers_tokens_per_s", "speedup"):
        assert key in result
    assert result["preset"] == "tiny" and result["batch"] == 2 and result["steps"] == 2
    assert result["ours_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    assert abs(result["speedup"] - result["ours_tokens_per_s"] / result["transformers_tokens_per_s"]) < 0.01


def test_generate_uses_the_shipped_model_and_its_chat_template():
    from model.chat import prompt_ids
    from model.checkpoint import EMBEDDED

    proc = run("model.generate", "--prompt", "reverse: h e l l o", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    net, ckpt = load_network(str(EMBEDDED))
    ids = prompt_ids(tok, "reverse: h e l l o")
    assert tok.decode(ids).startswith("<bos><|turn>user\n")
    gen = ckpt.generation
    d = Denoiser(net, slots=1, max_context=128, eos_token_ids=gen.eos_token_ids)
    expected = d.generate([Request(ids, gen.max_new_tokens, gen.sampler, seed=1)])[0].tokens
    assert proc.stdout.strip() == tok.decode(expected, skip_special_tokens=True).strip()
