"""
The LU-KV solver in one numpy file: how many tokens each KV head evicts so that the least future utility is lost.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV
Cache Eviction" (arXiv 2602.08585, ICML 2026), the inter-head allocation stage. A heuristic scorer
fixes the order in which each head's tokens go; evicting in that order loses oracle utility along
the head's loss curve. The solver replaces every curve by its lower convex hull and evicts, one
token at a time over all heads, where the hull slope is lowest. One sweep gives nested budgets for
every compression ratio 1..99%: the (99, N) table that kvpress's LUKVPress reads.

Read top to bottom: ratios as integers (keep_count, row_of), one head's loss curve, its convex
relaxation two ways (lower_convex_hull, pava_slopes), the min-heap greedy and its budget table,
the exact reference (dp_exact), online rounding (largest_remainder); then the fast twin, which
computes the same tables for all heads at once and is the default.

Shapes: N heads (every (layer, KV head) pair, flattened); n_h evictable tokens of head h (its sink
and recent window already removed), so a loss curve is (n_h + 1,), and N heads of n tokens each
give (N, n) scores and (N, n + 1) curves; R ratio rows (99); P points of all curves laid end to end;
V hull corners and S hull segments of all heads.

    python -m pytest -q tests/test_solver.py   # the properties, on both greedy implementations
    python -m bench.solver                     # heap vs fast tables on 1,024 heads x 32,768 tokens
"""

import heapq
import json
import os
import math
import numbers

import numpy as np


def _as_number(x, expected, integer=False):
    """x as a Python int (integer=True) or finite float; numpy scalars and 0-d arrays too, bools never."""
    value = x[()] if isinstance(x, np.ndarray) and x.ndim == 0 else x  # a 0-d array -> its numpy scalar
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral if integer else numbers.Real)
            or not (integer or math.isfinite(value))):
        raise ValueError(f"expected {expected}, got {x!r}")
    return int(value) if integer else float(value)


# ---- compression ratios, in integers


def keep_count(n, ratio):
    """Tokens kept of n at a compression ratio: n - round_half_up(ratio * n), in integers.

    n is a non-negative integer, ratio a real number in [0, 1) (0.8 = evict 80%). The ratio is read
    in millionths, so 0.8 is exactly 800000 / 10**6 and 400 tokens keep 80 (float arithmetic gives
    int(400 * (1 - 0.8)) = 79, what kvpress keeps). greedy_budget_table rounds its evictions the
    same way, so a table row and this count agree."""
    n = _as_number(n, "a token count n as a non-negative integer", integer=True)
    ratio = _as_number(ratio, "a compression ratio as a real number in [0, 1) (0.8 = evict 80%)")
    if n < 0 or not 0 <= ratio < 1:
        raise ValueError(f"expected n >= 0 and a compression ratio in [0, 1) (0.8 = evict 80%), got {n} and {ratio}")
    millionths = round(ratio * 10**6)
    return n - (2 * millionths * n + 10**6) // (2 * 10**6)


RATIOS = np.arange(1, 100) / 100  # (R,) row r-1 of a budget table is global compression r%


def row_of(ratio):
    """The table row of a compression ratio in (0, 1), as kvpress's LUKVPress computes it.

    max(0, min(98, int(round(ratio * 100)) - 1)), with Python's round as kvpress 0.5.5 uses it
    (halves to even: 0.125 -> 12.5 -> 12 -> row 11). numpy scalars and 0-d arrays are read as the
    Python float of their value (np.float32(0.8) -> row 79)."""
    value = _as_number(ratio, "a compression ratio as a finite real number in (0, 1)")
    if not 0 < value < 1:
        raise ValueError(f"expected a compression ratio in (0, 1) (0.8 = evict 80%), got {ratio!r}")
    return max(0, min(len(RATIOS) - 1, int(round(value * 100)) - 1))


# ---- one head's loss curve and its convex relaxation


def _check_scores(order_scores, utility):
    if not np.isfinite(utility).all() or (utility < 0).any() or np.isnan(order_scores).any():
        raise ValueError("expected finite utility >= 0 (an importance) and non-NaN scores "
                         "(+inf marks protected tokens)")


