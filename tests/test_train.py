"""The training script: a few steps write a checkpoint that both implementations load, the run is
deterministic under its seed, compiling its layers changes nothing but rounding, and the progress monitor leaves
the trained weights as they would be without it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from model.checkpoint import EMBEDDED
from model.training import train
from model.weights import load_network


def _mean_abs_difference(a, b) -> float:
    """Mean |a - b| over every weight of two checkpoints. Not bitwise: a BLAS call may split its sums
    differently when the machine is busy (seen once in nine runs here), and Adam turns a near-zero gradient's
    sign flip into a step of lr. Measured after these 4 steps: 1 thread vs 2 (other sum splits) 7e-5, another
    data stream (other task weights) 3e-3, another seed 2e-2."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    total = sum((wa[k] - wb[k]).abs().sum().item() for k in wa)
    return total / sum(t.numel() for t in wa.values())


@pytest.mark.slow  # five short training runs, one of them compiled: about three minutes
def test_a_short_run_is_deterministic_and_the_monitor_changes_nothing(tmp_path, capsys):
    common = ["--steps", "4", "--batch", "4", "--warmup", "2", "--seed", "3"]
    train.main(["--out", str(tmp_path / "a"), "--monitor-every", "2", *common])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    monitored = [line for line in lines if "monitor_many" in line]
    assert [m["step"] for m in monitored] == [2, 4]
    assert all(0 <= m["monitor_single"] <= 1 and 0 <= m["monitor_many"] <= 1 for m in monitored)
    assert {"reverse", "pick", "latin"} <= set(monitored[0])
    assert any("diff" in line and line["step"] == 4 for line in lines)

    train.main(["--out", str(tmp_path / "b"), "--monitor-every", "0", *common])
    train.main(["--out", str(tmp_path / "c"), "--monitor-every", "0", *common[:-1], "4"])
    assert _mean_abs_difference(tmp_path / "a", tmp_path / "b") < 5e-4
    assert _mean_abs_difference(tmp_path / "a", tmp_path / "c") > 1e-3  # another seed, other weights

    # --compile (each layer through torch.compile) trains the same weights up to rounding (6.3e-4 measured with the
    # present tokenizer; under another data stream's 3e-3)
    train.main(["--out", str(tmp_path / "d"), "--monitor-every", "0", "--compile", *common])
    assert _mean_abs_difference(tmp_path / "a", tmp_path / "d") < 1e-3

    net, ckpt = load_network(str(tmp_path / "a"))
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "a")
    assert net.config.vocab_size == hf.config.text_config.vocab_size == len(AutoTokenizer.from_pretrained(ckpt.path))
    assert ckpt.generation.sampler.max_denoising_steps == 16
    assert torch.equal(net.w.embed.float(), hf.get_input_embeddings().weight.float())


def test_the_monitor_measures_a_trained_model():
    """The monitor builds our network from the in-memory weights: on the shipped checkpoint it must see what
    `python -m model.training.evaluate --entropy-bound 0.1` sees (0.925 single-answer and 0.81 many-answer at 16
    steps on the held-out set; the monitor samples at that bound, not at the checkpoint's 0.01)."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(EMBEDDED)
    line = train.Monitor(AutoTokenizer.from_pretrained(EMBEDDED))(hf)
    assert line["monitor_single"] >= 0.8 and line["monitor_many"] >= 0.4
    assert line["shift"] >= 0.8 and line["pick"] >= 0.5


def test_own_noise_draws_from_the_block_and_leaves_plain_runs_unchanged():
    x0 = torch.zeros(3, train.CANVAS, dtype=torch.long)
    x0[0, :4] = torch.tensor([40, 41, 42, 4])  # a short answer, then the pad fill
    x0[1, :3] = torch.tensor([50, 51, 4])
    x0[2] = torch.arange(100, 100 + train.CANVAS)  # a block with no pad fill
    own = torch.tensor([True, False, True])
    ids = train.noise_ids(x0, own, torch.Generator().manual_seed(0))
    assert set(ids[0].tolist()) <= {40, 41, 42, 4} and len(set(ids[0].tolist())) > 1
    assert set(ids[2].tolist()) <= set(x0[2].tolist())
    assert not set(ids[1].tolist()) <= {50, 51, 4}  # uniform over the vocabulary
    # no own rows: exactly the plain uniform draw, and nothing more taken from the generator
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = train.noise_ids(x0, torch.zeros(3, dtype=torch.bool), gen_a)
    assert torch.equal(plain, torch.randint(0, train.VOCAB, (3, train.CANVAS), generator=gen_b))
    assert torch.equal(torch.rand(4, generator=gen_a), torch.rand(4, generator=gen_b))


def test_training_needs_an_out_folder_so_it_never_overwrites_the_shipped_model(capsys):
    before = (EMBEDDED / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:
        train.main(["--steps", "1", "--batch", "2"])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err
    assert (EMBEDDED / "model.safetensors").stat().st_mtime_ns == before
