"""
LU-KV, read top to bottom: how many cached tokens each (layer, KV head) keeps.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic
KV Cache Eviction" (arXiv 2602.08585, ICML 2026). A heuristic scorer ranks tokens inside a head;
LU-KV picks per-head budgets so that the long-horizon utility lost is smallest over the model:

  1. oracle importance  I[l, h, j] = max over future steps k, query heads q of KV head h of
                        || A[k, j] * v_j @ W_O[q] ||                       -> oracle_importance
  2. loss curves        evict in the scorer's order, cumulative I lost     -> loss_curve
  3. convex hull        the lower convex hull (= PAVA on the increments)   -> lower_convex_hull
  4. greedy solver      one global min-heap over hull slopes, one sweep    -> greedy_budget_table
                        gives nested budgets for every ratio 1..99%:
                        a table [99, n_layer, n_kv_head] (kvpress LUKVPress layout)
  5. offline profiling  average the table over calibration contexts        -> build_profile
     online             look up the ratio, largest-remainder rounding,    -> allocate, compress
                        keep each head's top tokens by the scorer

    python lukv.py --demo              # heatmap + a small evaluation, under 3 minutes on a CPU
    python lukv.py --profile           # rebuild the shipped profiles (checkpoints/profile_*.npz)
    python lukv.py --eval              # the full table (every family x ratio x allocator x scorer)

Shapes: L layers, H KV heads, G query heads per KV head, T context tokens, D head dim, C width.
"""

import argparse
import heapq
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import tasks
from model import DEFAULT_CHECKPOINT, Probe, load_checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class LUKVConfig:
    sink: int = 4  # first tokens every head always keeps (attention sinks)
    window: int = 16  # most recent tokens every head always keeps
    min_share: float = 0.01  # every head also keeps at least this fraction of the context
    snap_window: int = 16  # SnapKV: how many last positions observe the context
    snap_kernel: int = 5  # SnapKV: max-pool width over tokens
    horizon: int = 16  # oracle: answer tokens the model generates after the question
    stop_at_answer: bool = True  # oracle: the future ends at the answer's newline (False: always horizon steps)
    correct_only: bool = False  # profiling: keep only the calibration questions the model answers right
    normalise_values: bool = True  # oracle: divide ||v W_O|| by its sum over the layer (official code)

    def floor(self, T):
        """Tokens every head keeps at least: sink + window + the minimum share."""
        return min(T, self.sink + self.window + math.ceil(self.min_share * T))


def progress(done, total, text):
    """A progress line: redrawn in place on a terminal; every 10% and at the end in a log file."""
    if sys.stdout.isatty():
        print(f"\r{text}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(text, flush=True)


# -----------------------------------------------------------------------------
# intra-head scorers: (L, H, T), higher = more worth keeping. LU-KV does not change these.


def snapkv_scores(probe, cfg):
    """SnapKV: attention the last positions pay to each token, summed, GQA group mean, max-pooled."""
    layers = []
    for l in sorted(probe.prefill_attn):
        a = probe.prefill_attn[l][0]  # (H, G, w, T)
        s = a.sum(dim=2).mean(dim=1)  # (H, T)
        s = torch.nn.functional.max_pool1d(s[:, None], cfg.snap_kernel, stride=1, padding=cfg.snap_kernel // 2)[:, 0]
        layers.append(s)
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


def protect(scores, cfg):
    """Sink and recent-window tokens get +inf so every scorer keeps them."""
    scores = scores.clone()
    scores[..., :cfg.sink] = float("inf")
    scores[..., max(cfg.sink, scores.shape[-1] - cfg.window):] = float("inf")
    return scores


# -----------------------------------------------------------------------------
# oracle importance (offline): what each cached token contributes to the next steps' outputs


@torch.no_grad()
def value_out_norms(model, values, normalise):
    """||v_j @ W_O[q]|| for every layer, KV head h, query head q of its group, token j: (L, H, G, T)."""
    norms = []
    for l, v in sorted(values.items()):
        w = model.o_proj_heads(l).float()  # (H, G, C, D)
        out = torch.einsum("hgcd,htd->hgtc", w, v[0].float())  # (H, G, T, C)
        n = out.norm(dim=-1)  # (H, G, T)
        norms.append(n / n.sum() if normalise else n)
    return torch.stack(norms)


def oracle_from_steps(decode_attn, vnorm, T):
    """I[l, h, j] = max over steps k and group heads q of A[l, h, q, k, j] * vnorm[l, h, q, j]: (L, H, T)."""
    L = vnorm.shape[0]
    imp = torch.zeros(vnorm.shape[0], vnorm.shape[1], T)
    for step in decode_attn:
        a = torch.stack([step[l][0, :, :, :T] for l in range(L)])  # (L, H, G, T)
        imp = torch.maximum(imp, (a * vnorm[..., :T]).amax(dim=2))
    return imp


@torch.no_grad()
def run_full(model, ctx_ids, q_ids, cfg, max_answer, stop_token):
    """Prefill the context once with every probe, then answer with the full cache.

    Returns the prefilled cache (to compress many ways), the probe of the prefill (scorer
    inputs), the full-cache answer tokens, and the oracle importance (L, H, T) over the
    question plus the model's own answer (the future steps of the query-agnostic setting).
    """
    T = len(ctx_ids)
    if T == 0:
        raise ValueError("empty context: there is nothing to compress")
    w = min(cfg.snap_window, T)
    probe = Probe(query_pos=torch.arange(T - w, T), keep_values=True)
    cache = model.new_cache(1)
    model(torch.tensor([ctx_ids]), cache=cache, probe=probe)
    future = Probe(decode=True)
    answer, _ = model.generate(torch.tensor([q_ids]), max_answer, cache=cache.clone(), stop_token=stop_token,
                               probe=future)
    vnorm = value_out_norms(model, probe.values, cfg.normalise_values)
    return cache, probe, answer[0].tolist(), oracle_from_steps(future.decode_attn, vnorm, T)


def scores_for(name, cache, probe, imp, cfg):
    """Every scorer by name; 'oracle' ranks by the oracle importance itself (an upper bound)."""
    L, H, T = imp.shape
    raw = {"snapkv": lambda: snapkv_scores(probe, cfg), "keydiff": lambda: keydiff_scores(cache),
           "knorm": lambda: knorm_scores(cache), "streaming": lambda: streaming_scores(L, H, T),
           "oracle": lambda: imp.clone()}
    if name not in raw:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(raw)}")
    s = raw[name]()
    if not torch.isfinite(s).all():
        raise ValueError(f"scorer {name} produced NaN or infinite scores")
    return protect(s, cfg)


# -----------------------------------------------------------------------------
# solver: one head's loss curve and its convex relaxation


def loss_curve(order_scores, utility, n_protected=0):
    """Cumulative oracle loss of one head when tokens are evicted in the heuristic's order.

    order_scores, utility: (T,). Tokens go lowest score first; ties go to the lower token
    index, so the curve is deterministic. Returns curve (T - n_protected + 1,) with curve[0] = 0
    and curve[n] = utility lost after the first n evictions.
    Protected tokens (sink + recent window) are the caller's job: either slice them out before
    calling, or give them score +inf and pass their count as n_protected, which stops the curve
    before them (they sort last, so they are never evicted)."""
    order_scores, utility = np.asarray(order_scores, float), np.asarray(utility, float)
    if order_scores.ndim != 1 or order_scores.shape != utility.shape:
        raise ValueError(f"expected order_scores and utility of the same shape (T,), "
                         f"got {order_scores.shape} and {utility.shape}")
    if not np.isfinite(utility).all() or np.isnan(order_scores).any():
        raise ValueError("expected finite utility and non-NaN scores (+inf marks protected tokens)")
    if not 0 <= n_protected <= len(utility):
        raise ValueError(f"expected 0 <= n_protected <= T = {len(utility)}, got {n_protected}")
    order = np.argsort(order_scores, kind="stable")  # (T,) stable sort = (score, index) order
    evictable = order[: len(order) - n_protected]
    return np.concatenate([[0.0], np.cumsum(utility[evictable])])  # (T - n_protected + 1,)


def lower_convex_hull(curve):
    """Lower convex hull of the points (i, curve[i]), evaluated at every integer i.

    Returns hull (n+1,) and slopes (n,), where slopes[i] is the slope of the hull segment that
    contains the step i -> i+1. Every step of a segment gets the segment's exact slope
    (y_end - y_start) / (x_end - x_start), so equal slopes mean the same segment and the
    slopes strictly increase from one segment to the next."""
    curve = np.asarray(curve, float)
    n = len(curve) - 1

    def slope(a, b):
        return (curve[b] - curve[a]) / (b - a)

    # monotone chain, left to right. the pop test compares the very slopes stored below, so
    # float rounding can never leave a stored slope smaller than the one before it.
    vertices = []
    for x in range(n + 1):
        while len(vertices) >= 2 and slope(vertices[-2], vertices[-1]) >= slope(vertices[-1], x):
            vertices.pop()  # vertices[-1] lies on or above the chord, not a hull corner
        vertices.append(x)

    hull, slopes = curve.copy(), np.empty(n)  # (n+1,), (n,)
    for x0, x1 in zip(vertices[:-1], vertices[1:]):
        s = slope(x0, x1)
        slopes[x0:x1] = s
        hull[x0:x1] = curve[x0] + s * np.arange(x1 - x0)  # vertices keep their exact value
    return hull, slopes


def pava_slopes(increments):
    """Non-decreasing least-squares fit to increments (n,) with unit weights (pool adjacent violators).

    Why this is the hull again: a convex minorant of the curve is exactly a curve whose steps
    never decrease. Pooling a violating run of steps replaces them by their mean, i.e. by the
    chord over that run, and PAVA keeps pooling until no run dips below a chord. So
    curve[0] + cumsum(pava_slopes(diff(curve))) is the greatest convex minorant, the lower
    convex hull (the classical result: the isotonic regression of slopes is the derivative of
    the greatest convex minorant of the cumulative sum)."""
    blocks = []  # [sum, count] of each pooled run, left to right
    for value in np.asarray(increments, float):
        blocks.append([value, 1])
        while len(blocks) >= 2 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(c, s / c) for s, c in blocks]) if blocks else np.empty(0)