def loss_curve(order_scores, utility, n_protected=0):
    """Cumulative oracle loss of one head when its tokens are evicted in the heuristic's order.

    order_scores, utility: (T,). Tokens go lowest score first, ties to the lower token index, so
    the curve is deterministic. Returns curve (T - n_protected + 1,) float64 with curve[0] = 0 and
    curve[e] = utility lost after the first e evictions; T = 0 gives the one point [0.0].
    Protected tokens (sink + recent window) are the caller's job: either slice them out first, or
    give them score +inf and pass their count as n_protected, which stops the curve before them."""
    order_scores, utility = np.asarray(order_scores, float), np.asarray(utility, float)
    if order_scores.ndim != 1 or order_scores.shape != utility.shape:
        raise ValueError(f"expected order_scores and utility of the same shape (T,), "
                         f"got {order_scores.shape} and {utility.shape}")
    _check_scores(order_scores, utility)
    n_protected = _as_number(n_protected, "n_protected as an integer", integer=True)
    if not 0 <= n_protected <= len(utility):
        raise ValueError(f"expected 0 <= n_protected <= T = {len(utility)}, got {n_protected}")
    order = np.argsort(order_scores, kind="stable")  # (T,) a stable sort is the (score, index) order
    evictable = order[: len(order) - n_protected]  # (T - n_protected,)
    return np.concatenate([[0.0], np.cumsum(utility[evictable])])  # (T - n_protected + 1,)


def lower_convex_hull(curve):
    """Lower convex hull of the points (i, curve[i]), evaluated at every integer i.

    Returns hull (n+1,) and slopes (n,): slopes[i] is the slope of the hull segment that contains
    the step i -> i+1, the same (y_end - y_start) / (x_end - x_start) on every step of a segment.
    The monotone chain's pop test compares the very slopes it stores, so the stored slopes
    strictly increase from segment to segment, whatever the float rounding: equal slopes mean
    the same segment (the greedy's tie rule relies on it)."""
    curve = np.asarray(curve, float)
    n = len(curve) - 1

    def slope(a, b):
        return (curve[b] - curve[a]) / (b - a)

    corners, slope_into = [0], [-np.inf]  # the chain, and the slope of the segment that ends at each corner
    for x in range(1, n + 1):
        while len(corners) >= 2 and slope_into[-1] >= slope(corners[-1], x):
            corners.pop()  # it lies on or above the chord from the corner before it to x
            slope_into.pop()
        slope_into.append(slope(corners[-1], x))
        corners.append(x)

    hull, slopes = curve.copy(), np.empty(n)  # (n+1,), (n,)
    for x0, x1, s in zip(corners[:-1], corners[1:], slope_into[1:]):
        slopes[x0:x1] = s
        hull[x0:x1] = curve[x0] + s * np.arange(x1 - x0)  # corners keep their exact value
    return hull, slopes


def pava_slopes(increments):
    """Non-decreasing least-squares fit to increments (n,) with unit weights (pool adjacent violators).

    Why this is the hull again: a convex minorant of the curve is exactly a curve whose steps
    never decrease. Pooling a violating run of steps replaces them by their mean, i.e. by the
    chord over that run, and PAVA keeps pooling until no run dips below a chord. So
    curve[0] + cumsum(pava_slopes(diff(curve))) is the greatest convex minorant, the lower
    convex hull (the isotonic regression of the slopes is the derivative of the greatest convex
    minorant of their cumulative sum)."""
    blocks = []  # [sum, count] of each pooled run, left to right
    for value in np.asarray(increments, float):
        blocks.append([value, 1])
        while len(blocks) >= 2 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(c, s / c) for s, c in blocks]) if blocks else np.empty(0)


# ---- the global greedy over all heads


