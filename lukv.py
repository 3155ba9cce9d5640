"""
LU-KV, read top to bottom: how many cached tokens each (layer, KV head) keeps.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic
KV Cache Eviction" (arXiv 2602.08585, ICML 2026). A scorer ranks the tokens inside a head;
LU-KV picks per-head budgets so that the long-horizon utility lost is smallest over the model:

  1. scorers            rank the tokens inside each head (SnapKV, KeyDiff,  -> SCORERS
                        K-norm, Expected Attention)
  2. oracle importance  I[l, h, j] = max over future steps k and the query  -> oracle_importance
                        heads q of KV head h of || A[k, j] * v_j @ W_O[q] ||
  3. loss curves,       evict in the scorer's order; the lower convex hull;  -> solver.py, head_curves
     hulls, greedy      one global greedy over hull slopes gives nested
                        budgets for every ratio 1..99%: a [99, L, H] table
  4. offline profiling  average the tables over calibration contexts        -> profile, load_profile
  5. online             look up the ratio's row, round to integers, keep    -> allocate, compress
                        each head's best tokens through the eviction kernel
  6. evaluation         one prefill, every method as a row of one batch     -> run_example, demo

    python lukv.py --demo              # budget heatmap + a small evaluation at 80%, about a minute on a CPU
    python lukv.py --profile           # the tiny model's profiles, into runs/profiles/

The solver is numpy only and lives in solver.py; the baselines (uniform, PyramidKV, AdaKV) in
baselines.py. Experiments and real models: experiments/ (README.md lists the commands).

Shapes: B rows of a batched cache, L layers, H KV heads, G query heads per KV head, T context
tokens, D head dim, C model width.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

import baselines
import solver
import tasks
from model import DEFAULT_CHECKPOINT, Probe, apply_rope, load_checkpoint, rope_frequencies

# -----------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class LUKVConfig:
    sink: int = 4  # first tokens every head always keeps (attention sinks)
    window: int = 16  # most recent tokens every head always keeps
    min_share: float = 0.01  # every head also keeps at least this fraction of the context
    snap_window: int = 16  # SnapKV: how many last positions observe the context
    snap_kernel: int = 5  # SnapKV: pooling width over tokens (odd)
    snap_pool: str = "avg"  # SnapKV: "avg" (SnapKV's and kvpress's default) or "max" (AdaKV's code)
    ea_epsilon: float = 0.02  # Expected Attention: (score + epsilon) * ||v|| (the paper's and kvpress's table)
    ea_future: int = 512  # Expected Attention: the future positions whose RoPE rotations are averaged
    adakv_alpha: float = 0.2  # AdaKV: the share of a head's uniform budget it always keeps
    adakv_blend: str = "original"  # AdaKV: "original" (FFY0/AdaKV) or "kvpress" (floor, then pooled top-k)
    pyramid_beta: int = 20  # PyramidKV: the last layer keeps 1 / beta of the average budget
    horizon: int = 16  # oracle: answer tokens the model generates after a calibration question

    def __post_init__(self):
        ints = {"sink": 0, "window": 0, "snap_window": 1, "snap_kernel": 1, "ea_future": 1, "pyramid_beta": 1,
                "horizon": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.snap_kernel % 2 == 0:
            raise ValueError(f"snap_kernel must be odd (a centred pooling window), got {self.snap_kernel}")
        if self.snap_pool not in ("avg", "max") or self.adakv_blend not in ("original", "kvpress"):
            raise ValueError(f"snap_pool must be 'avg' or 'max' and adakv_blend 'original' or 'kvpress', "
                             f"got {self.snap_pool!r} and {self.adakv_blend!r}")
        if not (0 <= self.min_share < 1 and 0 <= self.adakv_alpha <= 1 and self.ea_epsilon >= 0):
            raise ValueError(f"expected 0 <= min_share < 1, 0 <= adakv_alpha <= 1 and ea_epsilon >= 0, got "
                             f"{self.min_share}, {self.adakv_alpha}, {self.ea_epsilon}")

    def floor(self, T):
        """Tokens every head keeps at least: sink + window + the minimum share."""
        return min(T, self.sink + self.window + math.ceil(self.min_share * T))


# -----------------------------------------------------------------------------
# 1. intra-head scorers: (L, H, T), higher = more worth keeping. LU-KV does not change these.


def snapkv_scores(probe, cfg):
    """SnapKV: the attention the observation window (the last w positions) pays to each token, summed over
    the window, pooled over cfg.snap_kernel neighbours (cfg.snap_pool: avg or max), GQA-group mean.

    As in SnapKV's code, the context before the window is pooled on its own, zero-padded at its ends, so
    the window's attention to itself never leaks into its neighbours' scores. The window's own tokens
    (pooled apart the same way) only count when cfg.window < w: SnapKV always keeps them."""
    pool = {"avg": torch.nn.functional.avg_pool1d, "max": torch.nn.functional.max_pool1d}[cfg.snap_pool]
    layers = []
    for l in sorted(probe.prefill_attn):
        a = probe.prefill_attn[l][0]  # (H, G, w, T)
        H, G, w, T = a.shape
        s = a.sum(dim=2)  # (H, G, T)
        parts = [part for part in (s[..., :T - w], s[..., T - w:]) if part.shape[-1] > 0]
        pooled = [pool(part.reshape(H * G, 1, -1), cfg.snap_kernel, stride=1, padding=cfg.snap_kernel // 2)
                  for part in parts]  # each (H*G, 1, T_part)
        layers.append(torch.cat(pooled, dim=-1).view(H, G, T).mean(dim=1))  # (H, T)
    return torch.stack(layers)  # (L, H, T)


def keydiff_scores(cache):
    """KeyDiff: keys that differ most from the head's mean direction are kept (negative cosine)."""
    layers = []
    for l in range(len(cache.k)):
        k = torch.nn.functional.normalize(cache.keys(l).float(), dim=-1)  # (H, T, D)
        anchor = torch.nn.functional.normalize(k.mean(dim=1, keepdim=True), dim=-1)  # (H, 1, D)
        layers.append(-(k * anchor).sum(-1))  # (H, T)
    return torch.stack(layers)


