"""The HTTP app over a real engine, on uvicorn in a thread of its own (its event loop runs the engine too), on a
free loopback port: what an OpenAI client library or schemathesis calls as it would call a server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from loadtest.serve_run import free_port
from serving.config import AppConfig
from serving.ingress.frontend import Frontend
from serving.ingress.http_server import http_app
from serving.ingress.pools import LocalPool
from serving.replica.deployment import local_replica


@contextmanager
def live_http(
    config: AppConfig, tokenizer: Any = None, wrap: Callable[[LocalPool], Any] | None = None
) -> Iterator[tuple[str, Frontend]]:
    """(base URL, front end) of the app on config's first pool; `wrap` may put something around that pool."""
    port, ready, box = free_port(), threading.Event(), {}

    async def serve() -> None:
        (name, pool), *_ = config.pools.items()
        replica = await local_replica(config.model, pool.model_dump(), name)
        local = LocalPool(replica)
        frontend = Frontend(config, {name: wrap(local) if wrap else local}, tokenizer=tokenizer)
        server = uvicorn.Server(uvicorn.Config(http_app(frontend), host="127.0.0.1", port=port, log_level="warning"))
        box["server"], box["frontend"] = server, frontend
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        ready.set()
        await task
        await replica.engine.stop()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(120), "the app did not start"
    try:
        yield f"http://127.0.0.1:{port}", box["frontend"]
    finally:
        box["server"].should_exit = True
        thread.join(60)
