"""Everything about requests (see shared DESIGN.md); `model/` never imports from here.

Ray-free: request.py (requests, events, refusals), scheduler.py (admission and ordering), engine.py (the
step-level batcher over one Denoiser), metrics.py. Ray Serve: config.py (tiers, limits, pools), api.py (HTTP
bodies), router.py (the ingress, HTTP and gRPC), replica.py (the Denoiser deployment), routing.py (which replica),
app.py (the builder deploy/config.yaml names). Tools: bench_batcher.py, evaluate_tiers.py.
"""
