"""Known answers for the scorers (SnapKV, KeyDiff, K-norm, StreamingLLM, Expected Attention) and the
baseline allocators (uniform, PyramidKV, AdaKV), each worked by hand in its docstring.

    python -m pytest -q tests/test_scorers.py
"""
import math

import numpy as np
import pytest
import torch

import baselines
import lukv
import solver
from lukv import LUKVConfig, allocate
from model import GPTConfig, KVCache, Probe, apply_rope
from test_lukv import tiny_model

NO_PROTECTION = dict(sink=0, window=0, min_share=0.0)


def diff(a, b):
    d = (a - b).abs()
    return f"got {a.tolist()}, expected {b.tolist()}: max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


def one_head_cache(keys, values=None):
    """A 1-layer cache holding keys (H, T, D) (and values) for batch row 0."""
    H, T, D = keys.shape
    cache = KVCache(1, H, D)
    cache.prefill(0, keys[None], (keys if values is None else values)[None])
    return cache


# -----------------------------------------------------------------------------
# scorers


def snap_probe():
    """1 layer, 1 KV head, 2 query heads, an observation window of w = 2 (tokens 5, 6) over T = 7 tokens."""
    attn = torch.zeros(1, 1, 2, 2, 7)  # (B, H, G, w, T)
    attn[0, 0, 0, 0, 1] = 0.6  # query head 0, first window row -> token 1
    attn[0, 0, 0, 1, 4] = 0.3  # query head 0, second row -> token 4, the last one before the window
    attn[0, 0, 0, 1, 5] = 0.9  # ... and to the window's own first token
    attn[0, 0, 1, 0, 3] = 0.3  # query head 1 -> token 3
    return Probe(prefill_attn={0: attn})


def test_snapkv_known_answer_avg_pooling():
    """SnapKV sums the window's attention, average-pools the context before the window on its own, then
    takes the GQA group mean.

    summed over the window rows: head 0 = [0, .6, 0, 0, .3 | .9, 0], head 1 = [0, 0, 0, .3, 0 | 0, 0]
    (| = where the window starts). Width-3 average with zero padding, each side of | apart:
    head 0 -> [.2, .2, .2, .1, .1 | .3, .3], head 1 -> [0, 0, .1, .1, .1 | 0, 0]; the mean ->
    [.1, .1, .15, .1, .1, .15, .15]. Token 4 would get (0 + .3 + .9) / 3 = .4 for head 0 if the
    window's attention to itself leaked across |: SnapKV's code pools the context alone."""
    got = lukv.snapkv_scores(snap_probe(), LUKVConfig(snap_kernel=3, snap_pool="avg"))
    want = torch.tensor([[[0.1, 0.1, 0.15, 0.1, 0.1, 0.15, 0.15]]])
    assert torch.allclose(got, want, atol=1e-7), diff(got, want)


def test_snapkv_known_answer_max_pooling():
    """With max pooling each query head is pooled before the group mean (the order matters for max).

    width-3 max: head 0 -> [.6, .6, .6, .3, .3 | .9, .9], head 1 -> [0, 0, .3, .3, .3 | 0, 0]; the mean
    -> [.3, .3, .45, .3, .3, .45, .45]. (Mean first, then max, would give token 2 only .3.)"""
    got = lukv.snapkv_scores(snap_probe(), LUKVConfig(snap_kernel=3, snap_pool="max"))
    want = torch.tensor([[[0.3, 0.3, 0.45, 0.3, 0.3, 0.45, 0.45]]])
    assert torch.allclose(got, want, atol=1e-7), diff(got, want)


def test_snapkv_options_are_checked():
    """A pooling other than avg/max or an even kernel is refused when the config is made."""
    with pytest.raises(ValueError, match="snap_pool"):
        LUKVConfig(snap_pool="mean")
    with pytest.raises(ValueError, match="odd"):
        LUKVConfig(snap_kernel=4)


