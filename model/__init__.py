"""The DiffusionGemma denoiser: config, weights, network (prefill/denoise/commit), KV cache and sampler.

Pure PyTorch: nothing here knows about requests, queues, Ray or HTTP.
"""
