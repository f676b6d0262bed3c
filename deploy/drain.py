"""Stop a running app gracefully: refuse new requests, let those in flight finish, then (optionally) shut down.

    python -m deploy.drain deploy/config.yaml --dashboard http://127.0.0.1:8265 --timeout 60 --shutdown
    python -m deploy.drain deploy/config.yaml --dashboard http://127.0.0.1:8265 --resume   # take requests again

`serve shutdown` alone kills Serve's proxies at once: streams in flight are cut at the transport. A redeploy
(`serve deploy` of a changed config) needs none of this: Serve starts new replicas and drains the old ones.

Draining is the ingress deployment's user_config, `{draining: true}`, deployed with the same config file the
app runs (so nothing else changes and nothing restarts): Serve calls `Ingress.reconfigure` on every ingress
replica in place. From then on new requests get 503 with Retry-After (gRPC UNAVAILABLE), /ready answers 503
`{"status": "draining", ...}` with the pools' loads, and this waits until no request is queued or live in any
pool (or --timeout passes), reading /ready. With --shutdown it then deploys an empty config (Serve drains every
replica, its proxies still relaying) and, once the apps are gone, shuts Serve down as `serve shutdown` does.
The last line printed is a JSON object: drained, waited_s, in_flight (left at the end), stopped_s.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import httpx
import yaml

INGRESS = "Ingress"
BUILDER = "serving.app:build"


def with_draining(config: dict, draining: bool) -> dict:
    """The config with the ingress's user_config set, in every application this project builds."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        if app.get("import_path") != BUILDER:
            continue
        overrides = app.setdefault("deployments", [])
        ingress = next((d for d in overrides if d.get("name") == INGRESS), None)
        if ingress is None:
            ingress = {"name": INGRESS}
            overrides.append(ingress)
        ingress["user_config"] = {**ingress.get("user_config", {}), "draining": draining}
    return config


def http_address(config: dict) -> str:
    options = config.get("http_options", {})
    host = options.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{options.get('port', 8000)}"


def in_flight(http: str) -> int | None:
    """Requests queued or live in every pool, from /ready; None while /ready does not show the draining state
    (the reconfiguration has not reached the ingress replica that answered) or the app does not answer."""
    try:
        r = httpx.get(f"{http}/ready", timeout=10)
        body = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    if r.status_code != 503 or body.get("status") != "draining":
        return None
    return sum(p["queue_depth"] + p["live_requests"] for p in body["pools"].values())


def drain(config: dict, dashboard: str, http: str, timeout_s: float, shutdown: bool) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard)
    client.deploy_applications(with_draining(config, True))
    started = time.monotonic()
    left = None
    while time.monotonic() - started < timeout_s:
        left = in_flight(http)
        if left == 0:
            break
        time.sleep(0.5)
    result = {"drained": left == 0, "waited_s": round(time.monotonic() - started, 1), "in_flight": left}
    if shutdown:
        # /ready shows one replica's load per pool (the one the request router picks), so a pool of several may still
        # hold requests. Deleting the apps with the proxies up (an empty config) lets Serve drain every replica
        # (graceful_shutdown_timeout_s) and relay its streams to their end; only then does Serve stop.
        client.deploy_applications(config | {"applications": []})
        while client.get_serve_details().get("applications") and time.monotonic() - started < 2 * timeout_s:
            time.sleep(0.5)
        client.delete_applications()
        result["stopped_s"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the config file the app was deployed with")
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard (Serve's REST API)")
    parser.add_argument("--http", help="the app's HTTP address (default: from the config's http_options)")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for requests in flight, s")
    parser.add_argument("--shutdown", action="store_true", help="delete the apps once drained (or timed out)")
    parser.add_argument("--resume", action="store_true", help="take new requests again (undo a drain)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    if args.resume:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        ServeSubmissionClient(args.dashboard).deploy_applications(with_draining(config, False))
        print(json.dumps({"draining": False}))
        return
    print(json.dumps(drain(config, args.dashboard, args.http or http_address(config), args.timeout, args.shutdown)))


if __name__ == "__main__":
    main()
