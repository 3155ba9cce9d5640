"""Property tests for the LU-KV solver: hull, PAVA, greedy vs exact DP, budget table, rounding.

Run: python -m pytest -q test_solver_draft.py
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import composite

from lukv_solver_draft import (dp_exact, greedy_budget_table, greedy_evictions, largest_remainder,
                               loss_curve, lower_convex_hull, pava_slopes, relaxed_loss, true_loss)

# ---- strategies: small, bounded, structured

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
# utilities: exact zeros, a coarse grid (many ties), or normal-range floats (power-of-two scaling
# stays exact on them, no subnormals)
utility_value = st.one_of(st.just(0.0), st.sampled_from([1.0, 2.0, 3.0]), st.floats(1e-3, 100))


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


def tolerance(curves):
    return 1e-9 * (1.0 + sum(np.abs(c).max() for c in curves))


def describe(a, b):
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float))
    return f"got {a}, expected {b}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


# ---- hull and PAVA


@settings(max_examples=200, deadline=None)
@given(single_curve())
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


@settings(max_examples=200, deadline=None)
@given(single_curve())
def test_hull_equals_cumsum_of_pava(curve):
    """curve[0] + cumsum(PAVA(increments)) is the lower convex hull (greatest convex minorant)."""
    hull, _ = lower_convex_hull(curve)
    via_pava = curve[0] + np.concatenate([[0.0], np.cumsum(pava_slopes(np.diff(curve)))])
    scale = 1e-9 * (1.0 + np.abs(curve).max())
    assert np.abs(via_pava - hull).max() <= scale, describe(via_pava, hull)


# ---- greedy against the exact DP


@settings(max_examples=150, deadline=None)
@given(instances(convex=True))
def test_greedy_is_optimal_on_convex_curves(instance):
    """On convex curves the greedy's total loss equals the exact DP optimum."""
    curves, floors, total = instance
    evictions = greedy_evictions(curves, floors, total)
    optimum, _ = dp_exact(curves, floors, total)
    assert abs(true_loss(curves, evictions) - optimum) <= tolerance(curves), \
        f"case {curves}, floors {floors}, total {total}: greedy {evictions}"


@settings(max_examples=150, deadline=None)
@given(instances())
def test_greedy_relaxed_lower_bound_and_gap_bound(instance):
    """On any curves: relaxed loss of greedy <= DP optimum <= true loss of greedy <= optimum + one head's max hull gap."""
    curves, floors, total = instance
    evictions = greedy_evictions(curves, floors, total)
    optimum, _ = dp_exact(curves, floors, total)
    tol = tolerance(curves)
    assert evictions.sum() == total and (evictions <= [len(c) - 1 - f for c, f in zip(curves, floors)]).all()
    assert relaxed_loss(curves, evictions, floors) <= optimum + tol
    # the gap of the hull of the full curve bounds the gap of the floor-truncated one
    max_gap = max(np.max(c - lower_convex_hull(c)[0]) for c in curves)
    assert optimum - tol <= true_loss(curves, evictions) <= optimum + max_gap + tol, \
        f"case {curves}, floors {floors}, total {total}: greedy {evictions}, optimum {optimum}"


@settings(max_examples=100, deadline=None)
@given(instances())
def test_greedy_relaxed_loss_is_the_relaxed_optimum(instance):
    """The greedy's relaxed loss equals the DP optimum on the (floor-truncated) hull curves."""
    curves, floors, total = instance
    hulls = [lower_convex_hull(c[: len(c) - f])[0] for c, f in zip(curves, floors)]
    relaxed_optimum, _ = dp_exact(hulls, np.zeros(len(hulls), dtype=np.int64), total)
    evictions = greedy_evictions(curves, floors, total)
    assert abs(relaxed_loss(curves, evictions, floors) - relaxed_optimum) <= tolerance(curves)


