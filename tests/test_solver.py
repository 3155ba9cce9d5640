"""Tests of the LU-KV solver in solver.py: ratios, loss curves, hulls, the greedy (heap and fast), tables, DP, rounding.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_solver.py

Every greedy property runs on both implementations, the readable min-heap and the fast sort of
hull segments, and the two are compared with each other on inputs built to collide: the fast one
on any curves equals the heap on the same curves rounded onto their exact grid, bit for bit.
The behaviours a one-line slip would break silently (PAVA's pooling, the protected tokens of a
table, largest-remainder's order, keep_count's halves) are each guarded by two independent tests.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import composite

import solver
from solver import (RATIOS, dp_exact, exact_grid, greedy_budget_table, greedy_evictions, hull_segments, keep_count,
                    largest_remainder, loss_curve, loss_curves, lower_convex_hull, pava_slopes, relaxed_loss, row_of,
                    true_loss)

METHODS = ["heap", "fast"]

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
# utilities: exact zeros, a coarse grid (many ties), or normal-range floats (power-of-two scaling
# stays exact on them, no subnormals)
utility_value = st.one_of(st.just(0.0), st.sampled_from([1.0, 2.0, 3.0]), st.floats(1e-3, 100))
ON_GRID_KINDS = ["integers", "copy", "scaled", "empty", "zeros"]  # curves exact_grid leaves as they are


@composite
def single_curve(draw):
    """Any finite curve of 1..9 points (the hull does not need curve[0] = 0 or monotonicity)."""
    return np.array(draw(st.lists(finite, min_size=1, max_size=9)))


@composite
def instances(draw, convex=False):
    """(curves, floors, total_evict): 1..6 heads, 0..8 tokens each, a floor and a reachable total."""
    curves, floors = [], []
    for _ in range(draw(st.integers(1, 6))):
        increments = draw(st.lists(utility_value, min_size=0, max_size=8))
        if convex:
            increments = sorted(increments)  # non-decreasing steps = convex curve
        curves.append(np.concatenate([[0.0], np.cumsum(increments)]))
        floors.append(draw(st.integers(0, len(increments))))
    floors = np.array(floors, dtype=np.int64)
    limit = sum(len(c) - 1 - f for c, f in zip(curves, floors))
    return curves, floors, draw(st.integers(0, limit))


@composite
def colliding_curves(draw, max_tokens=8, kinds=("integers", "floats", "near_collinear", "copy", "scaled", "empty",
                                                 "zeros")):
    """(curves, floors): 1..6 heads built to tie: integer utilities, near-collinear steps, copies and
    power-of-two multiples of earlier heads, empty and all-zero heads, floors at 0, at the end or between."""
    curves = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(kinds))
        n = draw(st.integers(0, max_tokens))
        if kind in ("copy", "scaled") and curves:
            curve = curves[draw(st.integers(0, len(curves) - 1))].copy()
            curve *= 2.0 ** draw(st.integers(-3, 3)) if kind == "scaled" else 1.0
        elif kind == "empty":
            curve = np.zeros(1)
        elif kind == "zeros":
            curve = np.zeros(n + 1)
        elif kind == "near_collinear":  # equal steps, some nudged by a unit in the last place
            nudges = np.array(draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n)), dtype=float)
            curve = np.concatenate([[0.0], np.cumsum(0.1 * (1 + nudges * 2.0**-52))])
        elif kind == "floats":
            curve = np.concatenate([[0.0], np.cumsum(draw(st.lists(utility_value, min_size=n, max_size=n)))])
        else:
            curve = np.concatenate([[0.0], np.cumsum(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))])
        curves.append(np.asarray(curve, float))
    floors = [draw(st.sampled_from([0, len(c) - 1, draw(st.integers(0, len(c) - 1))])) for c in curves]
    return curves, np.array(floors, dtype=np.int64)


@composite
def long_curves(draw):
    """(curves, floors): 1..6 heads of up to 120 tokens, each a noisy-sorted random walk, a convex curve
    with a final drop (the deletion passes then crawl, so the chain finishes), or integer steps."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    curves = []
    for _ in range(draw(st.integers(1, 6))):
        n, kind = draw(st.integers(0, 120)), draw(st.sampled_from(["noisy", "drop", "integers"]))
        if kind == "noisy":
            utility = rng.lognormal(0, 2, n)
            increments = utility[np.argsort(np.log(utility + 1e-300) + rng.normal(0, 1, n), kind="stable")]
        elif kind == "drop":
            increments = np.sort(rng.random(n))
            increments[-1:] = -100.0
        else:
            increments = rng.integers(0, 3, n).astype(float)
        curves.append(np.concatenate([[0.0], np.cumsum(increments)]))
    floors = [draw(st.integers(0, len(c) - 1)) for c in curves]
    return curves, np.array(floors, dtype=np.int64)