def test_keydiff_knorm_streaming_known_answer():
    """KeyDiff keeps the odd key out, K-norm the small keys, StreamingLLM the newest tokens.

    keydiff: keys (1, 0), (1, 0), (0, 1); their mean direction is (2, 1) / sqrt(5), so the cosines are
             2, 2, 1 over sqrt(5) and the scores their negatives: the third key ranks highest.
    knorm: the same keys have norm 1 each; keys (3, 4), (1, 0), (0, 2) score -5, -1, -2.
    streaming: 5 tokens score their position 0..4; sink 1 and window 1 make tokens 0 and 4 +inf."""
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # (H, T, D)
    got = lukv.keydiff_scores(one_head_cache(keys))
    want = -torch.tensor([[[2.0, 2.0, 1.0]]]) / 5 ** 0.5
    assert torch.allclose(got, want, atol=1e-6), diff(got, want)
    got = lukv.knorm_scores(one_head_cache(torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])))
    want = torch.tensor([[[-5.0, -1.0, -2.0]]])
    assert torch.allclose(got, want), diff(got, want)
    got = lukv.protect(lukv.streaming_scores(1, 1, 5), LUKVConfig(sink=1, window=1))
    assert got.tolist() == [[[math.inf, 1.0, 2.0, 3.0, math.inf]]]


def test_average_rope_known_answer():
    """The mean RoPE rotation of the future positions, here a quarter turn per position.

    head dim 2 and linear scaling by 2 / pi make the one frequency pi / 2. After T = 2 tokens the
    next 2 positions turn by pi and 3 pi / 2: cos = -1, 0 and sin = 0, -1, means -1/2 and -1/2.
    The rotation x -> cos x + sin (-x2, x1) then takes (1, 0) to (-1/2, -1/2)."""
    cfg = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=2, mlp_hidden=8,
                    rope_scaling={"rope_type": "linear", "factor": 2 / math.pi})
    cos, sin = lukv.average_rope(cfg, 2, 2)
    assert torch.allclose(cos, torch.tensor([-0.5, -0.5]), atol=1e-6) and \
        torch.allclose(sin, torch.tensor([-0.5, -0.5]), atol=1e-6), (cos, sin)
    got = apply_rope(torch.tensor([1.0, 0.0]), cos, sin)
    assert torch.allclose(got, torch.tensor([-0.5, -0.5]), atol=1e-6), got


def test_expected_attention_known_answer():
    """Expected Attention on 1 KV head, 1 query head, head dim 2, 2 tokens, no sinks, epsilon 0.02.

    The queries' mean (2, 0) and covariance 2 I are rotated by the mean rotation of the next 2
    positions, R = [[-1/2, 1/2], [-1/2, -1/2]] (previous test): R mu = (-1, -1), R (2 I) R^T = 2 R R^T
    = I. Keys (0, 0) and (-sqrt 2, 0): logits 0 and (-1)(-sqrt 2) / sqrt 2 + 2 / (2 * 2) = 1.5, so
    the expected attention is 1 / (1 + e^1.5) = .182 and e^1.5 / (1 + e^1.5) = .818. Value norms 5
    and 1: scores (.182 + .02) * 5 = 1.012 and (.818 + .02) * 1 = .838 (the big value wins)."""
    keys = torch.tensor([[[0.0, 0.0], [-(2 ** 0.5), 0.0]]])  # (H, T, D)
    values = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    cache = one_head_cache(keys, values)
    model_cfg = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=2, mlp_hidden=8,
                          rope_scaling={"rope_type": "linear", "factor": 2 / math.pi})
    probe = Probe(query_stats=0, query_mean={0: torch.tensor([[[2.0, 0.0]]])},  # (B, H*G, D)
                  query_cov={0: 2 * torch.eye(2)[None, None]}, values={0: values[None]})  # (B, H*G, D, D)
    got = lukv.expected_attention_scores(model_cfg, cache, probe, LUKVConfig(sink=0, window=0, ea_epsilon=0.02, ea_future=2))
    p = 1 / (1 + math.exp(1.5))
    want = torch.tensor([[[(p + 0.02) * 5, (1 - p + 0.02) * 1]]])
    assert torch.allclose(got, want, atol=1e-6), diff(got, want)


