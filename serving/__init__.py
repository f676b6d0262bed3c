"""Everything about requests; `model/` never imports from here. Two wings over one contract:

    request.py     the contract both wings import: the typed request, events, refusals and errors
    ingress/       the front door (Serve's Ingress deployment): HTTP and gRPC in, tiers, tokens, text out
    replica/       one per GPU (Serve's pool deployments): the engine, its scheduler and model runner
    config.py, sampling.py   the deploy config (tiers, pools, limits) and the tiers' sampler settings
    app.py, routing.py, autoscaling.py, metrics.py   the Serve application: its builder, which replica of a pool
                   takes a request, how a pool scales, the Prometheus metrics

The ingress imports neither torch nor the replica's modules; the replica imports nothing of the ingress.
"""