@composite
def score_batches(draw):
    """(order_scores, utility): (N, n) with N 1..4, n 0..40; float32 or float64 scores with ties, -0.0 and +inf."""
    N, n = draw(st.integers(1, 4)), draw(st.integers(0, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scores = rng.integers(-2, 3, (N, n)) * rng.choice([-1.0, 1.0], (N, n))  # many ties, zeros of both signs
    scores[rng.random((N, n)) < 0.1] = np.inf  # +inf: tokens that go last
    scores = scores.astype(draw(st.sampled_from([np.float32, np.float64])))
    utility = (rng.random((N, n)) ** 4).astype(draw(st.sampled_from([np.float32, np.float64])))
    return scores, utility


def tolerance(curves):
    return 1e-9 * (1.0 + sum(np.abs(c).max() for c in curves))


def describe(a, b):
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float))
    return f"got {a}, expected {b}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


def expand(segments, lengths):
    """Per-token slopes of every head from hull_segments' output, like lower_convex_hull's slopes."""
    head, start, end, slope = segments
    slopes = [np.full(n - 1, np.nan) for n in lengths]
    for h, a, b, s in zip(head, start, end, slope):
        slopes[h][a:b] = s
    return slopes


def on_grid(curves, floors):
    """Each head's floor-reachable part rounded once onto its exact grid, the rest as it was: what method="fast" sees."""
    return [np.concatenate([exact_grid(c[None, : len(c) - f])[0], c[len(c) - f:]]) for c, f in zip(curves, floors)]


def round_half_up(x):
    """floor(x + 1/2) of an exact Fraction: halves go up."""
    return math.floor(x + Fraction(1, 2))


# ---- compression ratios


@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.integers(0, 10**7), st.sampled_from([1, 2, 5, 10, 50, 150, 400])),
       ratio=st.one_of(st.sampled_from([0.0, 0.5, 0.25, 0.125, 0.05, 0.01, 0.8, 0.9]),
                       st.integers(0, 10**6 - 1).map(lambda m: m / 10**6)))
@example(n=10, ratio=0.25)  # evict 2.5 -> 3, keep 7
@example(n=5, ratio=0.5)  # evict 2.5 -> 3, keep 2
@example(n=400, ratio=0.8)  # float arithmetic keeps 79
def test_keep_count_is_round_half_up_in_exact_fractions(n, ratio):
    """keep_count(n, r) = n - floor(r n + 1/2) with r its millionths as an exact fraction: halves round up."""
    exact = Fraction(round(ratio * 10**6), 10**6)
    assert keep_count(n, ratio) == n - round_half_up(exact * n)
    assert keep_count(np.int64(n), np.float64(ratio)) == keep_count(n, ratio)  # numpy scalars read the same


@pytest.mark.parametrize("ratio", [0.001, 0.005, 0.0051, 0.125, 0.8, 0.995, 0.999, np.float32(0.8), np.array(0.8)])
def test_row_of_is_kvpress_formula(ratio):
    """row_of(r) is kvpress's max(0, min(98, int(round(r * 100)) - 1)), np.float32(0.8) included (row 79)."""
    assert row_of(ratio) == max(0, min(98, int(round(float(ratio) * 100)) - 1))
    if float(ratio) in (0.8, float(np.float32(0.8))):
        assert row_of(ratio) == 79


def test_row_of_inverts_ratios():
    """Every table ratio r% comes back to its own row r-1."""
    assert [row_of(r) for r in RATIOS] == list(range(len(RATIOS)))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=20, deadline=None)
@given(instance=instances(), n_protected=st.integers(0, 60))
@example(instance=([np.arange(21.0), np.arange(21.0)], np.array([0, 0]), 0), n_protected=10)  # 50 tokens: odd rows are halves
@example(instance=([np.arange(6.0)], np.array([0]), 0), n_protected=0)  # 5 tokens at 50%: evict 3
def test_budget_table_rows_evict_what_keep_count_gives_over_all_tokens(method, instance, n_protected):
    """Row r-1 evicts n_all - keep_count(n_all, r%) tokens in all, n_all counting the protected ones, capped by the floors."""
    curves, floors, _ = instance
    table = greedy_budget_table(curves, floors, n_protected_total=n_protected, method=method)
    n_all = sum(len(c) - 1 for c in curves) + n_protected
    limit = sum(len(c) - 1 - f for c, f in zip(curves, floors))
    expected = [min(n_all - keep_count(n_all, ratio), limit) for ratio in RATIOS]
    assert table.sum(axis=1).tolist() == expected, f"n_all {n_all}, limit {limit}"