def test_probe_records_the_pre_rope_query_statistics():
    """Probe(query_stats=n) holds, per layer, the mean and covariance (over positions n..) of the queries
    q_proj(x) before RoPE, x the attention's input: compared with torch.cov on the recorded inputs."""
    model, inputs = tiny_model(), {}
    hooks = [block.self_attn.register_forward_pre_hook(lambda m, args, l=l: inputs.__setitem__(l, args[0]))
             for l, block in enumerate(model.layers)]
    probe = Probe(query_stats=3)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 20)), probe=probe)
    for hook in hooks:
        hook.remove()
    for l, x in inputs.items():
        q = model.layers[l].self_attn.q_proj(x[0, 3:]).view(17, 4, 8).transpose(0, 1).detach()  # (H*G, T - 3, D)
        mean, cov = q.mean(dim=1), torch.stack([torch.cov(qh.T, correction=0) for qh in q])
        assert torch.allclose(probe.query_mean[l][0], mean, atol=1e-6), diff(probe.query_mean[l][0], mean)
        assert torch.allclose(probe.query_cov[l][0], cov, atol=1e-6), diff(probe.query_cov[l][0], cov)


def test_scorers_rank_every_token_and_protect_sink_and_window():
    """Each scorer returns finite (L, H, T) scores, with +inf exactly on sink and window tokens."""
    cfg = LUKVConfig(sink=2, window=3, snap_window=4)
    model = tiny_model()
    cache, probe = lukv.prefill(model, list(range(30)), cfg)
    _, imp = lukv.oracle_importance(model, cache, probe, [1, 2], 2)
    for name in lukv.SCORERS:
        s = lukv.scores_for(name, model, cache, probe, imp, cfg)
        assert s.shape == (2, 2, 30)
        assert torch.isinf(s[..., :2]).all() and torch.isinf(s[..., -3:]).all()
        assert torch.isfinite(s[..., 2:-3]).all(), name
    with pytest.raises(ValueError, match="query_stats=2"):  # statistics past another sink count than cfg's
        lukv.scores_for("expected_attention", model, cache, probe, imp, LUKVConfig(sink=3, window=3))


# -----------------------------------------------------------------------------
# budgets in integers and the baseline allocators


def test_keep_count_is_integer_arithmetic():
    """keep_count(n, r) = n - round_half_up(r n) with r read in millionths: exact where floats slip.

    400 tokens at 0.8 keep 80 (float: int(400 * (1 - 0.8)) = int(79.99999999999999) = 79, kvpress's
    count); 400 at 0.9 keep 40 (float: 39); 5 at 0.5 evict round_half_up(2.5) = 3 and keep 2, as the
    greedy table's row 50 does for 5 tokens."""
    assert int(400 * (1 - 0.8)) == 79 and int(400 * (1 - 0.9)) == 39  # the slip itself
    assert solver.keep_count(400, 0.8) == 80 and solver.keep_count(400, 0.9) == 40
    assert solver.keep_count(5, 0.5) == 2 and solver.keep_count(7, 0.0) == 7
    assert allocate("uniform", 0.8, torch.zeros(1, 1, 400), LUKVConfig(**NO_PROTECTION)).tolist() == [[80]]
    table = solver.greedy_budget_table([np.arange(6.0)], np.zeros(1, dtype=np.int64))  # one head of 5 tokens
    assert 5 - table[49, 0] == solver.keep_count(5, 0.5)


def test_pyramid_layer_budgets_known_answer():
    """PyramidKV's integer formula, with the cap at T - window and the uniform rule for short contexts.

    3 layers, capacity 30 per head with a window of 4: base = 26 before the window.
    beta 5, T = 100: min = 26 // 5 = 5, max = 52 - 5 = 47 (below T - 4 = 96), steps = (47 - 5) // 2 = 21
                     -> [47, 26, 5].
    beta 20, T = 54: min = 1, max = 51 >= 54 - 4 = 50 -> capped at 50, min = 52 - 50 = 2, steps = 24
                     -> [50, 26, 2].
    T = 50 < 2 * 26: the context is short, every layer keeps base -> [26, 26, 26]."""
    assert baselines.pyramid_layer_budgets(3, 100, 30, 4, beta=5).tolist() == [47, 26, 5]
    assert baselines.pyramid_layer_budgets(3, 54, 30, 4, beta=20).tolist() == [50, 26, 2]
    assert baselines.pyramid_layer_budgets(3, 50, 30, 4, beta=20).tolist() == [26, 26, 26]