def knorm_scores(cache):
    """K-norm (Devoto et al. 2024): keys with a small norm draw attention, so keep them."""
    return torch.stack([-cache.keys(l).float().norm(dim=-1) for l in range(len(cache.k))])  # (L, H, T)


def streaming_scores(L, H, T):
    """StreamingLLM's positional rule: the newest tokens first (sinks are protected anyway)."""
    return torch.arange(T, dtype=torch.float32).expand(L, H, T).clone()


def average_rope(cfg, T, n_future):
    """cos and sin (D,) of the RoPE rotation averaged over positions T .. T + n_future - 1 of a model config.

    R_t x = cos_t * x + sin_t * rotate_half(x) is linear in (cos_t, sin_t), so the mean rotation is
    the same formula with the mean cos and sin (model.py's tables, including their scaling)."""
    inv_freq, scale = rope_frequencies(cfg)  # (D/2,)
    angles = torch.outer(torch.arange(T, T + n_future, dtype=torch.float32), inv_freq)  # (F, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (F, D) Hugging Face's two-halves layout
    return (angles.cos() * scale).mean(dim=0), (angles.sin() * scale).mean(dim=0)


def expected_attention_scores(model_cfg, cache, probe, cfg):
    """Expected Attention (Devoto et al.; kvpress ExpectedAttentionPress): the attention that future
    queries are expected to pay each token, times its value norm. Query-free.

    Per layer the prefill recorded the mean mu and covariance Sigma of each query head's pre-RoPE
    queries past the sinks (Probe(query_stats=sink)). Both are rotated by the average RoPE rotation R
    of the next cfg.ea_future positions: mu -> R mu, Sigma -> R Sigma R^T. A query q ~ N(mu, Sigma)
    has E[exp(q.k / sqrt(D))] = exp(mu.k / sqrt(D) + k^T Sigma k / (2 D)), so token j of query head q
    scores softmax_j(mu.k_j / sqrt(D) + k_j^T Sigma k_j / (2 D)) over the tokens past the sinks; the
    GQA group's mean, then (score + cfg.ea_epsilon) * ||v_j||. Sinks get 0 here (protect keeps them)."""
    if probe.query_stats != cfg.sink or not probe.values:
        raise ValueError(f"expected attention needs the values and the query statistics past the {cfg.sink} "
                         f"sinks, recorded at prefill (lukv.prefill turns both on); the probe has query_stats="
                         f"{probe.query_stats!r}")
    H, G, D = model_cfg.n_kv_head, model_cfg.group, model_cfg.head_dim
    T = cache.keys(0).shape[1]
    cos, sin = (x.to(cache.device) for x in average_rope(model_cfg, T, cfg.ea_future))  # (D,) each
    layers = []
    for l in range(len(cache.k)):
        scores = torch.zeros(H, T, device=cache.device)
        if T > max(cfg.sink, 1):
            keys = cache.keys(l).float()[:, cfg.sink:]  # (H, T', D), T' = T - sink
            values = probe.values[l][0].float()[:, cfg.sink:]  # (H, T', D)
            mu = apply_rope(probe.query_mean[l][0].float(), cos, sin).view(H, G, D)  # (H, G, D) = R mu
            sigma = probe.query_cov[l][0].float()  # (H*G, D, D)
            sigma = apply_rope(apply_rope(sigma, cos, sin).transpose(-1, -2), cos, sin).view(H, G, D, D)  # R Sigma R^T
            logits = torch.einsum("hgd,htd->hgt", mu, keys) / math.sqrt(D)  # (H, G, T')
            logits += torch.einsum("htd,hgde,hte->hgt", keys, sigma, keys) / (2 * D)
            expected = torch.softmax(logits, dim=-1).mean(dim=1)  # (H, T')
            scores[:, cfg.sink:] = (expected + cfg.ea_epsilon) * values.norm(dim=-1)
        layers.append(scores)
    return torch.stack(layers)  # (L, H, T)