# ---- loss curves


def test_loss_curve_tie_order_and_protected():
    """Ties in score evict the lower token index first; n_protected stops the curve before +inf-scored tokens."""
    curve = loss_curve([0.5, 0.5, 0.1, np.inf], [1.0, 10.0, 100.0, 1000.0], n_protected=1)
    assert curve.tolist() == [0.0, 100.0, 101.0, 111.0]
    scores = (np.arange(64) * 7 % 3).astype(float)  # three tie groups, long enough to upset an unstable sort
    expected_order = [i for level in range(3) for i in range(64) if scores[i] == level]
    assert loss_curve(scores, np.arange(64.0)).tolist() == [0.0] + np.cumsum(expected_order).tolist()


@settings(max_examples=30, deadline=None)
@given(score_batches())
def test_loss_curves_rows_are_loss_curve(batch):
    """loss_curves' row i is loss_curve(order_scores[i], utility[i]) bit for bit, float32 or float64, ties and -0.0 included."""
    scores, utility = batch
    curves = loss_curves(scores, utility)
    assert curves.shape == (scores.shape[0], scores.shape[1] + 1) and curves.dtype == np.float64
    for i in range(len(scores)):
        assert curves[i].tobytes() == loss_curve(scores[i], utility[i]).tobytes(), f"row {i}: {scores[i]}"


def test_empty_contexts_give_one_point_curves():
    """No evictable tokens: loss_curve gives [0.0], loss_curves (N, 1) zeros, and the table evicts nothing."""
    assert loss_curve([], []).tolist() == [0.0]
    curves = loss_curves(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.float32))
    assert curves.tolist() == [[0.0]] * 3
    for method in METHODS:
        assert (greedy_budget_table(curves, np.zeros(3, np.int64), n_protected_total=12, method=method) == 0).all()


# ---- hull and PAVA


@settings(max_examples=60, deadline=None)
@given(st.one_of(single_curve(), colliding_curves().map(lambda case: case[0][0])))
def test_hull_below_curve_touches_vertices_and_is_convex(curve):
    """The hull lies on or below the curve, equals it at both ends and at every breakpoint, and its slopes never decrease."""
    hull, slopes = lower_convex_hull(curve)
    scale = 1e-9 * (1.0 + np.abs(curve).max())
    assert hull.shape == curve.shape and slopes.shape == (len(curve) - 1,)
    assert (hull <= curve + scale).all(), describe(hull, curve)
    assert hull[0] == curve[0] and hull[-1] == curve[-1]
    breakpoints = [i for i in range(1, len(slopes)) if slopes[i] != slopes[i - 1]]
    assert all(hull[i] == curve[i] for i in breakpoints), describe(hull, curve)
    assert (np.diff(slopes) >= 0).all(), f"slopes decrease: {slopes}"
    np.testing.assert_allclose(np.diff(hull), slopes, rtol=0, atol=scale * 10)


@settings(max_examples=60, deadline=None)
@given(single_curve())
def test_hull_equals_cumsum_of_pava(curve):
    """curve[0] + cumsum(PAVA(increments)) is the lower convex hull (greatest convex minorant)."""
    hull, _ = lower_convex_hull(curve)
    via_pava = curve[0] + np.concatenate([[0.0], np.cumsum(pava_slopes(np.diff(curve)))])
    scale = 1e-9 * (1.0 + np.abs(curve).max())
    assert np.abs(via_pava - hull).max() <= scale, describe(via_pava, hull)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=0, max_size=9))
@example([3.0, 1.0, 2.0])  # 3 and 1 pool to 2, 2: [2, 2, 2]
def test_pava_is_non_decreasing_keeps_the_sum_and_fixes_sorted_input(increments):
    """PAVA's output never decreases, has its input's length and sum, and a non-decreasing input comes back unchanged."""
    fitted = pava_slopes(increments)
    assert fitted.shape == (len(increments),)
    assert (np.diff(fitted) >= -1e-12 * (1 + np.abs(fitted).max(initial=0))).all(), f"{increments} -> {fitted}"
    assert abs(fitted.sum() - sum(increments)) <= 1e-9 * (1 + np.abs(increments).sum()), describe(fitted, increments)
    assert pava_slopes(sorted(increments)).tolist() == sorted(increments)


