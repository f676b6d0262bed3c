"""API keys and per-key limits, for HTTP and gRPC alike.

Keys are never written in a deploy config: the config names where they are (`keys_env`, an environment variable,
or `keys_file`, a file), one per line, each optionally with a public id (`team-a:sk-...`; without one the id is
derived from the key's hash). Only SHA-256 digests are kept in memory. A presented key is hashed and compared
with every stored digest in constant time (hmac.compare_digest, no early exit), so timing tells nothing about
which key or how much of one matched. The key id, never the key, is what limits, metrics and logs see.

Per-key limits (both optional): concurrent requests, and tokens per minute as a token bucket that refills
continuously. A request reserves its prompt tokens plus its length cap when it is admitted and gives back what
it did not use when it ends. Over either limit: 429 / RESOURCE_EXHAUSTED with a retry hint. The limits hold per
ingress replica (each keeps its own counts); with N ingress replicas a key may use up to N times them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving.config import Auth
from serving.request import InvalidRequest, KeyLimited, Unauthenticated

KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_LENGTH = 16


class KeyConfigError(ValueError):
    """The configured key source is missing, empty or malformed (the ingress refuses to start)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str, source: str) -> dict[str, bytes]:
    """Key id -> SHA-256 digest, from lines of `key` or `id:key` (blank lines and `#` comments skipped)."""
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kid, sep, key = line.partition(":")
        if not sep or not KEY_ID.fullmatch(kid):  # a bare key (which may itself contain ':')
            kid, key = "key-" + hashlib.sha256(line.encode()).hexdigest()[:8], line
        if len(key) < MIN_KEY_LENGTH:
            raise KeyConfigError(f"{source}, line {number}: a key must be at least {MIN_KEY_LENGTH} characters")
        if kid in keys:
            raise KeyConfigError(f"{source}, line {number}: key id {kid!r} appears twice")
        keys[kid] = _digest(key)
    if not keys:
        raise KeyConfigError(f"{source} holds no keys")
    return keys


def load_keys(auth: Auth) -> dict[str, bytes]:
    if auth.keys_env is not None:
        text = os.environ.get(auth.keys_env)
        if text is None:
            raise KeyConfigError(f"auth.keys_env: the environment variable {auth.keys_env} is not set")
        return parse_keys(text, f"environment variable {auth.keys_env}")
    path = Path(auth.keys_file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyConfigError(f"auth.keys_file: cannot read {path}: {exc.strerror}") from exc
    return parse_keys(text, f"file {path}")


@dataclass
class _Usage:
    """One key's live requests and token bucket."""

    live: int = 0
    tokens: float = 0.0
    at: float = 0.0


@dataclass
class Grant:
    """An admitted request's share of its key's limits; `release` once, when the request ends."""

    gate: KeyGate
    key_id: str
    reserved: int
    released: bool = field(default=False)

    def release(self, used_tokens: int | None = None) -> None:
        if not self.released:
            self.released = True
            self.gate._release(self.key_id, self.reserved, used_tokens)


class KeyGate:
    """Who may call (the keys) and how much (the limits), for one ingress replica."""

    def __init__(self, auth: Auth, clock: Callable[[], float] = time.monotonic):
        self.auth = auth
        self.keys = load_keys(auth)
        self.clock = clock
        full, now = float(auth.tokens_per_minute or 0), clock()
        self.usage: dict[str, _Usage] = {kid: _Usage(tokens=full, at=now) for kid in self.keys}

    def identify(self, authorization: str | None) -> str:
        """The key id of an `Authorization: Bearer <key>` value (HTTP header or gRPC metadata)."""
        if not authorization:
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization must be 'Bearer <key>'")
        digest = _digest(key.strip())
        found = None
        for kid, stored in self.keys.items():  # every digest compared: no early exit
            if hmac.compare_digest(digest, stored):
                found = kid
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return found

    def admit(self, key_id: str, tokens: int) -> Grant:
        """Reserve a request's tokens (prompt + length cap) and a concurrency place, or refuse."""
        a, u = self.auth, self.usage[key_id]
        if a.max_concurrent is not None and u.live >= a.max_concurrent:
            raise KeyLimited(f"key {key_id} has {u.live} requests in flight; its limit is {a.max_concurrent}", 1.0)
        if a.tokens_per_minute is not None:
            if tokens > a.tokens_per_minute:
                raise InvalidRequest(
                    "max_tokens",
                    f"prompt and length cap ({tokens} tokens) exceed key {key_id}'s {a.tokens_per_minute} tokens per "
                    "minute; ask for fewer tokens",
                )
            self._refill(u)
            if u.tokens < tokens:
                wait = (tokens - u.tokens) / (a.tokens_per_minute / 60)
                raise KeyLimited(f"key {key_id} is over its {a.tokens_per_minute} tokens per minute", wait)
            u.tokens -= tokens
        u.live += 1
        return Grant(self, key_id, tokens if a.tokens_per_minute is not None else 0)

    def _refill(self, u: _Usage) -> None:
        now = self.clock()
        rate = self.auth.tokens_per_minute / 60
        u.tokens = min(float(self.auth.tokens_per_minute), u.tokens + (now - u.at) * rate)
        u.at = now

    def _release(self, key_id: str, reserved: int, used: int | None) -> None:
        u = self.usage[key_id]
        u.live -= 1
        if reserved:
            self._refill(u)
            unused = reserved - min(reserved, used if used is not None else 0)
            u.tokens = min(float(self.auth.tokens_per_minute), u.tokens + unused)