# ---- budget table


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(0, 10))
def test_budget_table_totals_floors_and_nesting(instance, n_protected):
    """Each row evicts the requested count, keeps every floor, and rows are nested (a higher ratio never evicts less)."""
    curves, floors, _ = instance
    table = greedy_budget_table(curves, floors, n_protected_total=n_protected)
    lengths = np.array([len(c) - 1 for c in curves])
    n_tokens, limit = lengths.sum() + n_protected, (lengths - floors).sum()
    requested = [min(int(Fraction(r * n_tokens, 100) + Fraction(1, 2)), limit) for r in range(1, 100)]
    assert table.shape == (99, len(curves))
    assert table.sum(axis=1).tolist() == requested
    assert (lengths - table >= floors).all() and (table >= 0).all()
    assert (np.diff(table, axis=0) >= 0).all(), "rows are not nested"
    for r in (1, 50, 99):  # the sweep agrees with one-shot greedy at the same total
        assert (table[r - 1] == greedy_evictions(curves, floors, requested[r - 1])).all()


# ---- invariances and determinism


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(-3, 10))
def test_greedy_invariant_to_scaling_utilities(instance, exponent):
    """Scaling every utility by a positive constant (a power of two, so floats scale exactly) leaves the allocation unchanged."""
    curves, floors, total = instance
    scaled = [c * 2.0 ** exponent for c in curves]
    assert (greedy_evictions(scaled, floors, total) == greedy_evictions(curves, floors, total)).all()
    assert (greedy_budget_table(scaled, floors) == greedy_budget_table(curves, floors)).all()


@settings(max_examples=50, deadline=None)
@given(instances())
def test_greedy_is_deterministic_under_ties(instance):
    """Repeated calls give identical results, and identical heads are served lowest index first."""
    curves, floors, total = instance
    first = greedy_budget_table(curves, floors)
    assert all((greedy_budget_table(curves, floors) == first).all() for _ in range(3))
    twins = greedy_evictions([curves[0], curves[0].copy()], [floors[0], floors[0]], 1) \
        if len(curves[0]) - 1 > floors[0] else None
    if twins is not None:
        assert twins.tolist() == [1, 0]


def test_loss_curve_tie_order_and_protected():
    """Ties in score evict the lower token index first; n_protected stops the curve before +inf-scored tokens."""
    curve = loss_curve([0.5, 0.5, 0.1, np.inf], [1.0, 10.0, 100.0, 1000.0], n_protected=1)
    assert curve.tolist() == [0.0, 100.0, 101.0, 111.0]
    scores = (np.arange(64) * 7 % 3).astype(float)  # three tie groups, long enough to upset an unstable sort
    expected_order = [i for level in range(3) for i in range(64) if scores[i] == level]
    assert loss_curve(scores, np.arange(64.0)).tolist() == [0.0] + np.cumsum(expected_order).tolist()


def test_dp_exact_tie_rule():
    """Among equal optima the DP lets the last head evict as few tokens as it can."""
    linear = np.array([0.0, 1.0, 2.0])
    optimum, evictions = dp_exact([linear, linear], [0, 0], 2)
    assert optimum == 2.0 and evictions.tolist() == [2, 0]


# ---- the hand-worked example