@settings(max_examples=40, deadline=None)
@given(st.one_of(single_curve(), colliding_curves().map(lambda case: case[0][0])))
def test_exact_grid_makes_every_difference_exact(curve):
    """On the grid every difference is exact, no value moves over one ulp of the largest, and a second rounding is a no-op."""
    y = exact_grid(curve[None])[0]
    for a in range(len(y)):
        for b in range(len(y)):
            assert Fraction(y[b] - y[a]) == Fraction(y[b]) - Fraction(y[a]), f"{y[b]} - {y[a]} is not exact"
    assert np.abs(y - curve).max() <= np.spacing(np.abs(curve).max()), describe(y, curve)
    assert exact_grid(y[None])[0].tobytes() == y.tobytes()


# ---- the fast hull and the fast greedy against the readable ones


@settings(max_examples=50, deadline=None)
@given(st.one_of(colliding_curves(), long_curves()), st.sampled_from([0.0, 1 / 8, 2.0]))
def test_fast_hull_has_the_readable_hulls_slopes_bit_for_bit(case, chain_below):
    """hull_segments gives every head lower_convex_hull's slopes of its exact grid, bit for bit, wherever the chain takes over."""
    curves, _ = case
    fast = expand(hull_segments(curves, chain_below=chain_below), [len(c) for c in curves])
    for h, curve in enumerate(curves):
        readable = lower_convex_hull(exact_grid(curve[None])[0])[1]
        assert fast[h].tobytes() == readable.tobytes(), f"head {h} of {curves}: {describe(fast[h], readable)}"


@settings(max_examples=40, deadline=None)
@given(st.one_of(colliding_curves(), long_curves()), st.integers(0, 10))
def test_fast_greedy_equals_heap_on_the_grid_rounded_curves(case, n_protected):
    """method="fast" on curves makes, in order, the heap's evictions on the curves rounded onto their exact grid."""
    curves, floors = case
    snapped = on_grid(curves, floors)
    _, reachable = solver._check_curves(curves, floors)
    _, snapped_reachable = solver._check_curves(snapped, floors)
    head, start, end = solver._greedy_segments(reachable)
    assert np.repeat(head, end - start).tolist() == solver._greedy_order(snapped_reachable).tolist()
    heap = greedy_budget_table(snapped, floors, n_protected_total=n_protected, method="heap")
    fast = greedy_budget_table(curves, floors, n_protected_total=n_protected, method="fast")
    assert (heap == fast).all(), f"case {curves}, floors {floors}: rows differ at {np.flatnonzero((heap != fast).any(1))}"
    limit = sum(len(c) - 1 for c in reachable)
    for total in sorted({0, limit // 3, limit // 2, limit}):
        assert (greedy_evictions(snapped, floors, total, method="heap") ==
                greedy_evictions(curves, floors, total, method="fast")).all()


def test_rounding_onto_the_grid_is_what_makes_the_twins_agree():
    """A curve where the chain on raw floats and the passes on the grid disagree; rounded once, the heap agrees.

    head 0 is a line of slope about 4.0919913636916, a few ulps off straight. The readable chain on
    its raw values stores three slopes (..611, ..614, ..616): one corner more than the fast hull
    on the grid (..612 over tokens 0-2, ..616 over 2-4). Head 1's one step has slope ..614, so at
    total 3 the raw heap sends head 0 (tie at ..614, lower index, then mid-segment) where the fast
    greedy sends head 1 (..614 < ..616). The heap on exact_grid(head 0) makes the fast choice."""
    head0 = np.array([0.0, 4.091991363691611, 8.183982727383226, 12.27597409107484, 16.367965454766455])
    head1 = np.array([0.0, 4.091991363691614])
    assert len(np.unique(lower_convex_hull(head0)[1])) == 3 and len(hull_segments([head0])[0]) == 2
    floors = [0, 0]
    raw = [greedy_evictions([head0, head1], floors, 3, method=m).tolist() for m in METHODS]
    assert raw == [[3, 0], [2, 1]]
    assert greedy_evictions(on_grid([head0, head1], floors), floors, 3, method="heap").tolist() == [2, 1]


@settings(max_examples=40, deadline=None)
@given(colliding_curves(kinds=ON_GRID_KINDS), st.integers(0, 10))
def test_fast_and_heap_agree_as_given_on_curves_already_on_their_grid(case, n_protected):
    """On integer and dyadic curves (their own exact grid) both methods give identical tables with no rounding at all."""
    curves, floors = case
    assert all(g.tobytes() == c.tobytes() for g, c in zip(on_grid(curves, floors), curves))
    heap = greedy_budget_table(curves, floors, n_protected_total=n_protected, method="heap")
    fast = greedy_budget_table(curves, floors, n_protected_total=n_protected, method="fast")
    assert (heap == fast).all(), f"case {curves}, floors {floors}: rows differ at {np.flatnonzero((heap != fast).any(1))}"


@settings(max_examples=15, deadline=None)
@given(colliding_curves())
def test_greedy_takes_one_array_like_a_list(case):
    """Equal-length curves as one (N, n+1) array (what loss_curves returns) give the same table as the list of rows."""
    curves, floors = case
    length = len(curves[0])
    same = np.stack([np.resize(c, length) for c in curves])  # (N, n+1) equal lengths
    floors = np.minimum(floors, length - 1)
    for f in (floors, np.full(len(same), floors[0])):  # mixed floors, and the one-floor fast path
        for method in METHODS:
            assert (greedy_budget_table(same, f, method=method) == greedy_budget_table(list(same), f, method=method)).all()


# ---- greedy against the exact DP


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=30, deadline=None)
@given(instance=instances(convex=True))
def test_greedy_is_optimal_on_convex_curves(method, instance):
    """On convex curves the greedy's total loss equals the exact DP optimum."""
    curves, floors, total = instance
    n_evict = greedy_evictions(curves, floors, total, method=method)
    optimum, _ = dp_exact(curves, floors, total)
    assert abs(true_loss(curves, n_evict) - optimum) <= tolerance(curves), \
        f"case {curves}, floors {floors}, total {total}: greedy {n_evict}"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=30, deadline=None)
