"""A replica: one per GPU, a pool's Serve deployment (PoolReplica) over one engine.

deployment.py     the Serve deployment: loads the network, builds the engine, answers generate and load
engine.py         the loop on its worker thread: plan, run, apply; events and metrics
scheduler.py      every job's phase, who runs next, admission and the queue
runner.py         the forwards of one plan on the model's Denoiser
latency_bound.py  the pool's latency bound under overload (max_slowdown)
"""