def _check_curves(curves, floors):
    """Validate curves and floors; return floors as an int array and each head's floor-reachable curve."""
    floors = np.asarray(floors)
    if floors.shape != (len(curves),):
        raise ValueError(f"expected one floor per head, shape ({len(curves)},), got {floors.shape}")
    if not np.issubdtype(floors.dtype, np.integer):
        raise ValueError(f"expected integer floors (tokens each head keeps), got dtype {floors.dtype}")
    for h, (curve, floor) in enumerate(zip(curves, floors)):
        curve = np.asarray(curve, float)
        if curve.ndim != 1 or len(curve) == 0:
            raise ValueError(f"curve of head {h}: expected shape (n_h + 1,), got {curve.shape}")
        if not np.isfinite(curve).all():
            raise ValueError(f"curve of head {h} contains NaN or inf; expected finite losses")
        if floor < 0:
            raise ValueError(f"floors must be non-negative, got floors[{h}] = {floor}")
        if floor > len(curve) - 1:
            raise ValueError(f"floors[{h}] = {floor} exceeds head {h}'s {len(curve) - 1} "
                             "evictable tokens; lower the floor")
    # the floor caps evictions at n_h - floor; the hull is taken over that reachable part so that a
    # head stopped by its floor always stops on a hull corner. curves (N, n+1) in one array with
    # one floor stay one array, (N, n+1-floor), which the fast hull takes as it is.
    if isinstance(curves, np.ndarray) and curves.ndim == 2 and len(floors) and (floors == floors[0]).all():
        return floors.astype(np.int64), np.asarray(curves, float)[:, : curves.shape[1] - floors[0]]
    return floors.astype(np.int64), [np.asarray(c, float)[: len(c) - f] for c, f in zip(curves, floors)]


def _check_total(total_evict, reachable):
    total_evict = _as_number(total_evict, "an integer total_evict (a token count)", integer=True)
    limit = sum(len(c) - 1 for c in reachable)
    if not 0 <= total_evict <= limit:
        raise ValueError(f"expected 0 <= total_evict <= {limit} (the tokens the floors allow to "
                         f"evict, sum of n_h - floor_h), got {total_evict}")
    return total_evict


def _check_method(method):
    if method not in ("fast", "heap"):
        raise ValueError(f"expected method 'fast' (sorted hull segments) or 'heap' (the readable min-heap), "
                         f"got {method!r}")


def _greedy_order(reachable):
    """The readable greedy: the head of every eviction in order, (sum of n_h - floor_h,), by a min-heap."""
    slopes = [lower_convex_hull(c)[1] for c in reachable]
    n_evict = np.zeros(len(reachable), dtype=np.int64)  # (N,) evictions made so far

    def key(h):
        e = n_evict[h]
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
        n_evict[h] += 1
        order.append(h)
        if n_evict[h] < len(slopes[h]):
            heapq.heappush(heap, key(h))
    return np.array(order, dtype=np.int64)


def greedy_evictions(curves, floors, total_evict, method="fast"):
    """Tokens evicted per head, n_evict (N,), when total_evict evictions go one at a time to the lowest hull slope.

    curves: N loss curves (a list, or one (N, n+1) array); floors (N,) integers: evictable tokens
    each head keeps; total_evict an integer. method "heap" is the readable min-heap over
    lower_convex_hull's slopes of the curves as given. "fast" (the default) is the fast twin
    below: it first rounds each floor-reachable curve c[: len(c) - floor] once onto its exact_grid.
    So method="fast" on curves equals method="heap" on those rounded curves bit for bit, and on
    curves already on their grid (integers, dyadic rationals) the two agree as they stand."""
    _check_method(method)
    floors, reachable = _check_curves(curves, floors)
    total_evict = _check_total(total_evict, reachable)
    if method == "heap":
        return np.bincount(_greedy_order(reachable)[:total_evict], minlength=len(curves))  # (N,)
    return _n_evict_after(_greedy_segments(reachable), [total_evict], len(curves))[0]  # (N,)