@given(instance=instances())
def test_greedy_relaxed_lower_bound_and_gap_bound(method, instance):
    """On any curves: relaxed loss of greedy <= DP optimum <= true loss of greedy <= optimum + one head's max hull gap."""
    curves, floors, total = instance
    n_evict = greedy_evictions(curves, floors, total, method=method)
    optimum, _ = dp_exact(curves, floors, total)
    tol = tolerance(curves)
    assert n_evict.sum() == total and (n_evict <= [len(c) - 1 - f for c, f in zip(curves, floors)]).all()
    assert relaxed_loss(curves, n_evict, floors) <= optimum + tol
    # the gap of the hull of the full curve bounds the gap of the floor-truncated one
    max_gap = max(np.max(c - lower_convex_hull(c)[0]) for c in curves)
    assert optimum - tol <= true_loss(curves, n_evict) <= optimum + max_gap + tol, \
        f"case {curves}, floors {floors}, total {total}: greedy {n_evict}, optimum {optimum}"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(instance=instances())
def test_greedy_relaxed_loss_is_the_relaxed_optimum(method, instance):
    """The greedy's relaxed loss equals the DP optimum on the (floor-truncated) hull curves."""
    curves, floors, total = instance
    hulls = [lower_convex_hull(c[: len(c) - f])[0] for c, f in zip(curves, floors)]
    relaxed_optimum, _ = dp_exact(hulls, np.zeros(len(hulls), dtype=np.int64), total)
    n_evict = greedy_evictions(curves, floors, total, method=method)
    assert abs(relaxed_loss(curves, n_evict, floors) - relaxed_optimum) <= tolerance(curves)


# ---- budget table


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=20, deadline=None)
@given(instance=instances(), n_protected=st.integers(0, 10))
def test_budget_table_totals_floors_and_nesting(method, instance, n_protected):
    """Each row evicts the requested count, keeps every floor, and rows are nested (a higher ratio never evicts less)."""
    curves, floors, _ = instance
    table = greedy_budget_table(curves, floors, n_protected_total=n_protected, method=method)
    lengths = np.array([len(c) - 1 for c in curves])
    n_tokens, limit = lengths.sum() + n_protected, (lengths - floors).sum()
    requested = [min(int(Fraction(r * n_tokens, 100) + Fraction(1, 2)), limit) for r in range(1, 100)]
    assert table.shape == (99, len(curves))
    assert table.sum(axis=1).tolist() == requested
    assert (lengths - table >= floors).all() and (table >= 0).all()
    assert (np.diff(table, axis=0) >= 0).all(), "rows are not nested"
    for r in (1, 50, 99):  # the sweep agrees with one-shot greedy at the same total
        assert (table[r - 1] == greedy_evictions(curves, floors, requested[r - 1], method=method)).all()


