"""Every speed benchmark; each prints one JSON object as its last line (docs/benchmarks.md has the figures).

- `python -m bench.bench_denoiser`: our denoiser against transformers' generate, same weights;
- `python -m bench.bench_batcher`: the step-level batcher against static batching and sequential transformers;
- `python -m bench.bench_serve`, `bench_routing`, `bench_prefix`, `bench_prefix_routing`: Serve's paths, the
  step-aware router, the prefix cache and prefix-aware routing;
- `python -m bench.bench_kernels`: the Triton kernels against torch's paths;
- `bash bench/gpu_check.sh` (bench/gpu_check.py): the released model's shape on one GPU, in stages;
- `python -m bench.evaluate_tiers`, `python -m bench.plot_tradeoff`: each tier's accuracy and speed, and the
  README's picture of them.
"""
