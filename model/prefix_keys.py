"""The names of a prompt's whole blocks, chained: what the prefix cache stores K/V under (model/prefix_cache.py)
and what a request router compares with the names a replica reports (serving/routing.py). No torch here: the
router runs in the ingress's process.

A block is `block_tokens` prompt tokens at positions [k*B, (k+1)*B); its name is a hash of its tokens and the name
of the block before it, so one name stands for the whole prefix up to the block's end. Python's hash of a tuple of
ints does not depend on the process (PYTHONHASHSEED salts only str and bytes), so replicas and routers agree.
"""

from __future__ import annotations

ROOT = 0  # the parent of a prompt's first block


def block_chain(prompt: list[int], block_tokens: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(name, parent's name, tokens) of each whole block of the prompt, in order."""
    out, parent = [], ROOT
    for start in range(0, len(prompt) - block_tokens + 1, block_tokens):
        tokens = tuple(prompt[start : start + block_tokens])
        key = hash((parent, tokens))
        out.append((key, parent, tokens))
        parent = key
    return out


def block_keys(prompt: list[int], block_tokens: int) -> list[int]:
    return [key for key, _, _ in block_chain(prompt, block_tokens)]