def protect(scores, cfg):
    """Sink and recent-window tokens get +inf so every scorer keeps them."""
    scores = scores.clone()
    scores[..., :cfg.sink] = float("inf")
    scores[..., max(cfg.sink, scores.shape[-1] - cfg.window):] = float("inf")
    return scores


# name -> scores (L, H, T) from (model, prefilled cache, prefill probe, oracle importance, cfg); 'oracle'
# ranks by the oracle importance itself (an upper bound no online method has)
SCORERS = {
    "snapkv": lambda model, cache, probe, imp, cfg: snapkv_scores(probe, cfg),
    "keydiff": lambda model, cache, probe, imp, cfg: keydiff_scores(cache),
    "knorm": lambda model, cache, probe, imp, cfg: knorm_scores(cache),
    "streaming": lambda model, cache, probe, imp, cfg: streaming_scores(*imp.shape),
    "expected_attention": lambda model, cache, probe, imp, cfg: expected_attention_scores(model.cfg, cache, probe,
                                                                                          cfg),
    "oracle": lambda model, cache, probe, imp, cfg: imp.clone(),
}


def scores_for(name, model, cache, probe, imp, cfg):
    """Protected scores (L, H, T) of one scorer on a prefilled context."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(SCORERS)}")
    s = SCORERS[name](model, cache, probe, imp, cfg)
    if not torch.isfinite(s).all():
        raise ValueError(f"scorer {name} produced NaN or infinite scores")
    return protect(s, cfg)


# -----------------------------------------------------------------------------
# 2. oracle importance (offline): what each cached token contributes to the next steps' outputs


@torch.no_grad()
def value_out_norms(model, values):
    """||v_j @ W_O[q]|| for every layer, KV head h, query head q of its group and token j, divided by its
    sum over the layer (the official code's normalisation: layers weigh the same): (L, H, G, T)."""
    norms = []
    for l, v in sorted(values.items()):
        w = model.o_proj_heads(l).float()  # (H, G, C, D)
        n = torch.einsum("hgcd,htd->hgtc", w, v[0].float()).norm(dim=-1)  # (H, G, T)
        norms.append(n / n.sum())
    return torch.stack(norms)


def oracle_from_steps(decode_attn, vnorm, T):
    """I[l, h, j] = max over steps k and group heads q of A[l, h, q, k, j] * vnorm[l, h, q, j]: (L, H, T).

    Computed where the attention lives, in float32, and returned on the CPU, where the solver reads it."""
    L = vnorm.shape[0]
    imp = torch.zeros(L, vnorm.shape[1], T, device=vnorm.device)
    for step in decode_attn:
        a = torch.stack([step[l][0, :, :, :T].float() for l in range(L)])  # (L, H, G, T)
        imp = torch.maximum(imp, (a * vnorm[..., :T].float()).amax(dim=2))
    return imp.cpu()


@torch.no_grad()
def prefill(model, ctx_ids, cfg):
    """Prefill the context once, recording what the scorers and the oracle read: (cache, probe)."""
    T = len(ctx_ids)
    if T == 0:
        raise ValueError("empty context: there is nothing to compress")
    device = model.embed_tokens.weight.device  # the cache, the probe and the prompt live with the model
    w = min(cfg.snap_window, T)
    probe = Probe(query_pos=torch.arange(T - w, T, device=device), keep_values=True, query_stats=cfg.sink)
    cache = model.new_cache(1)
    model(torch.tensor([ctx_ids], device=device), cache=cache, probe=probe, last_only=True)
    return cache, probe


@torch.no_grad()
def oracle_importance(model, cache, probe, q_ids, max_new, stop_ids=(), done=None, temperature=0.0, generator=None,
                      answer_only=False):
    """The model's own answer to q_ids with the full cache (greedy, or sampled at a temperature), and
    the oracle importance (L, H, T) of every context token over the question plus that answer (the
    future of the query-agnostic setting), or over the answer alone (answer_only: the official code's,
    whose question enters with the prompt and is not recorded)."""
    future = Probe(decode=True)
    answer = model.generate(torch.tensor([q_ids], device=cache.device), max_new, cache=cache.clone(),
                            temperature=temperature, stop_ids=stop_ids, done=done, generator=generator,
                            probe=future)[0]
    steps = future.decode_attn[len(q_ids):] if answer_only else future.decode_attn
    return answer, oracle_from_steps(steps, value_out_norms(model, probe.values), cache.seen)


# -----------------------------------------------------------------------------
# 3. the bridge to the numpy solver: one context's loss curves and its [99, L, H] table


def head_curves(imp, scores, cfg):
    """Loss curves (N, n+1) over the evictable tokens, greedy floors (N,) and protected tokens per head, N = L * H.

    Row l * H + h is solver.loss_curve(scores[l, h, sink:T-window], imp[l, h, sink:T-window]): the
    protected tokens are sliced out, and each head keeps at least cfg.floor(T) in all."""
    L, H, T = imp.shape
    if T < 1 or scores.shape != imp.shape:
        raise ValueError(f"expected T >= 1 tokens and scores of the oracle's shape {tuple(imp.shape)}, got "
                         f"{tuple(scores.shape)}")
    lo, hi = cfg.sink, max(cfg.sink, T - cfg.window)  # tokens [lo, hi) may be evicted
    rows = [np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x).reshape(L * H, T)[:, lo:hi]
            for x in (scores, imp)]  # (N, n) each, numpy; tensors become float32 (bf16 / fp16 exactly)
    curves = solver.loss_curves(*rows)  # (N, n+1)
    floor = min(max(0, cfg.floor(T) - (T - (hi - lo))), hi - lo)  # evictable tokens each head keeps
    return curves, np.full(L * H, floor, dtype=np.int64), T - (hi - lo)


