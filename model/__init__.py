"""The DiffusionGemma denoiser: config, checkpoint reading and weight loading, the network (prefill, denoise,
commit), the KV cache and the sampler; `python -m model.generate` drives it from the command line.

Pure PyTorch: nothing here knows about requests, queues, Ray or HTTP. The embedded model's training and
evaluation tools are in model/training/, which replicas never import.
"""