# ---- invariances and determinism


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(instance=instances(), exponent=st.integers(-3, 10))
def test_greedy_invariant_to_scaling_utilities(method, instance, exponent):
    """Scaling every utility by a positive constant (a power of two, so floats scale exactly) leaves the allocation unchanged."""
    curves, floors, total = instance
    scaled = [c * 2.0 ** exponent for c in curves]
    assert (greedy_evictions(scaled, floors, total, method=method) ==
            greedy_evictions(curves, floors, total, method=method)).all()
    assert (greedy_budget_table(scaled, floors, method=method) == greedy_budget_table(curves, floors, method=method)).all()


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(instance=instances())
def test_greedy_is_deterministic_under_ties(method, instance):
    """Repeated calls give identical results, and identical heads are served lowest index first."""
    curves, floors, total = instance
    first = greedy_budget_table(curves, floors, method=method)
    assert all((greedy_budget_table(curves, floors, method=method) == first).all() for _ in range(3))
    if len(curves[0]) - 1 > floors[0]:
        twins = greedy_evictions([curves[0], curves[0].copy()], [floors[0], floors[0]], 1, method=method)
        assert twins.tolist() == [1, 0]


@pytest.mark.parametrize("method", METHODS)
def test_equal_slopes_go_whole_segment_by_segment_lower_head_first(method):
    """On equal slopes whole segments go one after another, the lower head's first, each finished before the next starts.

    head 0: curve [0, 1, 3, 5]: slopes [1, 2, 2]; heads 1 and 2: [0, 2, 4]: slopes [2, 2]. After
    head 0's slope-1 step all three stand at slope 2 on a vertex: head 0 (lowest index) goes and,
    now inside its segment, finishes it; then head 1's whole segment; then head 2's."""
    curves = [np.array([0.0, 1, 3, 5]), np.array([0.0, 2, 4]), np.array([0.0, 2, 4])]
    steps = [greedy_evictions(curves, [0, 0, 0], n, method=method).tolist() for n in range(8)]
    assert steps == [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [3, 1, 0], [3, 2, 0], [3, 2, 1], [3, 2, 2]]


def test_dp_exact_tie_rule():
    """Among equal optima the DP lets the last head evict as few tokens as it can."""
    linear = np.array([0.0, 1.0, 2.0])
    optimum, n_evict = dp_exact([linear, linear], [0, 0], 2)
    assert optimum == 2.0 and n_evict.tolist() == [2, 0]


# ---- the hand-worked example


@pytest.mark.parametrize("method", METHODS)
def test_hand_worked_two_heads_three_tokens(method):
    """Two heads, three tokens each; the greedy order is derived below.

    head 0: scores [0.2, 0.1, 0.3], utility [2, 1, 3] -> evicts tokens 1, 0, 2 -> curve [0, 1, 3, 6].
            convex already: hull = curve, slopes [1, 2, 3].
    head 1: scores [0.1, 0.2, 0.3], utility [4, 0, 2] -> curve [0, 4, 4, 6]. (1, 4) sits above the
            chord from (0, 0) to (3, 6), which passes through (2, 4): one segment, hull [0, 2, 4, 6],
            slopes [2, 2, 2].
    greedy (heap key = slope, then mid-segment first, then head index; the fast greedy sorts the
    segments h0 [0,1) 1, h0 [1,2) 2, h0 [2,3) 3, h1 [0,3) 2 by slope, ties by head):
      1. h0 slope 1                                   -> n_evict [1, 0]
      2. h0 slope 2 vs h1 slope 2, both at a vertex   -> lower index, h0: [2, 0]
      3. h0 slope 3 vs h1 slope 2                     -> h1: [2, 1], now mid-segment
      4-5. h1 slope 2 (mid-segment) vs h0 slope 3     -> h1, h1: [2, 2], [2, 3]
      6. h0 slope 3                                   -> [3, 3]
    table with n_ratios=4 (ratios 20/40/60/80 % of N=6 -> round 1.2, 2.4, 3.6, 4.8 = 1, 2, 4, 5):
      rows [1, 0], [2, 0], [2, 2], [2, 3].
    at total 3 the greedy's [2, 1] loses 3 + 4 = 7, the DP optimum is [1, 2] with 1 + 4 = 5;
    the excess 2 is exactly head 1's gap curve[1] - hull[1] = 4 - 2, and the relaxed loss 3 + 2 = 5
    meets the optimum.
    with floors [0, 2] head 1 may evict one token: reachable curve [0, 4], slope 4, so all three
    of head 0 (slopes 1, 2, 3) go first."""
    curves = [loss_curve([0.2, 0.1, 0.3], [2, 1, 3]), loss_curve([0.1, 0.2, 0.3], [4, 0, 2])]
    assert curves[0].tolist() == [0, 1, 3, 6] and curves[1].tolist() == [0, 4, 4, 6]
    hull, slopes = lower_convex_hull(curves[1])
    assert hull.tolist() == [0, 2, 4, 6] and slopes.tolist() == [2, 2, 2]
    assert [s.tolist() for s in hull_segments(curves)] == [[0, 0, 0, 1], [0, 1, 2, 0], [1, 2, 3, 3], [1, 2, 3, 2]]
    floors = np.array([0, 0])
    steps = [greedy_evictions(curves, floors, n, method=method).tolist() for n in range(7)]
    assert steps == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3], [3, 3]]
    assert greedy_budget_table(curves, floors, n_ratios=4, method=method).tolist() == [[1, 0], [2, 0], [2, 2], [2, 3]]
    optimum, best = dp_exact(curves, floors, 3)
    assert (optimum, best.tolist()) == (5.0, [1, 2])
    assert true_loss(curves, [2, 1]) == 7.0 and relaxed_loss(curves, [2, 1]) == 5.0
    floors = np.array([0, 2])
    assert [greedy_evictions(curves, floors, n, method=method).tolist() for n in range(5)] == \
        [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1]]