def test_pyramid_allocator_puts_the_window_on_top():
    """The pyramid allocator keeps each layer's budget plus its window, exactly when the total allows it.

    3 layers x 2 heads, T = 100, ratio 0.7, window 4, beta 5: a head keeps 30 on average, the budgets
    before the window are [47, 26, 5] (previous test), plus the window [51, 30, 9]; 2 * (51 + 30 + 9)
    = 180 = keep_count(600, 0.7), so no rescaling is needed."""
    cfg = LUKVConfig(sink=0, window=4, min_share=0.0, pyramid_beta=5)
    counts = allocate("pyramid", 0.7, torch.zeros(3, 2, 100), cfg)
    assert counts.tolist() == [[51, 51], [30, 30], [9, 9]]


def adakv_scores():
    """1 layer, 2 heads, T = 20, window 2: head 0 has 12 high scores before the window, head 1 has 4."""
    head0 = torch.cat([100 + torch.arange(12.0), -torch.arange(1.0, 7.0), torch.zeros(2)])
    head1 = torch.cat([50 + torch.arange(4.0), -10 - torch.arange(14.0), torch.zeros(2)])
    return lukv.protect(torch.stack([head0, head1])[None], LUKVConfig(sink=0, window=2))  # (L, H, T)


def test_adakv_original_blend_known_answer():
    """AdaKV's original blend: head h keeps c_h (1 - alpha) + alpha B before the window, the window on top.

    ratio 0.5: a head keeps 10 on average, B = 10 - 2 = 8 before its window; the layer's top 2 B = 16
    scores before the windows are head 0's 12 and head 1's 4 (c = 12, 4). alpha = 0.25:
    12 * 0.75 + 2 = 11 and 4 * 0.75 + 2 = 5, plus the windows -> [13, 7]. The original's
    round(c (1 - alpha) + int(alpha B)) gives the same here (alpha B = 2 is an integer)."""
    cfg = LUKVConfig(sink=0, window=2, min_share=0.0, adakv_alpha=0.25)
    assert baselines.adakv_counts(adakv_scores(), 0.5, cfg).tolist() == [[13, 7]]


def test_adakv_kvpress_variant_known_answer():
    """kvpress's AdaKV: every head first keeps its top alpha * (uniform share), then the pooled top scores.

    Same scores: each head's floor is max(window 2, int(0.25 * 10) = 2) = 2 tokens, its window; the
    other 20 - 4 = 16 go to the pooled top scores: 12 of head 0, 4 of head 1 -> [14, 6] (the original
    blend gives [13, 7]: it shrinks the pooled counts by 1 - alpha before adding the floor)."""
    cfg = LUKVConfig(sink=0, window=2, min_share=0.0, adakv_alpha=0.25, adakv_blend="kvpress")
    assert baselines.adakv_counts(adakv_scores(), 0.5, cfg).tolist() == [[14, 6]]
    with pytest.raises(ValueError, match="adakv_blend"):
        LUKVConfig(adakv_blend="mixed")


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_adakv_counts_move_with_alpha_as_the_blend_says(alpha):
    """AdaKV's original counts are the rounding of c_h (1 - alpha) + alpha B + window in every layer (c_h
    the head's share of the layer's pooled top H B scores): alpha = 0 follows the scores alone, alpha = 1
    is the uniform split, and each count lies within one token of its blend."""
    g = torch.Generator().manual_seed(1)
    L, H, T, window = 3, 4, 200, 4
    cfg = LUKVConfig(sink=0, window=window, min_share=0.0, adakv_alpha=alpha)
    scores = lukv.protect(torch.rand(L, H, T, generator=g) ** torch.arange(1.0, H + 1).view(1, H, 1) * 8, cfg)
    counts = baselines.adakv_counts(scores, 0.8, cfg)
    total = solver.keep_count(L * H * T, 0.8)
    for l, keep in enumerate(solver.largest_remainder(np.full(L, total / L), total)):
        B = (int(keep) - H * window) / H  # each head's uniform budget before its window
        top = torch.topk(scores[l, :, :T - window].reshape(-1), int(keep) - H * window).indices
        pooled = np.bincount((top // (T - window)).numpy(), minlength=H)  # c_h
        blend = pooled * (1 - alpha) + alpha * B + window
        assert np.abs(counts[l] - blend).max() < 1, (alpha, counts[l], blend)
    if alpha == 1.0:
        assert counts.max() - counts.min() <= 1