# -----------------------------------------------------------------------------
# solver: global greedy over all heads


def _check_curves(curves, floors):
    """Validate curves and floors; return floors as an int array and each head's reachable curve."""
    floors = np.asarray(floors)
    if floors.shape != (len(curves),):
        raise ValueError(f"expected one floor per head, shape ({len(curves)},), got {floors.shape}")
    if not np.issubdtype(floors.dtype, np.integer):
        raise ValueError(f"expected integer floors (tokens each head keeps), got dtype {floors.dtype}")
    reachable = []
    for h, (curve, floor) in enumerate(zip(curves, floors)):
        curve = np.asarray(curve, float)
        if curve.ndim != 1 or len(curve) == 0:
            raise ValueError(f"curve of head {h}: expected shape (T+1,), got {curve.shape}")
        if not np.isfinite(curve).all():
            raise ValueError(f"curve of head {h} contains NaN or inf; expected finite losses")
        if floor < 0:
            raise ValueError(f"floors must be non-negative, got floors[{h}] = {floor}")
        if floor > len(curve) - 1:
            raise ValueError(f"floors[{h}] = {floor} exceeds head {h}'s {len(curve) - 1} "
                             "evictable tokens; lower the floor")
        # the floor caps evictions at T - floor; the hull is taken over that reachable part so
        # that a head stopped by its floor always stops on a hull vertex
        reachable.append(curve[: len(curve) - floor])
    return floors.astype(np.int64), reachable


def _check_total(total_evict, reachable):
    limit = sum(len(c) - 1 for c in reachable)
    if not 0 <= total_evict <= limit:
        raise ValueError(f"expected 0 <= total_evict <= {limit} (the tokens the floors allow to "
                         f"evict, sum of T_h - floor_h), got {total_evict}")


def _greedy_order(reachable):
    """Head index of every eviction, in the order the greedy makes them: (sum of T_h - floor_h,)."""
    slopes = [lower_convex_hull(c)[1] for c in reachable]
    evicted = np.zeros(len(reachable), dtype=np.int64)

    def key(h):
        e = evicted[h]
        # equal stored slopes <=> same hull segment (see lower_convex_hull)
        mid_segment = e > 0 and slopes[h][e] == slopes[h][e - 1]
        # on equal slopes a head already inside a segment goes first, so at most one head ever
        # stops part-way through a segment; that one head's curve-to-hull gap is then the whole
        # excess of the true loss over the optimum. (with the index tie-break alone the same
        # happens, since the heap minimum never decreases, but the flag states the intent.)
        return (slopes[h][e], 0 if mid_segment else 1, h)

    heap = [key(h) for h in range(len(reachable)) if len(slopes[h]) > 0]
    heapq.heapify(heap)
    order = []
    while heap:
        h = heapq.heappop(heap)[2]
        evicted[h] += 1
        order.append(h)
        if evicted[h] < len(slopes[h]):
            heapq.heappush(heap, key(h))
    return np.array(order, dtype=np.int64)