def test_hand_worked_two_heads_three_tokens():
    """Two heads, three tokens each; the greedy order is derived below.

    head 0: scores [0.2, 0.1, 0.3], utility [2, 1, 3] -> evicts tokens 1, 0, 2 -> curve [0, 1, 3, 6].
            convex already: hull = curve, slopes [1, 2, 3].
    head 1: scores [0.1, 0.2, 0.3], utility [4, 0, 2] -> curve [0, 4, 4, 6]. (1, 4) sits above the
            chord from (0, 0) to (3, 6), which passes through (2, 4): one segment, hull [0, 2, 4, 6],
            slopes [2, 2, 2].
    greedy (heap key = slope, then mid-segment first, then head index):
      1. h0 slope 1                                   -> evicted [1, 0]
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
    floors = np.array([0, 0])
    steps = [greedy_evictions(curves, floors, n).tolist() for n in range(7)]
    assert steps == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3], [3, 3]]
    assert greedy_budget_table(curves, floors, n_ratios=4).tolist() == [[1, 0], [2, 0], [2, 2], [2, 3]]
    optimum, best = dp_exact(curves, floors, 3)
    assert (optimum, best.tolist()) == (5.0, [1, 2])
    assert true_loss(curves, [2, 1]) == 7.0 and relaxed_loss(curves, [2, 1]) == 5.0
    floors = np.array([0, 2])
    assert [greedy_evictions(curves, floors, n).tolist() for n in range(5)] == \
        [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1]]


# ---- largest remainder


@composite
def share_cases(draw):
    """(shares, total): 1..6 non-negative weights scaled to sum to an integer total 0..50."""
    weights = np.array(draw(st.lists(utility_value, min_size=1, max_size=6)))
    total = draw(st.integers(0, 50))
    if weights.sum() == 0:
        weights = np.ones_like(weights)
    return weights / weights.sum() * total, total


@settings(max_examples=200, deadline=None)
@given(share_cases())
def test_largest_remainder_sums_and_stays_within_one(case):
    """Counts sum exactly to total and each is less than 1 away from its share."""
    shares, total = case
    counts = largest_remainder(shares, total)
    assert counts.sum() == total
    assert (np.abs(counts - shares) < 1).all(), describe(counts, shares)


@settings(max_examples=100, deadline=None)
@given(share_cases(), st.data())
def test_largest_remainder_honours_bounds(case, data):
    """With minimum/maximum given, counts still sum to total and stay inside the bounds."""
    shares, total = case
    minimum = np.array([data.draw(st.integers(0, 2)) for _ in shares])
    maximum = minimum + np.array([data.draw(st.integers(0, 30)) for _ in shares])
    if not minimum.sum() <= total <= maximum.sum():
        with pytest.raises(ValueError, match="sum\\(minimum\\)"):
            largest_remainder(shares, total, minimum, maximum)
        return
    counts = largest_remainder(shares, total, minimum, maximum)
    assert counts.sum() == total and (counts >= minimum).all() and (counts <= maximum).all()


def test_largest_remainder_ties_go_to_lower_index():
    """Equal remainders: the leftover unit goes to the lower index."""
    assert largest_remainder([0.5, 0.5, 1.0], 2).tolist() == [1, 0, 1]


# ---- bad input


@pytest.mark.parametrize("call, message", [
    (lambda: greedy_evictions([np.array([0.0, np.nan])], [0], 1), "NaN or inf"),
    (lambda: greedy_evictions([np.array([0.0, np.inf])], [0], 1), "NaN or inf"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [-1], 0), "non-negative"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [2], 0), "exceeds head 0's 1 evictable"),
    (lambda: greedy_evictions([np.array([0.0, 1.0, 2.0])], [1], 2), "total_evict <= 1"),
    (lambda: greedy_evictions([np.array([0.0, 1.0])], [0, 0], 0), "one floor per head"),
    (lambda: greedy_budget_table([np.array([0.0, 1.0])], [0], n_ratios=0), "n_ratios >= 1"),
    (lambda: dp_exact([np.array([0.0, 1.0])], [0], 2), "total_evict <= 1"),
    (lambda: loss_curve([0.1, 0.2], [1.0]), "same shape"),
    (lambda: loss_curve([0.1, 0.2], [1.0, np.nan]), "finite utility"),
    (lambda: largest_remainder([1.0, np.nan], 1), "finite non-negative"),
    (lambda: largest_remainder([1.0, -0.5], 1), "finite non-negative"),
    (lambda: largest_remainder([1.0, 1.0], 3), "expected total = 3"),
    (lambda: largest_remainder([1.0, 1.0], 2, minimum=[2, 1]), "sum\\(minimum\\) = 3"),
])
def test_bad_input_raises_clear_error(call, message):
    """Invalid input raises ValueError whose message names what was expected."""
    with pytest.raises(ValueError, match=message):
        call()