def context_table(imp, scores, cfg, method="fast"):
    """The paper's sweep on one context: prune ratios (99, L, H) of every head at ratios 1..99%.

    method "fast" (the solver's twin, the default) or "heap" (the readable min-heap)."""
    L, H, T = imp.shape
    curves, floors, n_protected = head_curves(imp, scores, cfg)
    n_evict = solver.greedy_budget_table(curves, floors, len(solver.RATIOS), n_protected_total=L * H * n_protected,
                                         method=method)  # (99, L*H)
    return n_evict.reshape(len(solver.RATIOS), L, H) / T


# -----------------------------------------------------------------------------
# 4. offline profiling: average the tables over calibration (context, question) pairs, resumably


@torch.no_grad()
def calibration_tables(model, ctx_ids, questions, scorers, cfg, stop_ids=(), temperature=0.0, generator=None,
                       answer_only=False):
    """{scorer: [(99, L, H) per question]} of one calibration context and its questions (token ids).

    As in the paper: the scorer sees the context without the question; the oracle's future is the
    question plus the model's own answer. One prefill serves every question."""
    cache, probe = prefill(model, ctx_ids, cfg)
    tables = {s: [] for s in scorers}
    for q_ids in questions:
        _, imp = oracle_importance(model, cache, probe, q_ids, cfg.horizon, stop_ids, None, temperature, generator,
                                   answer_only)
        for s in scorers:
            tables[s].append(context_table(imp, scores_for(s, model, cache, probe, imp, cfg), cfg))
    return tables