# ---- largest remainder


@composite
def share_cases(draw, max_heads=6, max_total=50):
    """(shares, total): 1..max_heads non-negative weights scaled to sum to an integer total 0..max_total."""
    weights = np.array(draw(st.lists(utility_value, min_size=1, max_size=max_heads)))
    total = draw(st.integers(0, max_total))
    if weights.sum() == 0:
        weights = np.ones_like(weights)
    return weights / weights.sum() * total, total


def integer_vectors(total, n):
    """Every vector of n non-negative integers that sums to total."""
    if n == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in integer_vectors(total - first, n - 1):
            yield (first, *rest)


@settings(max_examples=60, deadline=None)
@given(share_cases())
def test_largest_remainder_sums_and_stays_within_one(case):
    """The integers sum exactly to total and each is less than 1 away from its share."""
    shares, total = case
    rounded = largest_remainder(shares, total)
    assert rounded.sum() == total
    assert (np.abs(rounded - shares) < 1).all(), describe(rounded, shares)


@settings(max_examples=40, deadline=None)
@given(share_cases(max_heads=4, max_total=8))
@example((np.array([0.1, 0.9]), 1))
def test_largest_remainder_is_the_nearest_integer_vector_in_l1(case):
    """No integer vector with the same total is nearer the shares in L1; of the nearest, ties go to the lower index."""
    shares, total = case
    rounded = tuple(largest_remainder(shares, total).tolist())

    def distance(v):
        return sum(abs(Fraction(x) - Fraction(s)) for x, s in zip(v, shares))  # exact

    candidates = list(integer_vectors(total, len(shares)))
    best = min(distance(v) for v in candidates)
    assert distance(rounded) == best, f"{rounded} for shares {shares}: {float(distance(rounded))} > {float(best)}"
    assert rounded == max(v for v in candidates if distance(v) == best)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.1, 10), min_size=2, max_size=6, unique=True), st.integers(1, 50),
       st.randoms(use_true_random=False))
def test_largest_remainder_follows_the_shares_when_they_are_permuted(weights, total, random):
    """With distinct fractional parts, permuting the shares permutes the integers the same way."""
    shares = np.array(weights) / sum(weights) * total
    assume(len(set((shares - np.floor(shares)).tolist())) == len(shares))  # equal parts: the lower index wins
    permutation = list(range(len(shares)))
    random.shuffle(permutation)
    assert (largest_remainder(shares[permutation], total) == largest_remainder(shares, total)[permutation]).all()


@settings(max_examples=40, deadline=None)
@given(share_cases(), st.data())
def test_largest_remainder_honours_bounds(case, data):
    """With minimum/maximum given, the integers still sum to total and stay inside the bounds."""
    shares, total = case
    minimum = np.array([data.draw(st.integers(0, 2)) for _ in shares])
    maximum = minimum + np.array([data.draw(st.integers(0, 30)) for _ in shares])
    if not minimum.sum() <= total <= maximum.sum():
        with pytest.raises(ValueError, match="sum\\(minimum\\)"):
            largest_remainder(shares, total, minimum, maximum)
        return
    rounded = largest_remainder(shares, total, minimum, maximum)
    assert rounded.sum() == total and (rounded >= minimum).all() and (rounded <= maximum).all()


