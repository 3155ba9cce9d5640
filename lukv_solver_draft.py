# solver: per-head loss curves, convex-hull relaxation, global greedy budgets (LU-KV, Tang et al.)
import heapq

import numpy as np

# ---- solver: one head's loss curve and its convex relaxation


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


# ---- solver: global greedy over all heads


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


# ---- solver: exact reference and losses


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


# ---- solver: integer budgets from a ratio row


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