@torch.no_grad()
def profile(model, model_id, contexts, scorers, cfg, cache_dir, stop_ids=(), temperature=0.0, answer_only=False,
            log=tasks.progress):
    """Average the per-(context, question) tables of every scorer: ({scorer: (99, L, H)}, counts).

    contexts: [(context ids, [question ids, ...])]. Each context's tables go to cache_dir under a key
    of everything that made them (model, weights' dtype and device, tokens, settings, stop ids, sampling),
    so an interrupted run resumes and a changed one recomputes. Sampled answers (temperature > 0, the
    paper's 0.7) draw from a generator seeded by that key; answer_only as in oracle_importance."""
    os.makedirs(cache_dir, exist_ok=True)
    tables, computed, reused, t0 = {s: [] for s in scorers}, 0, 0, time.time()
    for i, (ctx_ids, questions) in enumerate(contexts):
        blob = json.dumps([model_id, model.weights_key(), ctx_ids, questions, asdict(cfg), sorted(stop_ids), temperature,
                           answer_only])
        key = hashlib.sha256(blob.encode()).hexdigest()[:24]
        paths = {s: os.path.join(cache_dir, f"{key}_{s}.npy") for s in scorers}
        todo = [s for s in scorers if not os.path.exists(paths[s])]
        if todo:
            generator = torch.Generator(model.embed_tokens.weight.device).manual_seed(int(key[:15], 16))
            got = calibration_tables(model, ctx_ids, questions, todo, cfg, stop_ids, temperature, generator, answer_only)
            for s in todo:
                solver.write_atomic(paths[s], lambda f: np.save(f, np.stack(got[s])))  # (questions, 99, L, H)
            computed += 1
        else:
            reused += 1
        for s in scorers:
            tables[s] += list(solver.read_npy(paths[s], "per-context table", "delete it to recompute that context"))
        eta = (time.time() - t0) / max(computed, 1) * (len(contexts) - i - 1)
        log(i + 1, len(contexts), f"profile {','.join(scorers)}: context {i + 1}/{len(contexts)} ({computed} "
            f"computed, {reused} read from {cache_dir}, {time.time() - t0:.0f} s, ETA {eta:.0f} s)")
    return {s: np.mean(t, axis=0) for s, t in tables.items()}, {"computed": computed, "reused": reused}


# a profile is solver.py's table on disk: [99, L, H] prune ratios (.npy, what kvpress's LUKVPress loads)
# and a .json sidecar saying who it belongs to and how it was made; the same for every model

def profile_meta(scorer, model_id, cfg, **extra):
    """What a profile's sidecar records: who it belongs to and how it was made (refused if they differ)."""
    return {"scorer": scorer, "model": model_id, **asdict(cfg),
            "layout": "[99, n_layer, n_kv_head] prune ratios; row solver.row_of(ratio) (kvpress LUKVPress)", **extra}


# what load_profile compares beside the model, the scorer and its protected tokens: each scorer's own settings
SCORER_CHECKS = {"snapkv": ["snap_window", "snap_kernel", "snap_pool"], "expected_attention": ["ea_epsilon", "ea_future"]}


def load_profile(path, scorer, model_id, shape, cfg):
    """(table, meta) of a profile through solver.load_table: a damaged file, or one made for another model,
    scorer, shape or settings, is refused by name, saying what to do. shape is (n_layer, n_kv_head)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"expected the profile {path} and its sidecar; make them with --profile "
                                f"--scorer {scorer}")
    meta = solver.read_sidecar(path)
    if meta.get("model") != model_id:
        raise ValueError(f"profile {path} was made for another model (id {meta.get('model')!r}; this one is "
                         f"{model_id!r}); profile this model with --profile --scorer {scorer}")
    settings = ["sink", "window", "min_share"] + SCORER_CHECKS.get(scorer, [])
    want = {"scorer": scorer, **{k: getattr(cfg, k) for k in settings}}
    try:
        return solver.load_table(path, want, shape)
    except ValueError as e:
        raise ValueError(f"{e}; pass the matching option or profile again with --scorer {scorer}") from None


# -----------------------------------------------------------------------------
# 5. online: ratio -> per-head keep counts (LU-KV's table, then the baselines), then compress


def lukv_counts(ratio, T, cfg, profile):
    """LU-KV online: the profile's row for this ratio (solver.row_of, kvpress's convention), rescaled to
    this context's T tokens and rounded to integers that keep exactly keep_count(L * H * T, ratio)."""
    if profile is None:
        raise ValueError("the lukv allocator needs a profile (python lukv.py --profile)")
    return baselines.counts_from_shares((1 - profile[solver.row_of(ratio)]) * T, ratio, T, cfg)


def oracle_counts(ratio, scores, cfg, imp):
    """Per input, solved on this input's own oracle curves: the ceiling of any profile."""
    L, H, T = scores.shape
    curves, floors, _ = head_curves(imp, scores, cfg)
    kept = baselines.kept_total(L * H, ratio, T, cfg)  # the same total as every allocator
    return T - solver.greedy_evictions(curves, floors, L * H * T - kept).reshape(L, H)


