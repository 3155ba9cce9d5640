"""
The allocators LU-KV is measured against, and the integer budgets every allocator shares.

An allocator turns a compression ratio into per-head keep counts (L, H). All of them, LU-KV's
online step in lukv.py too, keep exactly solver.keep_count(L * H * T, ratio) tokens in all and
at least the floor (sink + window + 1% of T) in every head, so a difference in score is a
difference in *where* the budget goes, never in how much of it there is:

  uniform    every head the same share
  pyramid    PyramidKV (Cai et al.): layer budgets falling linearly with depth
  adakv      AdaKV (Feng et al.): inside each layer, heads share its budget by their scores

    python -m pytest -q tests/test_scorers.py -k "pyramid or adakv"   # known answers
    python -m pytest -q tests/test_peers.py                           # against kvpress's presses

Shapes: L layers, H KV heads, T context tokens.
"""

import numbers

import numpy as np
import torch

import solver

# -----------------------------------------------------------------------------
# the integer budgets every allocator shares


def check_ratio(ratio):
    """A compression ratio as a float in [0, 1) (0.8 = evict 80%); any real number type, refused otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= float(ratio) < 1:
        raise ValueError(f"compression ratio must be a number in [0, 1) (0.8 = evict 80%), got {ratio!r}")
    return float(ratio)


def kept_total(n_heads, ratio, T, cfg):
    """Tokens n_heads heads of T tokens keep in all at a ratio (solver.keep_count), refused below the floors."""
    total, floor = solver.keep_count(n_heads * T, ratio), cfg.floor(T)
    if total < n_heads * floor:
        raise ValueError(f"ratio {ratio} keeps {total} tokens, below the floor of {floor} per head x {n_heads} "
                         f"heads (sink {cfg.sink} + window {cfg.window} + {cfg.min_share:.0%}); lower the ratio")
    return total


def counts_from_shares(shares, ratio, T, cfg):
    """Scale per-head shares (L, H) to keep kept_total(L * H, ratio, T) tokens exactly, each head at least
    its floor and at most T: largest-remainder rounding, so integer shares that already sum to it come
    back unchanged."""
    L, H = shares.shape
    total = kept_total(L * H, ratio, T, cfg)
    shares = np.asarray(shares, float) * total / max(float(np.sum(shares)), 1e-30)
    counts = solver.largest_remainder(shares.ravel(), total, minimum=np.full(L * H, cfg.floor(T)),
                                      maximum=np.full(L * H, T))
    return counts.reshape(L, H)


# -----------------------------------------------------------------------------
# the baselines


def uniform_counts(shape, ratio, cfg):
    """Every head the same share of the budget (integers differ by at most one)."""
    L, H, T = shape
    return counts_from_shares(np.ones((L, H)), ratio, T, cfg)


def pyramid_layer_budgets(L, T, capacity, window, beta=20):
    """PyramidKV's per-layer budgets (L,): tokens each head of layer l keeps *before* the window, which
    comes on top. Integer arithmetic as in KVCache-Factory's PyramidKVCluster.

    capacity is what a head keeps on average, window included (the original's max_capacity_prompt), so
    the budgets average base = capacity - window. The first layer keeps max_num = 2 base - base // beta,
    the last min_num = base // beta, in equal steps (max_num - min_num) // (L - 1). max_num is capped at
    the T - window tokens before the window (min_num = 2 base - max_num then keeps the average), and a
    context shorter than 2 base (compression under about 50%) keeps base in every layer, as there."""
    base = max(0, capacity - window)
    if T < 2 * base or L == 1:
        return np.full(L, base, dtype=np.int64)
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= T - window:
        max_num = T - window
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (L - 1)
    return max_num - steps * np.arange(L, dtype=np.int64)


def pyramid_counts(shape, ratio, cfg):
    """PyramidKV's per-head counts (L, H): its layer budgets at this ratio plus the window on top.

    Ours differ from the original in two named ways: the capacity is keep_count(T, ratio), so the
    window sits inside the ratio's budget like every allocator's, and counts_from_shares rescales the
    shares to the exact total (its floored steps keep up to L (L - 1) / 2 more tokens per head) and
    lifts heads to their floor. kvpress's PyramidKVPress puts its window inside the layer budget and
    falls back to uniform whenever (1 - ratio) T / beta < its window; ours never does."""
    L, H, T = shape
    window = min(cfg.window, T)
    budgets = pyramid_layer_budgets(L, T, solver.keep_count(T, ratio), window, cfg.pyramid_beta) + window  # (L,)
    return counts_from_shares(np.repeat(budgets[:, None], H, axis=1).astype(float), ratio, T, cfg)


def adakv_counts(scores, ratio, cfg):
    """AdaKV (Feng et al.): in every layer the heads share the layer's budget by their scores (L, H, T).

    cfg.adakv_blend = "original" (FFY0/AdaKV AdaptiveSnapKVCluster): each head's budget before the window
    is B (its uniform share); the layer's top H * B scores before the windows, pooled over its heads,
    give head h a count c_h; head h keeps c_h (1 - alpha) + alpha B tokens there, and its window on
    top. The original floors alpha B and rounds each head (torch.round), which leaves the layer's total
    a few tokens off; ours rounds the layer jointly (largest remainder) so every allocator keeps the
    same total: the two agree whenever alpha B is an integer and the per-head rounds add up.
    cfg.adakv_blend = "kvpress" (kvpress AdaKVPress): every head first keeps its top alpha * (its uniform
    share) tokens, and the rest of the layer's budget goes to the pooled top scores.
    Either way a head keeps at least its floor; the layers' totals are as even as integers allow."""
    L, H, T = scores.shape
    total, floor, alpha = kept_total(L * H, ratio, T, cfg), cfg.floor(T), cfg.adakv_alpha
    layer_totals = solver.largest_remainder(np.full(L, total / L), total)  # (L,)
    window = min(cfg.window, T)
    counts = np.zeros((L, H), dtype=np.int64)
    for l in range(L):
        keep = int(layer_totals[l])
        if cfg.adakv_blend == "kvpress":
            base = min(T, max(floor, int(alpha * (keep // H))))
            ordered = torch.sort(scores[l], dim=-1, descending=True).values  # (H, T)
            rest = ordered[:, base:].reshape(-1)  # (H * (T - base),) candidates beyond each head's floor
            n_extra = keep - base * H
            top = torch.topk(rest, n_extra).indices if n_extra > 0 else torch.empty(0, dtype=torch.long)
            counts[l] = base + np.bincount((top // (T - base)).cpu().numpy(), minlength=H)
            continue
        n_pooled = keep - H * window  # H * B: the layer's budget before the windows
        pooled = np.zeros(H)
        if n_pooled > 0 and T > window:
            before = scores[l, :, :T - window].reshape(-1)  # (H * (T - window),)
            top = torch.topk(before, n_pooled).indices
            pooled = np.bincount((top // (T - window)).cpu().numpy(), minlength=H)  # (H,) c_h
        shares = pooled * (1 - alpha) + alpha * max(n_pooled, 0) / H + window  # (H,) sums to keep
        counts[l] = solver.largest_remainder(shares * keep / max(shares.sum(), 1e-30), keep,
                                             minimum=np.full(H, floor), maximum=np.full(H, T))
    return counts