def greedy_budget_table(curves, floors, n_ratios=99, n_protected_total=0, method="fast"):
    """The paper's one-pass sweep: n_evict (n_ratios, N), row r-1 = per-head evictions at ratio r/(n_ratios+1).

    curves are the heads' curves over their evictable tokens only. The ratio counts over all
    tokens, n_tokens = sum(n_h) + n_protected_total (pass the protected sink + window count to
    match the paper), and row r-1 evicts round_half_up(r / (n_ratios+1) * n_tokens) tokens in all,
    what keep_count gives. Once every token above the floors is gone, the remaining rows repeat
    that last state. method as in greedy_evictions: "fast" rounds each floor-reachable curve once
    onto its exact_grid and equals "heap" on those rounded curves bit for bit."""
    _check_method(method)
    floors, reachable = _check_curves(curves, floors)
    n_ratios = _as_number(n_ratios, "an integer n_ratios >= 1", integer=True)
    n_protected_total = _as_number(n_protected_total, "an integer n_protected_total >= 0", integer=True)
    if n_ratios < 1 or n_protected_total < 0:
        raise ValueError(f"expected n_ratios >= 1 and n_protected_total >= 0, got {n_ratios} and {n_protected_total}")
    n_tokens = sum(len(c) - 1 for c in curves) + n_protected_total
    limit = sum(len(c) - 1 for c in reachable)  # what the floors allow
    denominator = n_ratios + 1
    # integer round-half-up of r / denominator * n_tokens, no float ties to worry about
    totals = [min((2 * r * n_tokens + denominator) // (2 * denominator), limit) for r in range(1, n_ratios + 1)]
    if method == "fast":
        return _n_evict_after(_greedy_segments(reachable), totals, len(curves))  # (R, N)
    order = _greedy_order(reachable)
    table = np.zeros((n_ratios, len(curves)), dtype=np.int64)  # (R, N)
    n_evict, done = np.zeros(len(curves), dtype=np.int64), 0
    for r, total in enumerate(totals):
        n_evict += np.bincount(order[done:total], minlength=len(curves))
        table[r], done = n_evict, total
    return table


# ---- the exact reference and the losses


def dp_exact(curves, floors, total_evict):
    """Exact minimum of sum_h curve_h[e_h] with sum e_h = total_evict, e_h <= n_h - floor_h.

    Knapsack over heads on the true (non-convex) curves, O(N * total * n). Small instances only:
    it is the reader's reference for the greedy. Returns (min_loss, n_evict (N,)); among equal
    optima the last head evicts as few tokens as it can, then the one before it, and so on."""
    floors, reachable = _check_curves(curves, floors)
    total_evict = _check_total(total_evict, reachable)
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
    n_evict, remaining = np.zeros(len(curves), dtype=np.int64), total_evict
    for h in reversed(range(len(curves))):
        n_evict[h] = choices[h][remaining]
        remaining -= n_evict[h]
    return float(best[total_evict]), n_evict


def true_loss(curves, n_evict):
    """Sum over heads of curve_h[n_evict_h]: the utility actually lost."""
    return float(sum(np.asarray(c, float)[e] for c, e in zip(curves, n_evict)))


def relaxed_loss(curves, n_evict, floors=None):
    """Sum over heads of hull_h[n_evict_h], with the hull of the floor-reachable part (as the greedy uses)."""
    floors = np.zeros(len(curves), dtype=np.int64) if floors is None else floors
    _, reachable = _check_curves(curves, floors)
    return float(sum(lower_convex_hull(c)[0][e] for c, e in zip(reachable, n_evict)))


# ---- integer budgets from a ratio row


def largest_remainder(shares, total, minimum=None, maximum=None):
    """Round non-negative shares (N,) summing to total into integers (N,) summing exactly to total.

    Every head gets floor(share), then the leftover units go to the largest fractional parts,
    ties to the lower index; so |rounded - share| < 1, and no integer vector with this total is
    closer in L1. Bounds come after: the integers are clipped to [minimum, maximum] and the sum is
    repaired one unit at a time, taking from (giving to) the head furthest above (below) its share
    that still may move, ties to the lower index. A head pinned by a bound may then sit a unit or
    more from its share; that is the price of the bound."""
    shares = np.asarray(shares, float)
    if shares.ndim != 1 or not np.isfinite(shares).all() or (shares < 0).any():
        raise ValueError(f"expected finite non-negative shares of shape (N,), got {shares}")
    minimum = np.zeros(len(shares), np.int64) if minimum is None else np.asarray(minimum, np.int64)
    maximum = np.full(len(shares), total, np.int64) if maximum is None else np.asarray(maximum, np.int64)
    if int(total) != total or not minimum.sum() <= total <= maximum.sum() or (minimum > maximum).any():
        raise ValueError(f"expected an integer total with sum(minimum) = {minimum.sum()} <= total "
                         f"<= sum(maximum) = {maximum.sum()} and minimum <= maximum, got {total}")
    if abs(shares.sum() - total) > 1e-6 * max(1.0, total):
        raise ValueError(f"shares sum to {shares.sum()}, expected total = {total}")

    rounded = np.floor(shares).astype(np.int64)  # (N,)
    leftover = int(total - rounded.sum())  # in [0, N] when shares sum to total
    by_remainder = np.lexsort((np.arange(len(shares)), -(shares - rounded)))  # (N,) largest first
    rounded[by_remainder[: max(leftover, 0)]] += 1
    rounded = np.clip(rounded, minimum, maximum)
    while rounded.sum() != total:
        if rounded.sum() < total:
            excess = np.where(rounded < maximum, shares - rounded, -np.inf)
        else:
            excess = np.where(rounded > minimum, rounded - shares, -np.inf)
        rounded[np.argmax(excess)] += 1 if rounded.sum() < total else -1  # argmax: first of ties
    return rounded


# ---- the fast twin
#
# The same curves and tables for all heads at once, in numpy's vector loops: loss_curves sorts
# all heads together, hull_segments finds every hull by passes that delete all wrong turns at
# once (the monotone chain, all heads in lockstep, finishes), and _greedy_segments replaces the
# heap by one stable sort of whole hull segments. It is the default (method="fast") because the
# heap pops every token in Python: on 1,024 heads x 32,768 tokens the fast table took about 1 s
# of CPU where the heap took about 250 s, in one run (results/SOLVER.md, python -m bench.solver).
# The passes and the chain delete points in different orders, so they end on the same corners
# only if every comparison of slopes is decided exactly: each floor-reachable curve is rounded
# once onto exact_grid, where a stored slope is the true slope rounded once. Hence
# method="fast" on curves == method="heap" on exact_grid(curves), bit for bit, ties included.

def exact_grid(curves):
    """Equal-length curves (N, m), each rounded onto a grid where the subtraction of any two of its values is exact.

    A curve is rounded to a multiple of a power of two: the float spacing at its largest |value|
    (twice that when the curve changes sign). Then every difference of two of its values is a
    float, and every hull slope (y_b - y_a) / (b - a) is the true slope, rounded once. Rounding is
    monotone, so a steeper true slope never gets a smaller stored slope, and then the lower hull
    is the same whichever order its points are visited in (hull_segments relies on it). A value
    moves by at most one unit in the last place of the largest |value|; integers and dyadic
    rationals of a few bits are on their grid already."""
    curves = np.asarray(curves, float)
    low, high = curves.min(axis=1), curves.max(axis=1)  # (N,) each
    # every |difference| within a curve is below 2**exponent
    exponent = np.frexp(np.maximum(-low, high))[1] + ((low < 0) & (high > 0))  # (N,)
    step = np.ldexp(1.0, np.maximum(exponent - 53, -1074))[:, None]  # (N, 1) a power of two
    on_grid = np.divide(curves, step)  # (N, m) exact, and below 2**53 in magnitude
    np.rint(on_grid, out=on_grid)
    on_grid *= step
    return on_grid


def _prune_wrong_turns(curves, chain_below):
    """Round equal-length curves (N, m) onto exact_grid and delete the points that turn the wrong way, all rows at once.

    Returns point (P,) (flat positions row * m + token of the survivors), their grid values y
    (P,), and whether the last pass still deleted some (then the chain must finish the job).
    Every pass deletes each point whose slope from its left neighbour is >= its slope to its
    right one; it stops when a pass deletes none (the survivors are the hull) or fewer than
    chain_below of them (the chain is quicker then). The first and last point of a row always
    stay, so an inner point's neighbours are in its own row."""
    N, m = curves.shape
    y = exact_grid(curves)  # (N, m)
    # the first pass runs on whole rows, where every step is one token wide: its slopes are the
    # increments themselves (a division by 1, bit for bit)
    increments = y[:, 1:] - y[:, :-1]  # (N, m-1)
    keep = np.ones((N, m), dtype=bool)
    np.less(increments[:, :-1], increments[:, 1:], out=keep[:, 1:-1])  # (N, m-2) right turns
    point = np.flatnonzero(keep)  # (P,)
    n_deleted, y = keep.size - len(point), y.ravel()[point]
    row_starts = np.arange(N) * m  # (N,) flat position of each row's first point
    while n_deleted > 0 and n_deleted >= chain_below * len(point):
        slope = (y[1:] - y[:-1]) / (point[1:] - point[:-1])  # (P-1,) from each point to the next
        keep = np.ones(len(point), dtype=bool)
        np.less(slope[:-1], slope[1:], out=keep[1:-1])
        keep[np.searchsorted(point, row_starts)] = True  # the ends of every row stay
        keep[np.searchsorted(point, row_starts + m - 1)] = True
        survivors = np.flatnonzero(keep)
        n_deleted = len(point) - len(survivors)
        y, point = y[survivors], point[survivors]
    return point, y, n_deleted > 0


def _chain(row, point, y, n_rows):
    """lower_convex_hull's monotone chain over the points (P,) of n_rows rows, all rows in lockstep.

    Each round every unfinished row either pops its top or pushes its next point. Returns the
    indices (V,) of the points left on the stacks, the corners."""
    first = np.searchsorted(row, np.arange(n_rows))  # (n_rows,) first point of each row
    last = np.searchsorted(row, np.arange(n_rows), side="right") - 1  # (n_rows,) and its last
    stack = np.empty(len(point), dtype=np.int64)  # row r's stack: stack[first[r] : first[r] + size[r]]
    stack_slope = np.empty(len(point))  # slope of the segment that ends at each stack entry
    stack[first], size, nxt = first, np.ones(n_rows, dtype=np.int64), first + 1
    active = np.flatnonzero(nxt <= last)  # (A,) rows with points left
    while len(active):
        top = first[active] + size[active] - 1  # (A,) stack slot of each top
        new = nxt[active]  # (A,) each row's next point
        new_slope = (y[new] - y[stack[top]]) / (point[new] - point[stack[top]])  # (A,)
        pop = (size[active] >= 2) & (stack_slope[top] >= new_slope)  # lower_convex_hull's test
        size[active[pop]] -= 1
        push, slot = active[~pop], top[~pop] + 1
        stack[slot], stack_slope[slot] = new[~pop], new_slope[~pop]
        size[push] += 1
        nxt[push] += 1
        active = active[nxt[active] <= last[active]]
    return stack[np.arange(len(point)) - first[row] < size[row]]  # (V,)


def _hull_corners(curves, chain_below):
    """Hull corners of equal-length curves (N, m) on their exact grid: row, token, grid value (V,) each, row by row."""
    N, m = curves.shape
    rows = max(1, 2**19 // m)  # rows per chunk: about half a million points, which stay in cache
    parts = [_prune_wrong_turns(curves[r : r + rows], chain_below) for r in range(0, N, rows)]
    point = np.concatenate([part[0] + r * m for part, r in zip(parts, range(0, N, rows))])  # (P,)
    y = np.concatenate([part[1] for part in parts])  # (P,)
    row = point // m  # (P,)
    if any(part[2] for part in parts):  # points may be left to delete: the chain finishes
        corner = _chain(row, point, y, N)  # (V,)
        row, point, y = row[corner], point[corner], y[corner]
    return row, point - row * m, y


def hull_segments(curves, chain_below=1 / 8):
    """The lower convex hulls of N curves at once, on their exact grid, as segments.

    Returns head, start, end (int64) and slope (float64), each (S,): segment i is head[i]'s hull
    from token start[i] to end[i]; heads in order, each head's segments left to right. The
    corners and the bits of every slope are those of lower_convex_hull(exact_grid(curve)).
    Why two algorithms agree bit for bit: on the exact grid a stored slope is the true slope
    rounded once, and rounding never reverses an order. Then a point that fails the turn test
    slope(p, j) >= slope(j, q) for any points p < j < q is never a corner, and once the
    survivors' slopes strictly increase none is left to delete: every order of deletions ends
    at the same corners (results/SOLVER.md has the proof). The monotone chain is one order;
    _hull_corners takes another that numpy runs fast: passes that delete every wrong turn at
    once, then, when a pass deletes fewer than chain_below of the points, the chain over the
    rest (any chain_below gives the same corners; only the time changes)."""
    lengths = np.array([len(c) for c in curves], dtype=np.int64)  # (N,) n_h + 1 points each
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]  # (no heads: no segments)
    for m in np.unique(lengths):  # equal-length heads together (a profile has one length)
        heads = np.flatnonzero(lengths == m)
        if len(heads) == len(curves) and isinstance(curves, np.ndarray):
            block = curves  # (N, m) already one array
        else:
            block = np.stack([np.asarray(curves[h], float) for h in heads])  # (N_m, m)
        row, x, y = _hull_corners(block, chain_below)
        parts.append((heads[row], x, y))
    head, x, y = (np.concatenate(p) for p in zip(*parts))  # (V,) each
    by_head = np.argsort(head, kind="stable")  # heads in order, each one's corners left to right
    head, x, y = head[by_head], x[by_head], y[by_head]
    a = np.flatnonzero(head[1:] == head[:-1])  # (S,) consecutive corners of one head bound a segment
    slope = (y[a + 1] - y[a]) / (x[a + 1] - x[a])  # (S,) lower_convex_hull's formula
    return head[a], x[a], x[a + 1], slope


def _greedy_segments(reachable):
    """The fast greedy: whole hull segments in the heap's eviction order, as head, start, end (S,) each.

    Why a sort gives the heap's order: a head's slopes rise from segment to segment, and once a
    head enters a segment it finishes it first (the mid-segment rule). So the heap merges the
    heads' segment lists by (slope, head), which is a stable sort of all segments by slope when
    they are laid out head by head. np.repeat(head, end - start) is _greedy_order's output on
    the same curves rounded onto their exact grid."""
    head, start, end, slope = hull_segments(reachable)  # (S,) each, head by head, left to right
    order = np.argsort(slope, kind="stable")  # equal slopes keep head order: the lower head first
    return head[order], start[order], end[order]


def _n_evict_after(segments, totals, n_heads):
    """Per-head evictions (R, N) once the first totals[r] evictions of the segment order are made."""
    head, start, end = segments  # (S,) each, in eviction order
    done_after = np.cumsum(end - start)  # (S,) evictions made once each segment is finished
    table = np.zeros((len(totals), n_heads), dtype=np.int64)  # (R, N)
    n_evict, finished = np.zeros(n_heads, dtype=np.int64), 0  # (N,) after the finished segments
    for r, total in enumerate(totals):  # totals never decrease: each row starts from the one before
        k = int(np.searchsorted(done_after, total, side="right"))  # segments finished within total
        np.maximum.at(n_evict, head[finished:k], end[finished:k])  # a head's later segment ends further right
        finished = k
        table[r] = n_evict
        if k < len(head):  # segment k is under way: its head is part of the way from start to end
            table[r, head[k]] = start[k] + total - (done_after[k - 1] if k > 0 else 0)
    return table


def _stable_argsort(order_scores):
    """np.argsort(order_scores, axis=1, kind="stable") of (N, n) scores, about twice as fast for float32 ones.

    A stable sort is a sort of (score, index) pairs, and for float32 scores a pair fits in one
    uint64: the score's bits made order-preserving (a negative's bits flipped, a positive's sign
    bit set) above the index. numpy sorts integers with vector instructions. The keys are 8 bytes a
    token, so give it chunks of rows that fit in cache (loss_curves does)."""
    if order_scores.dtype != np.float32 or order_scores.shape[1] >= 2**32:
        return np.argsort(order_scores, axis=1, kind="stable")
    bits = (order_scores + np.float32(0.0)).view(np.uint32)  # (N, n); + 0.0 makes -0.0 tie with 0.0
    key = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64) << np.uint64(32)
    key |= np.arange(order_scores.shape[1], dtype=np.uint64)  # (N, n) score, then index
    key.sort(axis=1)
    return (key & np.uint64(2**32 - 1)).astype(np.int64)  # (N, n)


def loss_curves(order_scores, utility):
    """loss_curve of N heads at once: curves (N, n+1) float64, row i == loss_curve(order_scores[i], utility[i]).

    order_scores, utility: (N, n) real arrays over the evictable tokens only (protected ones
    sliced out; n = 0 gives (N, 1) zeros). Rows equal loss_curve's bit for bit: the same stable
    order (float32 scores sort about twice as fast, _stable_argsort) and the same float64 sums,
    each value widened first. Rows go in chunks of about half a million tokens, which stay in cache."""
    order_scores, utility = np.asarray(order_scores), np.asarray(utility)
    if order_scores.ndim != 2 or order_scores.shape != utility.shape:
        raise ValueError(f"expected order_scores and utility of the same shape (N, n), "
                         f"got {order_scores.shape} and {utility.shape}")
    if order_scores.dtype.kind not in "iuf" or utility.dtype.kind not in "iuf":
        raise ValueError(f"expected real arrays, got dtypes {order_scores.dtype} and {utility.dtype}")
    _check_scores(order_scores, utility)
    N, n = utility.shape
    curves = np.zeros((N, n + 1))  # (N, n+1)
    rows = max(1, 2**19 // max(n, 1))  # rows per chunk: about half a million tokens, whose sort keys stay in cache
    for r in range(0, N, rows):
        order = _stable_argsort(order_scores[r : r + rows])  # (rows, n) loss_curve's order in every row
        lost = np.take_along_axis(utility[r : r + rows], order, axis=1)  # (rows, n) in eviction order
        np.cumsum(lost, axis=1, dtype=np.float64, out=curves[r : r + rows, 1:])  # widened, then summed
    return curves


# -----------------------------------------------------------------------------
# ---- the table on disk: float32 .npy (what kvpress's LUKVPress loads) and a .json sidecar beside it


def sidecar(path):
    """The .json beside a table's .npy: who the table belongs to and how it was made."""
    return path[: -len(".npy")] + ".json"


def write_atomic(target, write):
    """write(f) into target's .tmp (a binary file object), then rename: an interrupted write never
    leaves half a file behind."""
    with open(target + ".tmp", "wb") as f:  # a file object: np.save would append .npy to a name
        write(f)
    os.replace(target + ".tmp", target)


def check_table(table, where):
    """Refuse a table that is not (99, L, H) finite prune ratios in [0, 1]."""
    if table.ndim != 3 or table.shape[0] != len(RATIOS) or not np.isfinite(table).all() \
            or not ((table >= 0) & (table <= 1)).all():
        raise ValueError(f"{where}: expected finite prune ratios in [0, 1] of shape (99, n_layer, n_kv_head), got "
                         f"shape {table.shape}" + (", values outside [0, 1] or NaN" if table.ndim == 3 else ""))


def save_table(path, table, meta):
    """Write the table as float32 .npy and its metadata (a dict) as the sidecar; each file atomically."""
    if not path.endswith(".npy"):
        raise ValueError(f"a budget table is a .npy file (what kvpress's LUKVPress reads), got {path!r}")
    table = np.asarray(table, dtype=np.float32)
    check_table(table, f"the table for {path}")
    write_atomic(path, lambda f: np.save(f, table))
    write_atomic(sidecar(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def read_npy(path, what, fix):
    """np.load of a file this project wrote, naming the file and what to do when it is damaged."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:80]}); {fix}") from None


def read_sidecar(path):
    """A table's sidecar as a dict, naming the file when it is missing or damaged."""
    try:
        with open(sidecar(path), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"the table {path} has no sidecar {sidecar(path)}: a table is a .npy and its .json; "
                                f"profile again to make both") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the sidecar {sidecar(path)} is not JSON ({e}); restore it or profile again") from None
    if not isinstance(meta, dict) or "scorer" not in meta:
        raise ValueError(f"the sidecar {sidecar(path)} names no scorer; restore it or profile again")
    return meta


def load_table(path, expect, shape):
    """(table, meta) of a saved table, checked: each key of expect (a dict) must have that value in the
    sidecar, and the table must be (99, *shape) prune ratios; a refusal names the first key that differs."""
    meta = read_sidecar(path)
    table = read_npy(path, "budget table", "restore it or profile again")
    for key, want in expect.items():
        if meta.get(key) != want:
            raise ValueError(f"table {path} was made with {key} {meta.get(key)!r}, not {want!r}")
    if table.shape != (len(RATIOS), *shape):
        raise ValueError(f"table {path} has shape {table.shape}, expected (99, {', '.join(map(str, shape))})")
    check_table(table, f"table {path}")
    return table, meta