# name -> counts (L, H) from (ratio, scores (L, H, T), cfg, profile, oracle importance, seed)
ALLOCATORS = {
    "lukv": lambda r, s, cfg, profile, imp, seed: lukv_counts(r, s.shape[2], cfg, profile),
    "uniform": lambda r, s, cfg, profile, imp, seed: baselines.uniform_counts(s.shape, r, cfg),
    "pyramid": lambda r, s, cfg, profile, imp, seed: baselines.pyramid_counts(s.shape, r, cfg),
    "adakv": lambda r, s, cfg, profile, imp, seed: baselines.adakv_counts(s, r, cfg),
    # control: LU-KV's budgets given to random heads (does the profile know *which* heads?)
    "shuffled": lambda r, s, cfg, profile, imp, seed: np.random.default_rng(seed).permutation(
        lukv_counts(r, s.shape[2], cfg, profile).ravel()).reshape(s.shape[:2]),
    "oracle": lambda r, s, cfg, profile, imp, seed: oracle_counts(r, s, cfg, imp),
}


def allocate(name, ratio, scores, cfg, profile=None, imp=None, seed=0):
    """Per-head keep counts (L, H) for one context; every allocator keeps the same total."""
    ratio = baselines.check_ratio(ratio)
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; expected one of {list(ALLOCATORS)}")
    L, H, T = scores.shape
    if profile is not None and profile.shape[1:] != (L, H):
        raise ValueError(f"the profile has shape {profile.shape}, this model needs (99, {L}, {H}): it belongs to "
                         f"another model")
    if ratio == 0:
        return np.full((L, H), T)
    return ALLOCATORS[name](ratio, scores, cfg, profile, imp, seed)


def compress(cache, scores, counts):
    """Keep each head's counts[l, h] best tokens by score, through the eviction kernel (KVCache.evict).

    counts (L, H), or (B, L, H) for a cache of B rows (one allocator per row: the rows share a
    prefill and are decoded as one batch). scores (L, H, T), or (B, L, H, T) one per row, are
    protect()ed, so sink and window rank above every other token; among equal scores the later token
    is kept, as in the loss curves. Returns the keep mask, (L, H, T) or (B, L, H, T) on the CPU."""
    L, H, T = scores.shape[-3:]
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.long)
    batched = counts.dim() == 3
    counts = counts if batched else counts[None]  # (B, L, H)
    if counts.shape != (cache.B, L, H):
        raise ValueError(f"counts must have shape (L={L}, H={H}) or (B={cache.B}, L, H), got {tuple(counts.shape)}")
    if bool((counts > T).any()) or bool((counts < 0).any()):
        raise ValueError(f"keep counts must lie in [0, T={T}], got min {int(counts.min())}, max {int(counts.max())}")
    scores = scores.float()  # a bf16 scorer ranks as it would in float32
    keep = torch.zeros(cache.B, L, H, T, dtype=torch.bool)
    for l in range(L):
        cache.evict(l, scores[..., l, :, :].expand(cache.B, H, T), counts[:, l])  # (B, H, T) each row's scores
        keep[:, l] = cache.kept_mask(l, T).cpu()
    return keep if batched else keep[0]


# -----------------------------------------------------------------------------
# 6. evaluation: one example, one prefill, every method as a row of one batched cache


class Method(NamedTuple):
    """One row of an evaluation: a scorer, an allocator, a ratio, the table the allocator reads (LU-KV's,
    the shuffled control's; experiments feed LU-KV other tables), the name its score is saved under, and
    its own protected tokens when its table was profiled with another window (cfg; None: the run's)."""
    scorer: str
    allocator: str
    ratio: float
    table: np.ndarray = None
    label: str = None
    cfg: LUKVConfig = None

    @property
    def key(self):
        return f"{self.scorer}|{self.label or self.allocator}|{self.ratio}"


