"""Where a checkpoint is and what its JSON files say: the part of loading that needs no torch.

The ingress reads the same configs as the replicas (canvas length, length cap, stop ids) without importing
torch; the tensors themselves are read by model/weights.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.config import DTYPE_NAMES, GenerationDefaults, TextConfig

EMBEDDED = Path(__file__).parent / "embedded"  # the small model this project trains and ships (model/training)


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    path: Path
    config: TextConfig
    generation: GenerationDefaults
    raw_config: dict

    @property
    def dtype_name(self) -> str:
        """The dtype the weights were saved in (`dtype`, or `torch_dtype` in older configs); float32 if unsaid."""
        name = self.raw_config.get("dtype") or self.raw_config.get("torch_dtype") or "float32"
        return name if name in DTYPE_NAMES else "float32"


def resolve(path_or_id: str) -> Path:
    """A local checkpoint folder, `embedded` (the shipped model), or a hub id fetched with huggingface_hub
    (config, weights, tokenizer)."""
    if path_or_id == "embedded":
        return EMBEDDED
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_id!r} is not a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                path_or_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"],
            )
        )
    except Exception as e:  # offline, unknown repo, gated repo: all end here
        raise CheckpointError(
            f"cannot fetch {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local checkpoint folder instead"
        ) from e


def read_checkpoint(path_or_id: str) -> Checkpoint:
    path = resolve(path_or_id)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    raw = json.loads(cfg_file.read_text())
    config = TextConfig.from_hf(raw)
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return Checkpoint(path, config, GenerationDefaults.from_hf(gen, config), raw)
