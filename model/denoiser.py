"""The denoiser: network + KV cache + per-slot sampler state, driven one step at a time.

A slot holds one request. The step-level API (prefill, start_canvas, step, commit, release) is what a batcher
drives: any set of slots may be stepped together whatever step each is at, because every per-row quantity
(temperature, caps, thresholds, seed, canvas index) lives in per-slot tensors. `generate` is the simple driver
on top of it, used by the CLI, the benchmark and the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from model import rng
from model.automaton import TokenAutomaton
from model.config import MAX_TOP_LOGPROBS, SamplerSettings, canvas_count, context_needed
from model.constraint import canvas_ends, constrained_canvas
from model.kernels import vocab as vocab_kernel
from model.kv_cache import KVCache
from model.network import Network
from model.prefix_cache import PrefixCache
from model.sampler import decide, draw, entropy_and_weights, row_max, temperature

# The vocabulary pass's two fp32 [tile, V] buffers together: 512 MiB holds 256 tokens of the released model's
# 262,144-word vocabulary (one canvas per tile pair) and 2,048 of the mid preset's, whatever the batch.
VOCAB_WORKSPACE_BYTES = 512 << 20


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int = 0
    template: list[int] | None = None  # fixed answer tokens, -1 where the sampler fills (Denoiser.admit)
    constraint: TokenAutomaton | None = None  # the language the answer must be in (model/constraint.py)


@dataclass
class Generation:
    tokens: list[int]  # whole canvases, the last one cut after its first EOS
    finish_reason: str  # "eos" or "length"
    steps: list[int]  # denoising steps run per canvas
    cache_length: int = 0  # tokens cached at the end: prompt + C * (canvases - 1), the last canvas is never encoded


@dataclass
class LogProbs:
    """Log-probabilities of the argmax canvas under this step's untempered distribution (the softcapped logits),
    for the rows that asked for them (others hold NaN and -1)."""

    chosen: torch.Tensor  # [B, C] of each argmax token
    top_ids: torch.Tensor  # [B, C, K] the K most likely tokens (K: the most any stepped row asked for)
    top: torch.Tensor  # [B, C, K] their log-probabilities


@dataclass
class SlotConstraint:
    """A constrained slot's walk through its automaton: where its committed canvases left it, where its current
    argmax canvas would, and where each canvas may end (canvas_ends)."""

    automaton: TokenAutomaton
    ends: torch.Tensor  # [canvases + 1, S] bool
    state: torch.Tensor  # 0-d, on the device
    end: torch.Tensor  # 0-d: after the current argmax canvas
    canvas: int = 0  # canvases committed


@dataclass
class StepResult:
    done: list[bool]  # per stepped slot: its canvas is ready to commit
    steps: list[int]  # steps taken so far on each slot's canvas
    argmax: torch.Tensor  # [B, C] current argmax canvases (drafts)
    logprobs: LogProbs | None = None  # when a stepped row asked for them


class Denoiser:
    def __init__(
        self,
        network: Network,
        slots: int,
        max_context: int,
        eos_token_ids: tuple[int, ...] = (1,),
        max_stability: int = 4,
        vocab_workspace_bytes: int = VOCAB_WORKSPACE_BYTES,
        static_shapes: bool = False,
        compile: bool = False,
        prefix_cache_bytes: int = 0,
        prefix_block_tokens: int = 64,
        compile_backend: str = "inductor",
        cuda_graphs: bool | None = None,
    ):
        """static_shapes: the denoising forward attends over the whole cache capacity with a mask and always
        takes the soft embedding (zeros on a first step, which is exact), so its shapes depend on the row count
        only; compile (implies static_shapes): torch.compile that forward layer by layer (Network.compile_regions);
        cuda_graphs (implies static_shapes; default: with compile, on a GPU): replay each step, the forward, the
        vocabulary pass and the sampler's decision, as one CUDA graph per row count (model/cuda_graphs.py; without
        compile it captures the eager kernels: the launch savings at no compile time). A batcher then pads rows
        to a few bucket sizes so each graph is reused. prefix_cache_bytes: memory for the K/V of prompt blocks
        kept across requests (model/prefix_cache.py; 0: none). compile_backend: torch.compile's (tests trace with
        "aot_eager": the same whole-graph capture without building kernels)."""
        self.net = network
        c = network.config
        dev = network.device
        self.config = c
        self.canvas_length = c.canvas_length
        self.eos = torch.tensor(eos_token_ids, device=dev)
        self.eos_ids = set(eos_token_ids)
        self.vocab_workspace_bytes = vocab_workspace_bytes
        self.cache = KVCache(c, slots, max_context, dev, network.dtype)
        self.prefix = PrefixCache(self.cache, prefix_cache_bytes, prefix_block_tokens) if prefix_cache_bytes else None
        C = c.canvas_length
        i64 = dict(dtype=torch.int64, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        self.canvas = torch.zeros(slots, C, **i64)
        self.argmax = torch.zeros(slots, C, **i64)
        self.history = torch.full((slots, max_stability, C), -1, **i64)
        self.soft = torch.zeros(slots, C, c.hidden_size, **f32)
        self.has_soft = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.step_index = torch.zeros(slots, **i64)
        self.canvas_index = torch.zeros(slots, **i64)
        self.seed = torch.zeros(slots, **i64)
        self.cap = torch.ones(slots, **i64)
        self.stability = torch.zeros(slots, **i64)
        self.t_min = torch.zeros(slots, **f32)
        self.t_max = torch.ones(slots, **f32)
        self.bound = torch.zeros(slots, **f32)
        self.confidence = torch.zeros(slots, **f32)
        self.temp_scale = torch.ones(slots, **f32)  # the request's temperature: a factor on its schedule
        self.top_logprobs = torch.full((slots,), -1, **i64)  # -1: no log-probabilities; k >= 0: chosen + top k
        self.wants_logprobs: set[int] = set()  # the slots whose top_logprobs >= 0, known on the host
        # canvas templates: per slot, the answer's fixed tokens (-1: a free position) and the current canvas's part
        self.templates: dict[int, list[int]] = {}
        self.fixed = torch.zeros(slots, C, dtype=torch.bool, device=dev)
        self.fixed_ids = torch.zeros(slots, C, **i64)
        self.constraints: dict[int, SlotConstraint] = {}
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        cuda_graphs = (compile and dev.type == "cuda") if cuda_graphs is None else cuda_graphs
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {dev.type}")
        self.static_shapes = static_shapes or compile or cuda_graphs
        if compile:
            # The per-expert loop branches on routed-token counts (a graph break per layer); grouped_mm gives
            # the same results without leaving the graph.
            network.use_grouped_mm = True
            network.compile_regions(compile_backend)  # each layer shape one compiled region (fullgraph)
        self.step_graphs = None
        if cuda_graphs:
            from model.cuda_graphs import StepGraphs

            # the vocabulary workspace at its largest, once: a graph keeps the addresses it was captured with
            self._scratch(self.vocab_tile(slots * C), c.vocab_size)
            state = [self.canvas, self.argmax, self.history, self.soft, self.has_soft, self.step_index]
            self.step_graphs = StepGraphs(self._plain_step, state)

    # ---------------------------------------------------------------- step-level API

    def admit(
        self,
        slot: int,
        settings: SamplerSettings,
        seed: int,
        logprobs: int | None = None,
        template: list[int] | None = None,
        constraint: TokenAutomaton | None = None,
        room: int = 0,
    ) -> None:
        """Claim a free slot for a new request (its prompt goes in with `prefill`). logprobs: None for none, k
        for each committed token's log-probability and the top k alternatives' (k <= MAX_TOP_LOGPROBS).
        template: the answer's first tokens, fixed, with -1 at the positions the sampler fills (canvas k takes
        template[k*C : (k+1)*C]; positions past its end are free): fixed positions never change. constraint:
        the answer is written in its language, within `room` tokens (model/constraint.py); ValueError when no
        answer of that room can be."""
        if template is not None and any(not -1 <= t < self.config.vocab_size for t in template):
            raise ValueError(f"template ids must be -1 (free) or within [0, {self.config.vocab_size})")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be within [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        if constraint is not None:
            a = constraint.to(self.net.device)
            ends = canvas_ends(a, room, self.canvas_length, template)
            if not bool(ends[0, a.start]):
                raise ValueError(f"no answer of at most {room} tokens matches the constraint (and template)")
            start = torch.tensor(a.start, device=self.net.device)
            constrained = SlotConstraint(a, ends, start, start)
        if settings.stability_threshold > self.history.shape[1]:
            raise ValueError(
                f"stability_threshold {settings.stability_threshold} exceeds this denoiser's {self.history.shape[1]}"
            )
        self.cache.reset(torch.tensor([slot]))
        self.seed[slot] = seed
        self.canvas_index[slot] = 0
        self.cap[slot] = settings.max_denoising_steps
        self.stability[slot] = settings.stability_threshold
        self.t_min[slot] = settings.t_min
        self.t_max[slot] = settings.t_max
        self.bound[slot] = settings.entropy_bound
        conf = settings.confidence_threshold
        self.confidence[slot] = -math.inf if conf is None else conf
        self.temp_scale[slot] = settings.temperature
        self.top_logprobs[slot] = -1 if logprobs is None else logprobs
        (self.wants_logprobs.discard if logprobs is None else self.wants_logprobs.add)(slot)
        self.fixed[slot] = False
        if template and any(t >= 0 for t in template):
            self.templates[slot] = list(template)
        else:
            self.templates.pop(slot, None)
        if constraint is not None:
            self.constraints[slot] = constrained
        else:
            self.constraints.pop(slot, None)

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        self.encode(slots, prompts, [])

    def encode(self, prefill_slots: list[int], prompts: list[list[int]], commit_slots: list[int]) -> list[int]:
        """One causal forward that appends prompts to some slots and committed argmax canvases to others: both
        are the same encoder pass, so a batcher runs them together (rows right-padded to the longest). With a
        prefix cache, a prompt's cached blocks are copied in first and only the rest is encoded, and its other
        whole blocks are stored as the forward computes them. Returns the prompt tokens each prefill row took
        from the cache."""
        if prompts and min(len(p) for p in prompts) == 0:
            raise ValueError("a prompt must hold at least one token")
        if self.prefix is None or not prompts:
            self._encode(prefill_slots, prompts, commit_slots)
            return [0] * len(prompts)
        held, captures, rest = [], [], []
        try:
            for row, (slot, prompt) in enumerate(zip(prefill_slots, prompts)):
                blocks = self.prefix.match(prompt)
                held.append(blocks)
                self.prefix.restore(slot, blocks)
                capture = self.prefix.plan_capture(row, prompt, len(blocks))
                if capture is not None:
                    captures.append(capture)
                rest.append(prompt[len(blocks) * self.prefix.block_tokens :])
            self.cache.capture = (self.prefix, captures) if captures else None
            self._encode(prefill_slots, rest, commit_slots)
            ok = True
        except BaseException:
            ok = False
            raise
        finally:
            self.cache.capture = None
            self.prefix.commit(captures, ok)
            for blocks in held:
                self.prefix.release(blocks)
        return [len(p) - len(r) for p, r in zip(prompts, rest)]

    def _encode(self, prefill_slots: list[int], prompts: list[list[int]], commit_slots: list[int]) -> None:
        dev = self.net.device
        C = self.canvas_length
        n = max([len(p) for p in prompts] + ([C] if commit_slots else []))
        ids = torch.full((len(prompts) + len(commit_slots), n), self.config.pad_token_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(dev)
        committed = torch.tensor(commit_slots, dtype=torch.int64, device=dev)
        if commit_slots:
            ids[len(prompts) :, :C] = self.argmax[committed]
        count = torch.tensor([len(p) for p in prompts] + [C] * len(commit_slots), device=dev)
        slots = torch.tensor(prefill_slots + commit_slots, dtype=torch.int64, device=dev)
        self.net.prefill(self.cache, slots, ids, count)
        self.canvas_index[committed] += 1
        for slot in (s for s in commit_slots if s in self.constraints):  # the walk goes on where the canvas left it
            sc = self.constraints[slot]
            sc.state, sc.canvas = sc.end, sc.canvas + 1

    def start_canvas(self, slots: list[int]) -> None:
        """A fresh uniform-random canvas, step 0, empty stability history, no self-conditioning."""
        idx = torch.tensor(slots, dtype=torch.int64, device=self.net.device)
        zero = torch.zeros_like(idx)
        self.canvas[idx] = rng.random_ids(
            self.seed[idx], self.canvas_index[idx], zero, rng.INIT, self.canvas_length, self.config.vocab_size
        )
        for slot in (s for s in slots if s in self.templates):
            self._template_canvas(slot)
        self.step_index[idx] = 0
        self.history[idx] = -1
        self.soft[idx] = 0.0
        self.has_soft[idx] = False

    def step(self, slots: list[int]) -> StepResult:
        """One denoising step for each slot: a denoise forward, then the sampler. With CUDA graphs, a step of
        rows without templates, constraints or log-probabilities is one graph replay."""
        idx = torch.tensor(slots, dtype=torch.int64, device=self.net.device)
        templated = any(s in self.templates for s in slots)
        logprobs = any(s in self.wants_logprobs for s in slots)
        constrained = [(row, s) for row, s in enumerate(slots) if s in self.constraints]
        with torch.inference_mode():
            if self.step_graphs is not None and not templated and not logprobs and not constrained:
                done, steps, argmax = (t.clone() for t in self.step_graphs(idx))
                lp = None
            else:
                done, steps, argmax, lp = self._step_core(idx, templated, logprobs, constrained)
        return StepResult(done.tolist(), steps.tolist(), argmax, lp)

    def _plain_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step of rows without templates or log-probabilities: what a CUDA graph captures (no host reads)."""
        done, steps, argmax, _ = self._step_core(idx, templated=False, logprobs=False)
        return done, steps, argmax

    def _step_core(
        self, idx: torch.Tensor, templated: bool, logprobs: bool, constrained: list[tuple[int, int]] = ()
    ) -> tuple:
        """The step on device tensors: (done [B], steps taken [B], argmax canvases [B, C], LogProbs or None),
        the slots' state written last. Host reads only where the static path does not go (`templated`,
        `logprobs`, the (row, slot) pairs `constrained`, and the skipped self-conditioning MLP and soft
        embeddings of the dynamic path)."""
        if self.static_shapes:
            soft = self.soft[idx]
        else:  # skip the self-conditioning MLP when every row is on its first step
            soft = self.soft[idx] if bool(self.has_soft[idx].any()) else None
        hidden = self.net.denoise_graph(self.cache, idx, self.canvas[idx], soft, static=self.static_shapes)
        step = self.step_index[idx]
        scale = self.temp_scale[idx]
        temp = temperature(step, self.cap[idx], self.t_min[idx], self.t_max[idx], scale)
        # A row on the last step its cap allows is committed after it: its soft embedding (half the vocabulary
        # GEMMs of a step) would never be read. The static path keeps one shape and computes it anyway.
        needs_soft = None if self.static_shapes else (step + 1 < self.cap[idx]).cpu()
        top_k = self.top_logprobs[idx].cpu() if logprobs else None
        entropy, sample, argmax, soft_new, lp = self._vocab_pass(hidden, temp, idx, step, needs_soft, top_k)
        sample = torch.where((scale == 0)[:, None], argmax, sample)  # temperature 0: the argmax path, exactly
        free = fixed_rows = None
        if templated:  # fixed positions: their own token, certain, always accepted
            fixed, fixed_ids = self.fixed[idx], self.fixed_ids[idx]
            argmax = torch.where(fixed, fixed_ids, argmax)
            sample = torch.where(fixed, fixed_ids, sample)
            entropy = entropy.masked_fill(fixed, 0.0)
            free, fixed_rows = ~fixed, fixed.any(-1)
        if constrained:
            argmax, sample = self._constrain(constrained, hidden, temp, idx, step, argmax.clone(), sample.clone(), lp)
        history = self.history[idx]
        d = decide(
            entropy,
            sample,
            argmax,
            history,
            step=step,
            cap=self.cap[idx],
            bound=self.bound[idx],
            stability=self.stability[idx],
            confidence=self.confidence[idx],
            seed=self.seed[idx],
            canvas_index=self.canvas_index[idx],
            vocab_size=self.config.vocab_size,
            free=free,
            templated=fixed_rows,
        )
        if free is not None:
            d.canvas = torch.where(~free, argmax, d.canvas)
        self.canvas[idx] = d.canvas
        self.argmax[idx] = d.argmax
        self.history[idx] = history
        self.soft[idx] = soft_new
        self.has_soft[idx] = True
        self.step_index[idx] = step + 1
        return d.done, step + 1, d.argmax, lp

    def _template_canvas(self, slot: int) -> None:
        """The slot's template part for its current canvas, fixed in the canvas (the rest stays free)."""
        C = self.canvas_length
        k = int(self.canvas_index[slot])
        part = self.templates[slot][k * C : (k + 1) * C]
        ids = torch.tensor(part + [-1] * (C - len(part)), dtype=torch.int64, device=self.net.device)
        self.fixed[slot] = ids >= 0
        self.fixed_ids[slot] = ids.clamp(min=0)
        self.canvas[slot] = torch.where(self.fixed[slot], self.fixed_ids[slot], self.canvas[slot])

    def _constrain(self, rows, hidden, temp, idx, step, argmax, sample, lp: LogProbs | None) -> tuple:
        """The constrained rows' argmax and sample canvases, each chosen as one path of its automaton from the
        row's own untempered logits (recomputed for these rows: the vocabulary pass keeps no [C, V] row)."""
        C, cap = self.canvas_length, self.config.final_logit_softcapping
        uniform = rng.random_uniform(self.seed[idx], self.canvas_index[idx], step, rng.PATH, 2 * (C + 1))
        for row, slot in rows:
            sc = self.constraints[slot]
            x = (hidden[row] * (2 / cap)).to(self.net.dtype)
            logits = (x @ self.net.w.embed.T).float().sigmoid_().mul_(2 * cap).sub_(cap)  # the softcapped logits
            fixed = torch.where(self.fixed[slot], self.fixed_ids[slot], -1) if slot in self.templates else None
            ends = sc.ends[min(sc.canvas + 1, len(sc.ends) - 1)]
            out = constrained_canvas(sc.automaton, sc.state, logits, temp[row], ends, uniform[row].view(2, -1), fixed)
            argmax[row], sample[row], sc.end = out.argmax, out.sample, out.argmax_end
            if lp is not None and slot in self.wants_logprobs:  # the chosen tokens' own, top-k as the model saw it
                lp.chosen[row] = torch.log_softmax(logits, -1).gather(1, out.argmax[:, None])[:, 0]
        return argmax, sample

    def commit(self, slots: list[int]) -> None:
        """Encode the slots' argmax canvases into the cache; the next canvas starts after them (a constrained
        slot's walk where its canvas left it)."""
        self.encode([], [], slots)

    def release(self, slots: list[int]) -> None:
        self.cache.reset(torch.tensor(slots, dtype=torch.int64, device=self.net.device))
        for slot in slots:
            self.templates.pop(slot, None)
            self.wants_logprobs.discard(slot)
            self.constraints.pop(slot, None)

    # ---------------------------------------------------------------- the vocabulary pass

    def _vocab_pass(
        self,
        hidden: torch.Tensor,
        temp: torch.Tensor,
        idx: torch.Tensor,
        step: torch.Tensor,
        needs_soft: torch.Tensor | None = None,
        top_k: torch.Tensor | None = None,
    ):
        """LM head, softcap, temperature, entropy, argmax, soft embedding and sample, tiled over tokens so that
        at most two [tile, V] fp32 buffers (together one [rows, canvas, V]) exist at any time. Rows whose
        `needs_soft` (CPU bool [B]) is False get a zero soft embedding instead of the product; rows whose
        `top_k` (CPU int [B]) is >= 0 get log-probabilities (LogProbs, else None)."""
        c = self.config
        b, C, h = hidden.shape
        n_tok = b * C
        vocab = c.vocab_size
        cap = c.final_logit_softcapping
        tile = self.vocab_tile(n_tok)
        self._scratch(tile, vocab)  # the tiles' two buffers (self._buffers), allocated once
        flat = hidden.reshape(n_tok, h)
        # 30*tanh(x/30)/T == (60/T)*sigmoid(x/15) - 30/T, and the constant drops out once the max is subtracted.
        scale = (2 * cap / temp).repeat_interleave(C)
        uniform = rng.random_uniform(self.seed[idx], self.canvas_index[idx], step, rng.DRAW, C).reshape(n_tok)
        entropy = torch.empty(n_tok, device=hidden.device)
        norm = torch.empty(n_tok, device=hidden.device)  # each token's sum of weights: the soft embedding's divisor
        sample = torch.empty(n_tok, dtype=torch.int64, device=hidden.device)
        argmax = torch.empty(n_tok, dtype=torch.int64, device=hidden.device)
        soft = torch.empty(n_tok, h, device=hidden.device)
        wanted = None if needs_soft is None or bool(needs_soft.all()) else needs_soft.repeat_interleave(C)
        lp = None if top_k is None or int(top_k.max()) < 0 else self._logprob_outputs(top_k, C, hidden.device)
        outs = (entropy, norm, sample, argmax)
        low = self.net.dtype != torch.float32
        fused = low and self.net.kernels == "triton" and vocab_kernel.supports(vocab)
        for s in range(0, n_tok, tile):
            e = min(n_tok, s + tile)
            x = (flat[s:e] * (2 / cap)).to(self.net.dtype)
            tile_pass = self._tile_fused if fused else self._tile_torch
            weights = tile_pass(x, (s, e), scale[s:e], uniform[s:e], outs, lp)
            rows = None if wanted is None else wanted[s:e].nonzero().squeeze(1).to(hidden.device)
            self._tile_soft(weights, rows, soft, (s, e))
        soft.mul_(self.net.embed_scale / norm[:, None])  # weights @ E / sum: probabilities @ E, once for every path
        logprobs = None
        if lp is not None:
            k = lp[2].shape[-1]
            logprobs = LogProbs(lp[1].view(b, C), lp[2].view(b, C, k), lp[3].view(b, C, k))
        return entropy.view(b, C), sample.view(b, C), argmax.view(b, C), soft.view(b, C, h), logprobs

    def _tile_torch(self, x, span: tuple[int, int], scale, uniform, outs: tuple, lp) -> torch.Tensor:
        """One tile of the vocabulary pass in torch, in the fp32 buffers; returns the unnormalised weights."""
        (s, e), vocab, embed = span, self.config.vocab_size, self.net.w.embed
        entropy, norm, sample, argmax = outs
        n = e - s
        logit_buf, prob_buf = self._buffers
        logits, probs = logit_buf[:n], prob_buf[:n]
        if self.net.dtype != torch.float32:  # the low-precision product lands in the (still free) weights' bytes
            raw = prob_buf.view(-1).view(self.net.dtype)[: n * vocab].view(n, vocab)
            torch.mm(x, embed.T, out=raw)
            logits.copy_(raw)
        else:
            torch.mm(x, embed.T, out=logits)
        logits.sigmoid_()
        top, argmax[s:e] = row_max(logits)
        if lp is not None:
            self._logprobs(logits, top, lp, s, e)
        logits.sub_(top[:, None]).mul_(scale[:, None])  # two in-place passes: faster here than one addcmul
        entropy[s:e], norm[s:e], sums = entropy_and_weights(logits, probs)  # probs holds the unnormalised weights
        sample[s:e] = draw(probs, uniform, block_sums=sums)
        return probs

    def _tile_fused(self, x, span: tuple[int, int], scale, uniform, outs: tuple, lp) -> torch.Tensor:
        """The same tile through model/kernels/vocab.py: the LM head's rows and the weights in the GEMM dtype,
        each in one buffer's bytes; returns the weights."""
        (s, e), vocab, dtype = span, self.config.vocab_size, self.net.dtype
        entropy, norm, sample, argmax = outs
        n = e - s
        raw, weights = (buf.view(-1).view(dtype)[: n * vocab].view(n, vocab) for buf in self._buffers)
        torch.mm(x, self.net.w.embed.T, out=raw)
        top, argmax[s:e], entropy[s:e], norm[s:e], sample[s:e] = vocab_kernel.fused(raw, scale, uniform, weights)
        if lp is not None:  # rare: the rows that asked, from the softcap's sigmoid of the raw rows
            self._logprobs(raw.float().sigmoid_(), top, lp, s, e)
        return weights

    def _tile_soft(self, weights: torch.Tensor, rows: torch.Tensor | None, soft: torch.Tensor, span) -> None:
        """The tile's soft embeddings, unnormalised: weights @ E for the `rows` that need them (None: all)."""
        (s, e), embed, dtype = span, self.net.w.embed, self.net.dtype
        n = e - s
        if rows is not None and len(rows) < n:
            soft[s:e] = 0.0
            if len(rows):
                soft[s + rows] = (weights[rows].to(dtype) @ embed).float()
        elif weights.dtype == dtype:
            soft[s:e] = (weights @ embed).float()
        else:  # fp32 weights of a low-precision network: cast into the (now free) logits buffer's bytes
            low = self._buffers[0].view(-1).view(dtype)[: weights.numel()].view_as(weights)
            low.copy_(weights)
            soft[s:e] = (low @ embed).float()

    def _logprob_outputs(self, top_k: torch.Tensor, C: int, device: torch.device) -> tuple:
        """(the token rows that want log-probabilities, chosen [n], top ids [n, K], top [n, K]) for one pass."""
        n_tok, k = len(top_k) * C, int(top_k.max())
        rows = (top_k >= 0).repeat_interleave(C)
        chosen = torch.full((n_tok,), math.nan, device=device)
        return (
            rows,
            chosen,
            torch.full((n_tok, k), -1, dtype=torch.int64, device=device),
            torch.full((n_tok, k), math.nan, device=device),
        )

    def _logprobs(self, sig: torch.Tensor, top: torch.Tensor, lp: tuple, s: int, e: int) -> None:
        """Log-probabilities for the tile's tokens [s, e) that want them, from sig = sigmoid(2x / cap) (the
        softcapped logit is 2*cap*sig - cap, so log p_i = 2*cap*(sig_i - max sig) - log sum_j exp(the same))."""
        rows, chosen, top_ids, top_lp = lp
        sel = rows[s:e].nonzero().squeeze(1).to(sig.device)
        if not len(sel):
            return
        two_cap = 2 * self.config.final_logit_softcapping
        part = sig[sel]  # a copy: the tile is scaled in place next
        lse = torch.logsumexp((part - top[sel, None]) * two_cap, dim=-1)
        chosen[s + sel] = -lse  # the argmax token's own term is exp(0)
        k = top_ids.shape[-1]
        if k:
            values, ids = part.topk(k, dim=-1)
            top_ids[s + sel] = ids
            top_lp[s + sel] = (values - top[sel, None]) * two_cap - lse[:, None]

    def vocab_tile(self, tokens: int) -> int:
        """Tokens per tile of the vocabulary pass: at least two tiles (so the product of one overlaps nothing
        large), and never more than the workspace budget holds, so a full batch does not grow it."""
        budget = self.vocab_workspace_bytes // (2 * self.config.vocab_size * 4)
        return max(1, min(budget, math.ceil(tokens / 2)))

    def _scratch(self, tile: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._buffers is None or self._buffers[0].shape[0] < tile:
            self._buffers = None  # free the old pair before allocating the new one
            dev = self.net.device
            self._buffers = (torch.empty(tile, vocab, device=dev), torch.empty(tile, vocab, device=dev))
        return self._buffers

    def cut_at_eos(self, canvas: list[int]) -> tuple[list[int], bool]:
        """A finished canvas's tokens up to and including its first EOS, and whether it had one."""
        eos_at = next((i for i, t in enumerate(canvas) if t in self.eos_ids), None)
        return (canvas, False) if eos_at is None else (canvas[: eos_at + 1], True)

    def context_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return context_needed(prompt_tokens, max_new_tokens, self.canvas_length)

    # ---------------------------------------------------------------- the simple driver

    def generate(self, requests: list[Request]) -> list[Generation]:
        """Run requests to completion together; each leaves the batch when its own canvas is done."""
        if len(requests) > self.cache.slots:
            raise ValueError(f"{len(requests)} requests but only {self.cache.slots} slots")
        C = self.canvas_length
        for r in requests:
            if r.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
            need = self.context_needed(len(r.prompt), r.max_new_tokens)
            if need > self.cache.max_context:
                raise ValueError(
                    f"prompt plus output needs {need} cached tokens; the cache holds {self.cache.max_context}"
                )
        slots = list(range(len(requests)))
        for s, r in zip(slots, requests):
            room = canvas_count(r.max_new_tokens, C) * C
            self.admit(s, r.settings, r.seed, template=r.template, constraint=r.constraint, room=room)
        self.prefill(slots, [r.prompt for r in requests])
        self.start_canvas(slots)
        out = [Generation([], "length", []) for _ in requests]
        canvases_left = [canvas_count(r.max_new_tokens, C) for r in requests]
        active = list(slots)
        while active:
            result = self.step(active)
            to_commit, finished = [], []
            for row, (s, done) in enumerate(zip(active, result.done)):
                if not done:
                    continue
                g = out[s]
                g.steps.append(result.steps[row])
                tokens, eos = self.cut_at_eos(result.argmax[row].tolist())
                g.tokens += tokens
                canvases_left[s] -= 1
                if eos:
                    g.finish_reason = "eos"
                    finished.append(s)
                else:
                    (finished if canvases_left[s] == 0 else to_commit).append(s)
            if to_commit:
                self.commit(to_commit)
                self.start_canvas(to_commit)
            for s in finished:
                out[s].cache_length = int(self.cache.lengths[s])
            active = [s for s in active if s not in finished]
        self.release(slots)
        return out