def clock(model):
    """Seconds for timing a phase; on a GPU after its queued work is done, so a phase gets its own time."""
    if model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def run_example(model, suite, item, methods, cfg, setting="agnostic"):
    """Score of the full cache and of every Method on one tasks.Item, with the bytes each keeps and the
    share of oracle importance it drops. Query-agnostic: the context is compressed before the question
    is seen; query-aware: all of the question but its last token is prefilled too."""
    prefix, follow = (item.context, item.question) if setting == "agnostic" else \
        (item.context + item.question[:-1], item.question[-1:])
    done = suite.done(item)
    t0 = clock(model)
    cache, probe = prefill(model, prefix, cfg)
    t1 = clock(model)
    if methods:  # the oracle is read by the oracle allocator and the oracle-loss column
        full_ids, imp = oracle_importance(model, cache, probe, follow, item.max_new, suite.stop_ids, done)
    else:  # the full cache alone: its answer, no probe
        full_ids = model.generate(torch.tensor([follow], device=cache.device), item.max_new, cache=cache.clone(),
                                  stop_ids=suite.stop_ids, done=done)[0]
    timing = {"prefill": t1 - t0, "full_decode": clock(model) - t1, "full_tokens": len(full_ids),
              "compressed_decode": 0.0, "compressed_tokens": 0, "compressed_rows": 0}  # where the time went
    record = {"setting": setting, "family": item.family, "index": item.index, "kind": item.kind,
              "full": suite.score(item, suite.answer(full_ids)), "full_bytes": cache.nbytes(), "methods": {},
              "timing": timing}
    for scorer in dict.fromkeys(m.scorer for m in methods):
        rows = [m for m in methods if m.scorer == scorer]
        cfgs = [m.cfg or cfg for m in rows]
        by_cfg = {c: scores_for(scorer, model, cache, probe, imp, c) for c in dict.fromkeys(cfgs)}  # protected
        scores = torch.stack([by_cfg[c] for c in cfgs])  # (B, L, H, T), each row protected as its table was
        counts = np.stack([allocate(m.allocator, m.ratio, s, c, m.table, imp) for m, s, c in zip(rows, scores, cfgs)])
        batch = cache.repeat(len(rows))  # B copies of the prefilled cache
        keep = compress(batch, scores, counts)  # (B, L, H, T)
        kv_bytes = (batch.length.sum(dim=(0, 2)) * batch.nbytes() / batch.length.sum()).tolist()  # (B,) per row
        lost = ((imp * ~keep).flatten(1).sum(1) / imp.sum().clamp(min=1e-30)).tolist()  # (B,)
        t0 = clock(model)
        answers = model.generate(torch.tensor([follow] * len(rows), device=cache.device), item.max_new, cache=batch,
                                 stop_ids=suite.stop_ids, done=done)
        timing["compressed_decode"] += clock(model) - t0
        timing["compressed_tokens"] += max(len(a) for a in answers)  # the batch ran at least this many steps
        timing["compressed_rows"] += len(rows)
        for m, answer, b, o in zip(rows, answers, kv_bytes, lost):
            record["methods"][m.key] = {"score": suite.score(item, suite.answer(answer)), "kv_bytes": b,
                                        "oracle_loss": o}
    return record


# -----------------------------------------------------------------------------
# the shipped tiny model, the demo and the command line


def load_tiny(path=DEFAULT_CHECKPOINT):
    """(model, tokenizer, meta) of a checkpoint of this project (model.py's file + tasks.py's tokenizer)."""
    model, header = load_checkpoint(path)
    enc = tasks.load_tokenizer(header["tokenizer_path"], expected_sha256=header["tokenizer_sha256"])
    if enc.n_vocab != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {header['tokenizer_path']} has {enc.n_vocab} tokens, the checkpoint "
                         f"expects {model.cfg.vocab_size}")
    return model, enc, header["meta"]


@torch.no_grad()
def demo(model, suite, profile, cfg, ratio=0.8, n=8, length=1024, seed=2, log=tasks.progress):
    """Exact match per family with the full cache and with each allocator at one ratio (SnapKV scores,
    query-agnostic), through run_example; the average over the families the full cache gets >= 50% right."""
    allocators = ["uniform", "pyramid", "adakv", "lukv"]
    methods = [Method("snapkv", a, ratio, profile) for a in allocators]
    families = tasks.EVAL_FAMILIES
    records = []
    for i, family in enumerate(families):
        records += [run_example(model, suite, item, methods, cfg) for item in suite.items(family, n, length, seed)]
        log(i + 1, len(families), f"demo: {i + 1}/{len(families)} families")
    score = {"full": lambda r: r["full"], **{m.allocator: lambda r, m=m: r["methods"][m.key]["score"] for m in methods}}
    kept = [f for f in families if np.mean([r["full"] for r in records if r["family"] == f]) >= 0.5]
    lines = [f"exact match, {n} examples per family, {length} tokens, {ratio:.0%} compression, SnapKV scores, "
             f"query-agnostic; avg over the {len(kept)} families the full cache gets >= 50% right "
             f"({n * len(kept)} examples, [95% interval])",
             f"{'':9s}" + "".join(f"{f.removeprefix('niah_'):>11s}" for f in families) + f"{'avg [95%]':>20s}"]
    for name, get in score.items():
        means = [np.mean([get(r) for r in records if r["family"] == f]) for f in families]
        avg, lo, hi = tasks.interval([get(r) for r in records if r["family"] in kept])
        lines.append(f"{name:9s}" + "".join(f"{m:11.2f}" for m in means) + f"  {avg:5.2f} [{lo:.2f}, {hi:.2f}]")
    return "\n".join(lines)


