"""Everything about requests; `model/` never imports from here. Data flow, top to bottom:

    http_server.py / grpc_server.py   one module per protocol: bodies (protocol.py) in, wire format out
    frontend.py                       transport-free: tier, tokenize, open the stream, events -> text, request ids
    ingress.py, routing.py, app.py    Serve: the ingress deployment, the step-aware replica choice, the builder
    replica.py                        the Denoiser deployment: one engine per GPU
    engine.py                         the loop, worker thread, events and metrics (metrics.py)
    scheduler.py, runner.py           who runs next and every phase change; the forwards of one plan
    request.py, config.py, sampling.py  the engine's messages; tiers, pools and limits; the sampler's knobs

Ray-free: everything but ingress.py, routing.py, app.py. Torch-free: everything but replica.py, engine.py and
runner.py, so the ingress never loads torch.
"""