def greedy_evictions(curves, floors, total_evict):
    """Tokens evicted per head, (H,), when total_evict evictions go one at a time to the lowest hull slope."""
    floors, reachable = _check_curves(curves, floors)
    _check_total(total_evict, reachable)
    order = _greedy_order(reachable)
    return np.bincount(order[:total_evict], minlength=len(curves))  # (H,)


def greedy_budget_table(curves, floors, n_ratios=99, n_protected_total=0):
    """The paper's one-pass sweep: evicted (n_ratios, H), row r-1 = per-head evictions at ratio r/(n_ratios+1).

    curves are the heads' curves over evictable tokens only. The ratio counts over all tokens,
    N = sum(T_h) + n_protected_total (pass the protected sink + window count to match the
    paper), and row r-1 evicts round_half_up(r / (n_ratios+1) * N) tokens in total. Once every
    token above the floors is gone, the remaining rows repeat that last state."""
    floors, reachable = _check_curves(curves, floors)
    if n_ratios < 1 or n_protected_total < 0:
        raise ValueError(f"expected n_ratios >= 1 and n_protected_total >= 0, "
                         f"got {n_ratios} and {n_protected_total}")
    order = _greedy_order(reachable)
    n_tokens = sum(len(c) - 1 for c in curves) + n_protected_total
    denominator = n_ratios + 1
    evicted = np.zeros((n_ratios, len(curves)), dtype=np.int64)  # (R, H)
    counts, done = np.zeros(len(curves), dtype=np.int64), 0
    for r in range(1, n_ratios + 1):
        # integer round-half-up of r / denominator * n_tokens, no float ties to worry about
        target = min((2 * r * n_tokens + denominator) // (2 * denominator), len(order))
        counts += np.bincount(order[done:target], minlength=len(curves))
        evicted[r - 1], done = counts, target
    return evicted


# -----------------------------------------------------------------------------
# solver: exact reference and losses


def dp_exact(curves, floors, total_evict):
    """Exact minimum of sum_h curve_h[e_h] with sum e_h = total_evict, e_h <= T_h - floor_h.

    Knapsack over heads on the true (non-convex) curves, O(H * total * T). Small instances only:
    it is the reader's reference for the greedy. Returns (min_loss, evictions (H,)); among equal
    optima the last head evicts as few tokens as it can, then the one before it, and so on."""
    floors, reachable = _check_curves(curves, floors)
    _check_total(total_evict, reachable)
    best = np.full(total_evict + 1, np.inf)  # (E+1,) best loss of the heads so far, by total evicted
    best[0] = 0.0
    choices = []  # per head: (E+1,) its evictions in the best split of each total
    for curve in reachable:
        new, choice = np.full_like(best, np.inf), np.zeros(total_evict + 1, dtype=np.int64)
        for e in range(min(len(curve) - 1, total_evict) + 1):
            candidate = best[: total_evict + 1 - e] + curve[e]  # (E+1-e,)
            better = candidate < new[e:]  # strict: the smaller e wins ties
            new[e:][better], choice[e:][better] = candidate[better], e
        best = new
        choices.append(choice)
    evictions, remaining = np.zeros(len(curves), dtype=np.int64), total_evict
    for h in reversed(range(len(curves))):
        evictions[h] = choices[h][remaining]
        remaining -= evictions[h]
    return float(best[total_evict]), evictions


def true_loss(curves, evictions):
    """Sum over heads of curve_h[e_h]: the utility actually lost."""
    return float(sum(np.asarray(c, float)[e] for c, e in zip(curves, evictions)))


def relaxed_loss(curves, evictions, floors=None):
    """Sum over heads of hull_h[e_h], with the hull of the floor-reachable part (as the greedy uses)."""
    floors = np.zeros(len(curves), dtype=np.int64) if floors is None else floors
    _, reachable = _check_curves(curves, floors)
    return float(sum(lower_convex_hull(c)[0][e] for c, e in zip(reachable, evictions)))


# -----------------------------------------------------------------------------
# solver: integer budgets from a ratio row


def largest_remainder(shares, total, minimum=None, maximum=None):
    """Round non-negative shares (H,) summing to total into int counts (H,) summing exactly to total.

    Every head gets floor(share), then the leftover units go to the largest fractional parts,
    ties to the lower index; so |count - share| < 1. Bounds come after: counts are clipped to
    [minimum, maximum] and the sum is repaired one unit at a time, taking from (giving to) the
    head furthest above (below) its share that still may move, ties to the lower index. A head
    pinned by a bound may then sit a unit or more from its share; that is the price of the bound."""
    shares = np.asarray(shares, float)
    if shares.ndim != 1 or not np.isfinite(shares).all() or (shares < 0).any():
        raise ValueError(f"expected finite non-negative shares of shape (H,), got {shares}")
    minimum = np.zeros(len(shares), np.int64) if minimum is None else np.asarray(minimum, np.int64)
    maximum = np.full(len(shares), total, np.int64) if maximum is None else np.asarray(maximum, np.int64)
    if int(total) != total or not minimum.sum() <= total <= maximum.sum() or (minimum > maximum).any():
        raise ValueError(f"expected an integer total with sum(minimum) = {minimum.sum()} <= total "
                         f"<= sum(maximum) = {maximum.sum()} and minimum <= maximum, got {total}")
    if abs(shares.sum() - total) > 1e-6 * max(1.0, total):
        raise ValueError(f"shares sum to {shares.sum()}, expected total = {total}")

    counts = np.floor(shares).astype(np.int64)
    leftover = int(total - counts.sum())  # in [0, H] when shares sum to total
    by_remainder = np.lexsort((np.arange(len(shares)), -(shares - counts)))  # largest first
    counts[by_remainder[: max(leftover, 0)]] += 1
    counts = np.clip(counts, minimum, maximum)
    while counts.sum() != total:
        if counts.sum() < total:
            excess = np.where(counts < maximum, shares - counts, -np.inf)
        else:
            excess = np.where(counts > minimum, counts - shares, -np.inf)
        counts[np.argmax(excess)] += 1 if counts.sum() < total else -1  # argmax: first of ties
    return counts


# -----------------------------------------------------------------------------
# one context's budget table, and offline profiling over calibration contexts

RATIOS = np.arange(1, 100) / 100  # row r-1 of a table is global compression r% (kvpress LUKVPress)


def head_curves(imp, scores, cfg):
    """Loss curves (evictable tokens only) and greedy floors of every head, in (l, h) order."""
    L, H, T = imp.shape
    lo, hi = cfg.sink, max(cfg.sink, T - cfg.window)  # tokens [lo, hi) may be evicted
    floor = max(0, cfg.floor(T) - (T - (hi - lo)))  # evictable tokens each head keeps
    curves = [loss_curve(scores[l, h, lo:hi].numpy(), imp[l, h, lo:hi].numpy()) for l in range(L) for h in range(H)]
    floors = np.full(L * H, min(floor, hi - lo), dtype=np.int64)
    return curves, floors, T - (hi - lo)


def context_table(imp, scores, cfg):
    """The paper's sweep on one context: prune ratio of every head at ratios 1..99%, (99, L, H)."""
    L, H, T = imp.shape
    curves, floors, n_protected = head_curves(imp, scores, cfg)
    evicted = greedy_budget_table(curves, floors, len(RATIOS), n_protected_total=L * H * n_protected)  # (99, L*H)
    return evicted.reshape(len(RATIOS), L, H) / T


def checkpoint_id(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@torch.no_grad()
def build_profile(model, enc, scorers, cfg, n_contexts=16, n_questions=8, length=1024, seed=0, log=progress):
    """Average the per-(context, question) tables over calibration prose with questions (tasks 'qa').

    As in the paper: the scorer sees the context without the question; the oracle's future is
    the question plus the model's own answer. Calibration seeds never meet evaluation seeds.
    cfg.correct_only (ours) drops the questions the model answers wrong: their futures attend to
    the wrong facts. Returns {scorer: (99, L, H) mean prune ratios}.
    """
    rng = random.Random(f"calibration-{seed}")
    # the answers are short: with the stop token the future is the question plus the answer, and a
    # longer horizon changes nothing; without it the model continues for exactly `horizon` steps
    stop = enc.encode_ordinary("\n")[0] if cfg.stop_at_answer else None
    tables, t0 = {s: [] for s in scorers}, time.time()
    for i in range(n_contexts):
        ex = tasks.make_example("qa", rng, length, n_questions)
        ctx_ids = enc.encode_ordinary(ex.context)
        for q, a in ex.qa:
            cache, probe, answer, imp = run_full(model, ctx_ids, enc.encode_ordinary(q), cfg, cfg.horizon, stop)
            if cfg.correct_only and not tasks.exact_match("qa", enc.decode(answer).split("\n")[0], a):
                continue
            for s in scorers:
                tables[s].append(context_table(imp, scores_for(s, cache, probe, imp, cfg), cfg))
        log(i + 1, n_contexts, f"profile {','.join(scorers)}: context {i + 1}/{n_contexts} "
            f"({len(tables[scorers[0]])} (context, question) tables, {time.time() - t0:.0f} s)")
    if not tables[scorers[0]]:
        raise RuntimeError(f"no calibration question was kept (correct_only={cfg.correct_only}): the model answered "
                           f"none of {n_contexts * n_questions} right; profile without --calib-correct-only")
    return {s: np.mean(t, axis=0) for s, t in tables.items()}


def save_profile(path, table, meta):
    np.savez(path, table=table.astype(np.float32), meta=json.dumps(meta))


def load_profile(path, scorer, model_id, n_layer, n_kv_head, snap_window=None):
    """Load a profile; refuse one made for another scorer, model, shape or SnapKV window, by name."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no profile at {path}; make it with: python lukv.py --profile --scorer {scorer}")
    with np.load(path) as f:
        table, meta = f["table"], json.loads(str(f["meta"]))
    if meta["scorer"] != scorer:
        raise ValueError(f"profile {path} was made for scorer {meta['scorer']!r}, not {scorer!r}")
    if meta["model"] != model_id:
        raise ValueError(f"profile {path} was made for model {meta['model']}, not {model_id}; rebuild it "
                         f"with python lukv.py --profile --scorer {scorer}")
    if table.shape != (len(RATIOS), n_layer, n_kv_head):
        raise ValueError(f"profile {path} has shape {table.shape}, expected (99, {n_layer}, {n_kv_head})")
    made_with = meta.get("snap_window", LUKVConfig.snap_window)  # profiles older than the option used the default
    if scorer == "snapkv" and snap_window is not None and made_with != snap_window:
        raise ValueError(f"profile {path} was made with SnapKV window {made_with}, not {snap_window}; pass "
                         f"--snap-window {made_with} or rebuild it with --profile --snap-window {snap_window}")
    return table, meta


# -----------------------------------------------------------------------------
# beyond the paper (ours): a task-loss utility, solved with the same hull and greedy
#
# Instead of the oracle's attention-times-value proxy, measure what the task loses: the
# calibration answer's loss when only head h is cut to budget b (all other heads full), on a
# grid of budgets, linearly interpolated to every eviction count. The averaged curves go
# through the same convex hull and greedy sweep as the paper's.

TASKLOSS_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)  # fractions of a head's evictable tokens cut


@torch.no_grad()
def answer_nll(model, cache, follow_ids, answer_ids):
    """Mean negative log-likelihood of answer_ids after feeding follow_ids through the cache."""
    logits = model(torch.tensor([follow_ids + answer_ids[:-1]]), cache=cache)[0, len(follow_ids) - 1:]  # (A, V)
    return float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer_ids)))


@torch.no_grad()
def build_taskloss_profile(model, enc, scorer, cfg, n_contexts=8, n_questions=4, length=1024, seed=0, log=progress):
    """(99, L, H) prune ratios from task-loss curves averaged over calibration (context, question) pairs."""
    rng = random.Random(f"calibration-{seed}")
    stop = enc.encode_ordinary("\n")[0]
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    sums, t0, pairs = None, time.time(), 0
    for i in range(n_contexts):
        ex = tasks.make_example("qa", rng, length, n_questions)
        ctx = enc.encode_ordinary(ex.context)
        T = len(ctx)
        lo, hi = cfg.sink, max(cfg.sink, T - cfg.window)
        n_evictable = hi - lo
        if sums is None:
            sums, T0 = np.zeros((L * H, n_evictable + 1)), T
        for q, _ in ex.qa:
            q_ids = enc.encode_ordinary(q)
            cache, probe, answer, imp = run_full(model, ctx, q_ids, cfg, cfg.horizon, stop)
            scores = scores_for(scorer, cache, probe, imp, cfg)
            base = answer_nll(model, cache.clone(), q_ids, answer)
            for hd in range(L * H):
                l, h = divmod(hd, H)
                points = []
                for frac in TASKLOSS_GRID:
                    counts = np.full((L, H), T)
                    counts[l, h] = T - round(frac * n_evictable)
                    c = cache.clone()
                    compress(c, scores, counts)
                    points.append(answer_nll(model, c, q_ids, answer) - base)
                # every context is mapped onto the first one's eviction axis by its fraction cut
                x = np.array(TASKLOSS_GRID) * (sums.shape[1] - 1)
                sums[hd] += np.interp(np.arange(sums.shape[1]), x, points)
            pairs += 1
        log(i + 1, n_contexts, f"task-loss profile {scorer}: context {i + 1}/{n_contexts} ({pairs} pairs, "
            f"{time.time() - t0:.0f} s)")
    # measured losses are noisy: clip at zero and make them non-decreasing before the hull
    curves = [np.maximum.accumulate(np.maximum(c / pairs, 0.0)) for c in sums]
    floor = max(0, cfg.floor(T0) - (T0 - (sums.shape[1] - 1)))
    evicted = greedy_budget_table(curves, np.full(L * H, floor), len(RATIOS), n_protected_total=L * H * (T0 - (sums.shape[1] - 1)))
    return evicted.reshape(len(RATIOS), L, H) / T0


# -----------------------------------------------------------------------------
# online: ratio -> per-head keep counts, by each allocator


def check_ratio(ratio):
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ValueError(f"compression ratio must lie in [0, 1) (0.8 = evict 80%), got {ratio!r}")


def counts_from_shares(shares, ratio, T, cfg):
    """Scale per-head shares (L, H) to keep round((1 - ratio) * L * H * T) tokens exactly."""
    L, H = shares.shape
    total = round((1 - ratio) * L * H * T)
    floor = cfg.floor(T)
    if total < L * H * floor:
        raise ValueError(f"ratio {ratio} keeps {total} tokens, below the floor of {floor} per head x {L * H} "
                         f"heads (sink {cfg.sink} + window {cfg.window} + {cfg.min_share:.0%}); lower the ratio")
    shares = np.asarray(shares, float) * total / max(float(np.sum(shares)), 1e-30)
    counts = largest_remainder(shares.ravel(), total, minimum=np.full(L * H, floor), maximum=np.full(L * H, T))
    return counts.reshape(L, H)


def pyramid_shares(L, H, T, ratio, beta=20):
    """PyramidKV: budgets fall linearly from the first layer to the last (beta sets the slope)."""
    k_avg = (1 - ratio) * T
    k_min = k_avg / beta
    k_max = 2 * k_avg - k_min
    per_layer = k_max - (k_max - k_min) * np.arange(L) / max(1, L - 1)  # (L,)
    return np.repeat(per_layer[:, None], H, axis=1)


def adakv_counts(scores, ratio, cfg, alpha=0.2):
    """AdaKV: each layer keeps (1 - ratio) * H * T tokens, each head a floor of alpha of the
    uniform share, and the rest goes to the layer's highest scores pooled across its heads."""
    L, H, T = scores.shape
    per_head = round((1 - ratio) * T)
    base = min(T, max(cfg.floor(T), int(alpha * per_head)))
    counts = np.zeros((L, H), dtype=np.int64)
    for l in range(L):
        ordered = torch.sort(scores[l], dim=-1, descending=True).values  # (H, T)
        rest = ordered[:, base:].reshape(-1)  # candidates beyond each head's floor
        n_extra = per_head * H - base * H
        top = torch.topk(rest, n_extra).indices if n_extra > 0 else torch.empty(0, dtype=torch.long)
        counts[l] = base + np.bincount((top // (T - base)).numpy(), minlength=H)
    return counts


def allocate(name, ratio, scores, cfg, profile=None, imp=None, seed=0):
    """Per-head keep counts (L, H) for one context; every allocator keeps the same total."""
    check_ratio(ratio)
    L, H, T = scores.shape
    if ratio == 0:
        return np.full((L, H), T)
    if name in ("uniform", "streaming"):
        return counts_from_shares(np.ones((L, H)), ratio, T, cfg)
    if name == "pyramid":
        return counts_from_shares(pyramid_shares(L, H, T, ratio), ratio, T, cfg)
    if name == "adakv":
        return adakv_counts(scores, ratio, cfg)
    if name in ("lukv", "shuffled", "taskloss"):
        if profile is None:
            raise ValueError(f"the {name} allocator needs a profile (python lukv.py --profile)")
        row = round(100 * ratio) - 1  # kvpress LUKVPress convention
        counts = counts_from_shares((1 - profile[row]) * T, ratio, T, cfg)
        if name == "shuffled":  # control: the same budgets given to random heads
            counts = np.random.default_rng(seed).permutation(counts.ravel()).reshape(L, H)
        return counts
    if name == "oracle":  # per input, solved on this input's own oracle curves: the upper bound
        curves, floors, n_protected = head_curves(imp, scores, cfg)
        total_keep = round((1 - ratio) * L * H * T)
        evicted = greedy_evictions(curves, floors, L * H * T - max(total_keep, L * H * cfg.floor(T)))
        return T - evicted.reshape(L, H)
    raise ValueError(f"unknown allocator {name!r}; expected uniform, pyramid, adakv, lukv, oracle, shuffled, taskloss")


def compress(cache, scores, counts):
    """Keep each head's counts[l, h] best tokens by score, through the cache's eviction entry point.

    Ties go the way the loss curves go (the lower index is evicted first). Returns the keep
    mask (L, H, T) so callers can measure what was lost.
    """
    L, H, T = scores.shape
    counts = torch.as_tensor(counts, dtype=torch.long)
    if bool((counts > T).any()) or bool((counts < 0).any()):
        raise ValueError(f"keep counts must lie in [0, T={T}], got min {int(counts.min())}, max {int(counts.max())}")
    order = torch.sort(scores, dim=-1, stable=True).indices  # (L, H, T) ascending = eviction order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T).expand(L, H, T))  # (L, H, T)
    keep = rank >= (T - counts)[..., None]  # (L, H, T)
    slots = torch.where(keep, torch.arange(T), T)  # kept slots, others pushed past the end
    kept_idx = torch.sort(slots, dim=-1).values[..., :int(counts.max())]  # (L, H, K)
    for l in range(L):
        cache.keep(l, kept_idx[l][None], counts[l][None])
    return keep


# -----------------------------------------------------------------------------
# evaluation: every family x ratio x allocator x scorer, query-agnostic and query-aware

ALLOCATORS = ["uniform", "pyramid", "adakv", "lukv", "taskloss", "shuffled", "oracle"]
SCORERS = ["snapkv", "keydiff", "knorm", "oracle"]
SHORT = {"niah_single": "single", "niah_multikey": "mkey", "niah_multivalue": "mval", "niah_multiquery": "mquery",
         "vt": "vt", "cwe": "cwe", "fwe": "fwe", "qa": "qa"}


@torch.no_grad()
def answer_with(model, enc, cache, follow_ids, max_new, stop):
    new, _ = model.generate(torch.tensor([follow_ids]), max_new, cache=cache, stop_token=stop)
    return enc.decode(new[0].tolist()).split("\n")[0]


@torch.no_grad()
def evaluate(model, enc, profiles, families, ratios, methods, n, length, seed, cfg, settings=("agnostic",),
             log=progress):
    """Exact match, kept KV bytes and oracle loss of every (setting, ratio, scorer, allocator).

    One prefill per example: the cache is cloned and compressed once per method. Query-agnostic
    compresses the context before the question (the paper's setting); query-aware compresses
    the context and the question (all but its last token, which is then decoded).
    Returns {"rows": [...], "full": {setting: {family: acc}}, "full_qa_by_kind": {kind: [hits, n]}, ...}.
    """
    stop = enc.encode_ordinary("\n")[0]
    tally = {}  # (setting, ratio, scorer, allocator, family) -> [hits, n, bytes, oracle_loss]
    full = {s: {} for s in settings}
    by_kind = {}  # qa question kind -> [hits, n] with the full cache (the first setting)
    full_bytes = {s: {} for s in settings}  # mean K/V bytes of the uncompressed cache
    t0, done, total = time.time(), 0, len(settings) * len(families) * n
    for setting in settings:
        for family in families:
            hits_full = 0
            for ex in tasks.example_set(family, n, length, seed):
                q, a = ex.qa[0]
                ctx, q_ids = enc.encode_ordinary(ex.context), enc.encode_ordinary(q)
                prefix, follow = (ctx, q_ids) if setting == "agnostic" else (ctx + q_ids[:-1], q_ids[-1:])
                max_new = len(enc.encode_ordinary(a)) + 2
                cache, probe, full_answer, imp = run_full(model, prefix, follow, cfg, max_new, stop)
                hit_full = tasks.exact_match(family, enc.decode(full_answer).split("\n")[0], a)
                hits_full += hit_full
                if family == "qa" and setting == settings[0]:
                    tally_kind = by_kind.setdefault(tasks.question_kind(q), [0, 0])
                    tally_kind[0] += hit_full
                    tally_kind[1] += 1
                full_bytes[setting][family] = full_bytes[setting].get(family, 0) + cache.nbytes() / n
                scored = {}
                for scorer, allocator in methods:
                    if scorer not in scored:
                        scored[scorer] = scores_for(scorer, cache, probe, imp, cfg)
                    for ratio in ratios:
                        profile = profiles.get(("taskloss_" if allocator == "taskloss" else "") + scorer)
                        counts = allocate(allocator, ratio, scored[scorer], cfg, profile, imp)
                        c = cache.clone()
                        keep = compress(c, scored[scorer], counts)
                        kept_bytes = c.nbytes()  # right after eviction, before the question is appended
                        hit = tasks.exact_match(family, answer_with(model, enc, c, follow, max_new, stop), a)
                        lost = float((imp * ~keep).sum() / imp.sum().clamp(min=1e-30))
                        t = tally.setdefault((setting, ratio, scorer, allocator, family), [0, 0, 0, 0.0])
                        t[0] += hit
                        t[1] += 1
                        t[2] += kept_bytes
                        t[3] += lost
                done += 1
                log(done, total, f"eval {setting} {family:16s} {done}/{total} examples ({time.time() - t0:.0f} s)")
            full[setting][family] = hits_full / n
    rows = []
    for (setting, ratio, scorer, allocator, family), (h, k, b, lost) in tally.items():
        rows.append({"setting": setting, "ratio": ratio, "scorer": scorer, "allocator": allocator,
                     "family": family, "accuracy": h / k, "kv_bytes": b / k, "oracle_loss": lost / k})
    return {"rows": rows, "full": full, "full_kv_bytes": full_bytes, "full_qa_by_kind": by_kind, "length": length, "n": n,
            "seed": seed, "config": asdict(cfg)}


def averaged_families(full, setting):
    """Families the model can do with the full cache (>= 50%): the only ones averaged."""
    return [f for f, acc in full[setting].items() if acc >= 0.5]


def format_table(result):
    """One text table per setting and ratio: exact match per family, average, KV kept, oracle loss."""
    lines = []
    for setting in result["full"]:
        fams = list(result["full"][setting])
        keep = averaged_families(result["full"], setting)
        head = f"{'scorer':8s} {'allocator':9s} " + " ".join(f"{SHORT[f]:>6s}" for f in fams) + \
            f" {'avg':>6s} {'%full':>6s} {'KV MB':>7s} {'oloss':>6s}"
        lines.append(f"== {setting}, {result['length']} tokens, n={result['n']} per family; avg over "
                     f"{', '.join(SHORT[f] for f in keep)} (full-cache >= 50%)")
        full_avg = np.mean([result["full"][setting][f] for f in keep]) if keep else float("nan")
        lines.append(head)
        full_mb = np.mean([result["full_kv_bytes"][setting][f] for f in fams]) / 1e6
        lines.append(f"{'full':8s} {'-':9s} " + " ".join(f"{result['full'][setting][f]:6.2f}" for f in fams) +
                     f" {full_avg:6.2f} {100.0:6.1f} {full_mb:7.3f} {0.0:6.3f}")
        rows = [r for r in result["rows"] if r["setting"] == setting]
        for ratio in sorted({r["ratio"] for r in rows}):  # methods keep the order they were asked in
            lines.append(f"-- compression {ratio:.0%}")
            for scorer, allocator in dict.fromkeys((r["scorer"], r["allocator"]) for r in rows if r["ratio"] == ratio):
                sel = {r["family"]: r for r in rows if r["ratio"] == ratio and r["scorer"] == scorer
                       and r["allocator"] == allocator}
                avg = np.mean([sel[f]["accuracy"] for f in keep]) if keep else float("nan")
                mb = np.mean([sel[f]["kv_bytes"] for f in fams]) / 1e6
                oloss = np.mean([sel[f]["oracle_loss"] for f in fams])
                lines.append(f"{scorer:8s} {allocator:9s} " + " ".join(f"{sel[f]['accuracy']:6.2f}" for f in fams) +
                             f" {avg:6.2f} {100 * avg / full_avg if full_avg else float('nan'):6.1f} {mb:7.3f} {oloss:6.3f}")
    return "\n".join(lines)


@torch.no_grad()
def knockout(model, enc, families, n, length, seed, cfg, log=progress):
    """Which heads matter: accuracy (L, H, F) when one head at a time keeps only sink + window."""
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    stop = enc.encode_ordinary("\n")[0]
    acc, t0 = np.zeros((L, H, len(families))), time.time()
    for fi, family in enumerate(families):
        for ex in tasks.example_set(family, n, length, seed):
            q, a = ex.qa[0]
            ctx, q_ids = enc.encode_ordinary(ex.context), enc.encode_ordinary(q)
            max_new = len(enc.encode_ordinary(a)) + 2
            cache, probe, _, imp = run_full(model, ctx, q_ids, cfg, max_new, stop)
            scores = protect(streaming_scores(L, H, len(ctx)), cfg)
            for l in range(L):
                for h in range(H):
                    counts = np.full((L, H), len(ctx))
                    counts[l, h] = min(len(ctx), cfg.sink + cfg.window)
                    c = cache.clone()
                    compress(c, scores, counts)
                    acc[l, h, fi] += tasks.exact_match(family, answer_with(model, enc, c, q_ids, max_new, stop), a) / n
        log(fi + 1, len(families), f"knockout: {fi + 1}/{len(families)} families ({time.time() - t0:.0f} s)")
    return acc


def format_knockout(acc, families, full):
    lines = ["accuracy with one KV head cut to sink + window (rows: layer, head); full cache first"]
    lines.append(f"{'head':8s} " + " ".join(f"{SHORT[f]:>6s}" for f in families))
    lines.append(f"{'full':8s} " + " ".join(f"{full[f]:6.2f}" for f in families))
    for l in range(acc.shape[0]):
        for h in range(acc.shape[1]):
            lines.append(f"L{l}H{h:<5d} " + " ".join(f"{x:6.2f}" for x in acc[l, h]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# pictures for the terminal: the budget heatmap


def heatmap(keep_frac, title):
    """A layer x head heatmap of keep fractions drawn with block characters (darker = keeps more)."""
    shades = " ░▒▓█"
    L, H = keep_frac.shape
    lines = [title, "        " + "".join(f"h{h:<3d}" for h in range(H)) + "   keep % per KV head"]
    for l in range(L):
        cells = "".join(shades[min(4, int(f * 5))] * 3 + " " for f in keep_frac[l])
        lines.append(f"layer {l:2d} {cells}  " + " ".join(f"{100 * f:3.0f}" for f in keep_frac[l]))
    lines.append(f"        scale: ' ' <20%  ░ <40%  ▒ <60%  ▓ <80%  █ >=80%")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line

PROFILE_SCORERS = ["snapkv", "keydiff", "knorm", "oracle"]


def profile_meta(scorer, model_id, cfg, **extra):
    """What a profile file records: who it belongs to and how it was made (refused if they differ)."""
    return {"scorer": scorer, "model": model_id, "sink": cfg.sink, "window": cfg.window, "min_share": cfg.min_share,
            "snap_window": cfg.snap_window,  # SnapKV's observation window: load_profile refuses another
            "layout": "[99, n_layer, n_kv_head] prune ratios; row round(100 * ratio) - 1 (kvpress LUKVPress)",
            **extra}


def profile_path(checkpoint, scorer):
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"profile_{scorer}.npz")


def load_profiles(checkpoint, model, scorers, required=False, snap_window=None):
    """{scorer: table} for LU-KV and {'taskloss_' + scorer: table} for ours, where the files exist."""
    out, model_id = {}, checkpoint_id(checkpoint)
    for s in scorers:
        for key in (s, "taskloss_" + s):
            path = profile_path(checkpoint, key)
            if os.path.exists(path) or (required and key == s):
                out[key] = load_profile(path, s, model_id, model.cfg.n_layer, model.cfg.n_kv_head, snap_window)[0]
    return out


def write_json(path, result):
    """Write results, falling back to the current folder so a long run never loses its work."""
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as e:
        fallback = os.path.basename(path) or "lukv_eval.json"
        print(f"could not write {path} ({e}); writing {fallback} instead", file=sys.stderr)
        with open(fallback, "w") as f:
            json.dump(result, f, indent=1)
        path = fallback
    print(f"wrote {path}")


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib to draw --plot", file=sys.stderr)
        return
    setting = next(iter(result["full"]))
    keep = averaged_families(result["full"], setting)
    rows = [r for r in result["rows"] if r["setting"] == setting and r["family"] in keep]
    fig, ax = plt.subplots(figsize=(6, 4))
    for scorer, allocator in dict.fromkeys((r["scorer"], r["allocator"]) for r in rows):
        pts = sorted({r["ratio"] for r in rows})
        acc = [np.mean([r["accuracy"] for r in rows if r["ratio"] == p and r["scorer"] == scorer
                        and r["allocator"] == allocator]) for p in pts]
        ax.plot([100 * p for p in pts], acc, marker="o", label=f"{scorer}+{allocator}")
    ax.axhline(np.mean([result["full"][setting][f] for f in keep]), color="k", ls="--", label="full cache")
    ax.set_xlabel("KV cache compression (%)")
    ax.set_ylabel("exact match (avg)")
    ax.set_title(f"{setting}, {result['length']} tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--demo", action="store_true", help="heatmap + small evaluation at 80%% (a few minutes on a CPU)")
    parser.add_argument("--profile", action="store_true", help="rebuild the profiles next to the checkpoint")
    parser.add_argument("--eval", action="store_true", help="the full evaluation table")
    parser.add_argument("--full-cache", action="store_true", help="only the full-cache accuracy per family")
    parser.add_argument("--knockout", action="store_true", help="accuracy with one head at a time cut to sink + window")
    parser.add_argument("--taskloss", action="store_true", help="(ours) build the task-loss profile for --scorers")
    # ---- model and method
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--scorers", "--scorer", default=None,
                        help="comma list (default: all for --eval/--profile, snapkv for --demo and --model)")
    parser.add_argument("--allocators", default=None, help="comma list (default: all)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: answer tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    parser.add_argument("--past-answer", action="store_true",
                        help="--profile: the oracle's future runs the full --horizon steps, past the answer's newline")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="context tokens")
    parser.add_argument("--n", type=int, default=None, help="examples per family")
    parser.add_argument("--families", default=None, help="comma list (default: every evaluation family + qa)")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--settings", default="agnostic,aware")
    parser.add_argument("--seed", type=int, default=2, help="evaluation seed (calibration and development use others)")
    parser.add_argument("--calib-contexts", type=int, default=16)
    parser.add_argument("--calib-seed", type=int, default=0, help="--profile: calibration seed (calibration-N)")
    parser.add_argument("--calib-correct-only", action="store_true",
                        help="--profile (ours): only the calibration questions the model answers right")
    parser.add_argument("--calib-questions", type=int, default=8)
    # ---- output
    parser.add_argument("--json", default="lukv_eval.json")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="accuracy vs compression (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    # ---- a real model: a local Hugging Face Llama / Mistral / Qwen2 folder (hf.py; pip install -r requirements-hf.txt)
    parser.add_argument("--model", default=None, metavar="FOLDER", help="profile / evaluate this folder, not --checkpoint")
    parser.add_argument("--out", default=None, metavar="TABLE.npy", help="--profile --model: the kvpress table to write")
    parser.add_argument("--text", default=None, metavar="PATH", help="--profile --model: calibration text file or folder "
                                                                     "(default: generated prose)")
    parser.add_argument("--table", default=None, metavar="TABLE.npy", help="--eval --model: a table for the lukv allocator")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="--model: weights and KV cache dtype (default: the checkpoint's)")
    args = parser.parse_args()
    if not (args.demo or args.profile or args.eval or args.full_cache or args.knockout or args.taskloss):
        parser.print_help()
        sys.exit(0)
    if args.model and (args.calib_correct_only or args.calib_seed):
        parser.error("--calib-seed and --calib-correct-only choose the tiny model's calibration questions (tasks qa); "
                     "--model profiles on text (hf.py, --text) and has no questions to choose: drop them")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, stop_at_answer=not args.past_answer,
                     correct_only=args.calib_correct_only, snap_window=args.snap_window)
    if args.model:  # hf.py loads the folder, profiles it or evaluates it, and that is all
        import hf
        hf.run_cli(args, cfg)
        sys.exit(0)
    model, enc, meta = load_checkpoint(args.checkpoint)
    print(f"model: {args.checkpoint} ({model.num_params() / 1e6:.2f}M parameters, {model.cfg.n_layer} layers x "
          f"{model.cfg.n_kv_head} KV heads), trained by: {meta.get('command', '?')}")
    families = args.families.split(",") if args.families else tasks.EVAL_FAMILIES + ["qa"]
    ratios = [float(r) for r in args.ratios.split(",")]
    for r in ratios:
        check_ratio(r)
    model_id = checkpoint_id(args.checkpoint)  # the profiles name the model they belong to

    if args.profile:
        scorers = args.scorers.split(",") if args.scorers else PROFILE_SCORERS
        tables = build_profile(model, enc, scorers, cfg, args.calib_contexts, args.calib_questions, args.length,
                               seed=args.calib_seed)
        for s, table in tables.items():
            meta_p = profile_meta(s, model_id, cfg, horizon=cfg.horizon, stop_at_answer=cfg.stop_at_answer,
                                  normalise_values=cfg.normalise_values, correct_only=cfg.correct_only,
                                  calibration=f"tasks qa, {args.calib_contexts} contexts x {args.calib_questions} "
                                              f"questions, {args.length} tokens, seed calibration-{args.calib_seed}")
            save_profile(profile_path(args.checkpoint, s), table, meta_p)
            print(f"wrote {profile_path(args.checkpoint, s)}")

    if args.taskloss:
        for s in (args.scorers.split(",") if args.scorers else ["snapkv"]):
            table = build_taskloss_profile(model, enc, s, cfg, max(1, args.calib_contexts // 2),
                                           max(1, args.calib_questions // 2), args.length)
            meta_p = profile_meta(s, model_id, cfg, utility="task loss (ours): calibration answer NLL with one "
                                                            f"head cut, grid {TASKLOSS_GRID}")
            save_profile(profile_path(args.checkpoint, "taskloss_" + s), table, meta_p)
            print(f"wrote {profile_path(args.checkpoint, 'taskloss_' + s)}")

    if args.knockout:
        n = args.n or 10
        acc = knockout(model, enc, families, n, args.length, args.seed, cfg)
        full = evaluate(model, enc, {}, families, [], [], n, args.length, args.seed, cfg)["full"]["agnostic"]
        print(format_knockout(acc, families, full))
        write_json(args.json, {"knockout": acc.tolist(), "families": families, "full": full, "n": n})

    if args.full_cache:
        n = args.n or 50
        result = evaluate(model, enc, {}, families, [], [], n, args.length, args.seed, cfg, ("agnostic",))
        print(f"full-cache exact match, {args.length} tokens, n={n} per family, seed {args.seed}:")
        for f, acc in result["full"]["agnostic"].items():
            print(f"  {f:16s} {acc:.2f}")
        for kind, (hits, total) in sorted(result["full_qa_by_kind"].items()):
            print(f"    qa, {kind:14s} {hits}/{total}")
        write_json(args.json, result)

    if args.demo:
        t0 = time.time()
        profiles = load_profiles(args.checkpoint, model, ["snapkv"], required=True, snap_window=cfg.snap_window)
        row = profiles["snapkv"][79]  # 80% compression
        print(heatmap(1 - row, "LU-KV budgets at 80% compression (SnapKV scorer): share of the context each head keeps"))
        n = args.n or 8
        methods = [("snapkv", a) for a in ["uniform", "pyramid", "adakv", "lukv"]]
        result = evaluate(model, enc, profiles, tasks.EVAL_FAMILIES, [0.8], methods, n, args.length, args.seed,
                          cfg, ("agnostic",))
        print(format_table(result))
        full_mb = np.mean(list(result["full_kv_bytes"]["agnostic"].values())) / 1e6
        kept = np.mean([r["kv_bytes"] for r in result["rows"]]) / 1e6
        print(f"KV cache per example: full {full_mb:.2f} MB -> {kept:.2f} MB kept at 80% compression "
              f"({full_mb - kept:.2f} MB freed); demo took {time.time() - t0:.0f} s")
        if args.plot:
            plot(result, args.plot)

    if args.eval:
        scorers = args.scorers.split(",") if args.scorers else SCORERS
        allocators = args.allocators.split(",") if args.allocators else ALLOCATORS
        profiles = load_profiles(args.checkpoint, model, scorers, snap_window=cfg.snap_window)
        needs = {"lukv": "", "shuffled": "", "taskloss": "taskloss_"}  # allocators that read a profile
        methods = [(s, a) for s in scorers for a in allocators if a not in needs or needs[a] + s in profiles]
        methods += [("streaming", "uniform")]
        result = evaluate(model, enc, profiles, families, ratios, methods, args.n or 10, args.length, args.seed, cfg,
                          tuple(args.settings.split(",")))
        print(format_table(result))
        write_json(args.json, result)
        if args.plot:
            plot(result, args.plot)