def test_largest_remainder_ties_go_to_lower_index():
    """Equal remainders: the leftover unit goes to the lower index."""
    assert largest_remainder([0.5, 0.5, 1.0], 2).tolist() == [1, 0, 1]


# ---- bad input


def test_numpy_integers_are_integers():
    """numpy integers are accepted wherever an integer count is expected (total_evict, n_protected, n)."""
    curves, floors = [np.arange(4.0)], np.zeros(1, np.int64)
    assert greedy_evictions(curves, floors, np.int64(2)).tolist() == [2]
    assert greedy_budget_table(curves, floors, np.int32(4), n_protected_total=np.int64(1)).shape == (4, 1)
    assert loss_curve([0.1, np.inf], [1.0, 2.0], n_protected=np.int64(1)).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("call, message", [
    (lambda: greedy_evictions([np.array([0.0, np.nan])], [0], 1), "NaN or inf"),
    (lambda: greedy_evictions([np.array([0.0, np.inf])], [0], 1), "NaN or inf"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [-1], 0), "non-negative"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [2], 0), "exceeds head 0's 1 evictable"),
    (lambda: greedy_evictions([np.array([0.0, 1.0, 2.0])], [1], 2), "total_evict <= 1"),
    (lambda: greedy_evictions([np.arange(10.0)], [0], 5.5), "integer total_evict"),
    (lambda: greedy_evictions([np.arange(10.0)], [0], True), "integer total_evict"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [0, 0], 0), "one floor per head"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [0.5], 0), "integer floors"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [0], 1, method="quick"), "method 'fast'"),
    (lambda: greedy_budget_table([np.array([0.0, 1.0])], [0], n_ratios=0), "n_ratios >= 1"),
    (lambda: greedy_budget_table([np.array([0.0, 1.0])], [0], n_protected_total=1.5), "integer n_protected_total"),
    (lambda: greedy_budget_table([np.array([0.0, 1.0])], [0], method="dp"), "method 'fast'"),
    (lambda: dp_exact([np.array([0.0, 1.0])], [0], 2), "total_evict <= 1"),
    (lambda: loss_curve([0.1, 0.2], [1.0]), "same shape"),
    (lambda: loss_curve([0.1, 0.2], [1.0, np.nan]), "finite utility"),
    (lambda: loss_curve([0.1, 0.2], [1.0, np.inf]), "finite utility"),
    (lambda: loss_curve([0.1, 0.2], [1.0, -0.5]), "utility >= 0"),
    (lambda: loss_curve([np.nan, 0.2], [1.0, 1.0]), "non-NaN scores"),
    (lambda: loss_curves(np.zeros((2, 3)), -np.ones((2, 3))), "utility >= 0"),
    (lambda: loss_curves(np.zeros((2, 3), np.float32), np.full((2, 3), np.inf, np.float32)), "finite utility"),
    (lambda: loss_curves(np.zeros((2, 3)), np.ones((2, 4))), "same shape"),
    (lambda: loss_curves(np.zeros(3), np.ones(3)), "same shape"),
    (lambda: largest_remainder([1.0, np.nan], 1), "finite non-negative"),
    (lambda: largest_remainder([1.0, -0.5], 1), "finite non-negative"),
    (lambda: largest_remainder([1.0, 1.0], 3), "expected total = 3"),
    (lambda: largest_remainder([1.0, 1.0], 2, minimum=[2, 1]), "sum\\(minimum\\) = 3"),
    (lambda: keep_count(100, -0.5), "ratio"),
    (lambda: keep_count(100, 1.0), "ratio"),
    (lambda: keep_count(100, np.nan), "ratio"),
    (lambda: keep_count(100, "0.5"), "ratio"),
    (lambda: keep_count(100, True), "ratio"),
    (lambda: keep_count(-1, 0.5), "n >= 0"),
    (lambda: keep_count(2.5, 0.5), "non-negative integer"),
    (lambda: keep_count(True, 0.5), "non-negative integer"),
])
def test_bad_input_raises_clear_error(call, message):
    """Invalid input raises ValueError whose message names what was expected."""
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, np.nan, np.inf, True, np.bool_(True), "0.8", None, np.zeros(2)])
def test_row_of_refuses_what_is_not_a_ratio(ratio):
    """row_of refuses, in one line, anything but a finite real number strictly between 0 and 1."""
    with pytest.raises(ValueError, match="compression ratio") as error:
        row_of(ratio)
    assert "\n" not in str(error.value)