def parse(argv=None):
    """(parser, args) of the command line, every argument checked before any work: a bad one exits with code 2
    and one line saying what was expected."""
    parser = tasks.ArgumentParser(description=__doc__)
    # ---- what to do
    parser.add_argument("--demo", action="store_true", help="heatmap + small evaluation at 80%% (about a minute on a CPU)")
    parser.add_argument("--profile", action="store_true", help="profile the tiny model: one table per scorer")
    # ---- model and method
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--scorers", default="snapkv,keydiff,knorm,expected_attention,oracle", help="--profile: comma list")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: answer tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="context tokens (64 to 3840)")
    parser.add_argument("--n", type=int, default=8, help="--demo: examples per family")
    parser.add_argument("--seed", type=int, default=2, help="--demo: evaluation seed (calibration uses others)")
    parser.add_argument("--calib-contexts", type=int, default=16)
    parser.add_argument("--calib-questions", type=int, default=8)
    parser.add_argument("--calib-seed", type=int, default=0, help="--profile: calibration seed (calibration-N)")
    # ---- output
    parser.add_argument("--out-dir", default="runs/profiles", help="--profile: where <model>_<scorer>.npy go")
    parser.add_argument("--overwrite", action="store_true", help="--profile: replace shipped profiles (checkpoints/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not (args.demo or args.profile):
        parser.error("say what to do: --demo or --profile")
    lows = dict(n=1, calib_contexts=1, calib_questions=1, horizon=1, snap_window=1, threads=1, sink=0, window=0)
    for name, low in lows.items():
        if getattr(args, name) is not None:
            tasks.check_range(parser, "--" + name.replace("_", "-"), getattr(args, name), low)
    tasks.check_range(parser, "--length", args.length, 64, 4096 - 256)  # the tiny model's context less question + answer
    args.scorers = tasks.check_names(parser, "--scorers", args.scorers.split(","), [s for s in SCORERS if s != "streaming"])
    if not args.checkpoint.endswith(".pt") or not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such .pt file; the tiny model ships as checkpoints/tiny.pt")
    stem = os.path.join(args.out_dir, os.path.basename(args.checkpoint))  # runs/profiles/tiny.pt -> tiny_<scorer>.npy
    args.out = {s: tasks.profile_path(stem, s) for s in args.scorers}
    for path in args.out.values() if args.profile else []:
        tasks.check_output(parser, path, ".npy", args.overwrite)
    return parser, args


def main(argv=None):
    parser, args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, snap_window=args.snap_window)
    try:
        model, enc, _ = load_tiny(args.checkpoint)
    except (RuntimeError, ValueError) as e:  # a damaged checkpoint or tokenizer, named
        parser.error(str(e))
    model_id, suite, shape = tasks.file_id(args.checkpoint), tasks.TinySuite(enc), (model.cfg.n_layer, model.cfg.n_kv_head)
    print(f"model: {os.path.basename(args.checkpoint)} ({model.num_params() / 1e6:.2f}M parameters, "
          f"{model.cfg.n_layer} layers x {model.cfg.n_kv_head} KV heads, id {model_id})")
    if args.demo:  # the table is checked before the profile's work, not after it
        try:
            table, _ = load_profile(tasks.profile_path(args.checkpoint, "snapkv"), "snapkv", model_id, shape, cfg)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    if args.profile:
        contexts = suite.calibration(args.calib_contexts, args.calib_questions, args.length, args.calib_seed)
        tables, counts = profile(model, model_id, contexts, args.scorers, cfg,
                                 os.path.join(args.out_dir, "contexts.cache"), suite.stop_ids)
        for s, table in tables.items():
            solver.save_table(args.out[s], table, profile_meta(s, model_id, cfg, kind="", weights=model.weights_key(),
                                                          calibration=f"tasks qa, {args.calib_contexts} contexts x "
                                                          f"{args.calib_questions} questions, {args.length} tokens, "
                                                          f"seed calibration-{args.calib_seed}", **counts))
            print(f"wrote {args.out[s]} and its .json sidecar")
    if args.demo:
        t0 = time.time()
        print(tasks.heatmap(1 - table[solver.row_of(0.8)], "LU-KV budgets at 80% compression (SnapKV scorer): share of "
                                                     "the context each head keeps"))
        print(demo(model, suite, table, cfg, 0.8, args.n, args.length, args.seed))
        print(f"demo took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
