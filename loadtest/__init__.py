"""Benchmarks and load tests; each prints one JSON object as its last line (docs/benchmarks.md has the figures).

- `python -m loadtest.bench_denoiser`: our denoiser against transformers' generate, same weights;
- `python -m loadtest.bench_batcher`: the step-level batcher against static batching and sequential transformers;
- `python -m loadtest.evaluate_tiers`: each deploy tier's accuracy and speed on the embedded model;
- `python -m loadtest.plot_tradeoff`: the accuracy / tokens-per-second picture of the README.
"""
