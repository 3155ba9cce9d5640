"""Tests of kernels.py: eviction, decode attention and append, every version against the reference.

    python -m pytest -q test_kernels.py

On the CPU the Triton kernels (v3) run under TRITON_INTERPRET=1 at small sizes; GPU-only sizes skip.
"""
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():  # Triton picks interpreter or compiler when a kernel is defined
    # it stays set for the whole run: Triton reads it again at launch; CPU-only torch tests ignore it
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "kernels" in sys.modules and not sys.modules["kernels"].INTERPRET:
        importlib.reload(sys.modules["kernels"])  # imported earlier without the interpreter
import kernels  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.strategies import composite  # noqa: E402

from kernels import (APPEND, DECODE, EVICT, append_, decode_attention, decode_v1, evict,  # noqa: E402
                     evict_into_cache, evict_v1)
from lukv import compress  # noqa: E402
from model import GPT, GPTConfig, KVCache  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
V2_OK, V2_WHY = kernels.v2_available(DEV)
TRITON_OK = kernels.HAVE_TRITON and (CUDA or kernels.INTERPRET)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max |diff| vs fp64 on O(1) outputs


def impls(table):
    """Every version in a kernels table, skipped where it cannot run here."""
    out = []
    for name in table:
        marks = []
        if name == "v2":
            marks = [pytest.mark.skipif(not V2_OK, reason=f"torch.compile unavailable: {V2_WHY}")]
        if name == "v3":
            marks = [pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")]
        out.append(pytest.param(name, marks=marks))
    return out


def skip_v2_on_cuda(impl, dtype):
    """On a GPU, v2 runs the fp32 cases only: each dtype is another torch.compile (seconds on a fresh machine)."""
    if impl == "v2" and CUDA and dtype != torch.float32:
        pytest.skip("v2 on CUDA: fp32 cases only (the other dtypes are v1's math under another compile)")


def diff(a, b):
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}" if d.numel() else "empty"


def same(a, b):
    """Bit-for-bit equal, NaN equal to NaN (spare rows of the decode fixtures hold NaN)."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=0, atol=0, equal_nan=True)


def case(B, H, T, D, dtype=torch.float32, levels=None, score_dtype=torch.float32, seed=0):
    """Random k, v (B, H, T, D); scores drawn from `levels` values (many ties) or continuous."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    scores = torch.randint(0, levels, (B, H, T), generator=g).float() if levels else torch.randn(B, H, T, generator=g)
    return k.to(DEV), v.to(DEV), scores.to(score_dtype).to(DEV)


def assert_same_packed(got, ref, what=""):
    """Identical layout and positions, bit-identical kept rows, and zeros in every spare row."""
    for name in ("start", "length", "capacity", "pos"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name).cpu()), \
            f"{what}: {name} differs\n got {getattr(got, name).tolist()}\n ref {getattr(ref, name).tolist()}"
    assert torch.equal(got.k, ref.k) and torch.equal(got.v, ref.v), f"{what}: rows differ, k {diff(got.k, ref.k)}"
    assert not got.k[ref.pos < 0].any() and not got.v[ref.pos < 0].any(), f"{what}: spare rows are not zero"


# -----------------------------------------------------------------------------
# evict (select + compact)


def test_evict_known_answer():
    """A 2-head, 6-token example, worked by hand (sink = window = 1, slack = 2).

    head 0: scores [5, 1, 3, 3, 0, 2], keep 3. Tokens 0 and 5 are protected; one more is needed and
            tokens 2 and 3 tie at 3: the lower index is evicted first, so 3 is kept -> [0, 3, 5].
    head 1: all scores 2, keep 4. Protected 0 and 5; of the tied 1..4 the two highest stay -> [0, 3, 4, 5].
    Capacities 5 and 6, so head 1 starts at row 5; spare rows hold position -1.
    """
    k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    scores = torch.tensor([[[5., 1, 3, 3, 0, 2], [2, 2, 2, 2, 2, 2]]])
    packed = evict_v1(k, v, scores, torch.tensor([[3, 4]]), sink=1, window=1, slack=2)
    assert packed.pos.tolist() == [0, 3, 5, -1, -1, 0, 3, 4, 5, -1, -1]
    assert packed.start.tolist() == [[0, 5]] and packed.capacity.tolist() == [[5, 6]]
    assert torch.equal(packed.k[5:9], k[0, 1, [0, 3, 4, 5]])


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("seed", [0, 1])
def test_evict_keeps_what_lukv_compress_keeps(impl, seed):
    """Every version keeps exactly the tokens lukv.compress keeps (stable sort, sink/window at +inf)."""
    T, H, sink, window = 77, 3, 2, 5
    k, v, scores = case(1, H, T, 16, levels=4, seed=seed)
    counts = torch.tensor([[7, 40, T]])
    cfg = GPTConfig(vocab_size=8, block_size=128, n_layer=1, n_head=H, n_kv_head=H, n_embd=16 * H, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    cache.prefill(0, k.cpu(), v.cpu())
    protected = scores.cpu().clone()
    protected[..., :sink] = float("inf")
    protected[..., max(sink, T - window):] = float("inf")
    compress(cache, protected, counts)
    packed = EVICT[impl](k, v, scores, counts, sink, window)
    for h in range(H):
        s, n = int(packed.start[0, h]), int(packed.length[0, h])
        assert packed.pos[s:s + n].tolist() == cache.kept_positions(0, 0, h).tolist(), f"head {h}"


EVICT_CASES = [  # B, H, T, D, dtype, score levels (None: continuous), score dtype, sink, window, counts
    (1, 2, 6, 16, torch.float32, 2, torch.float32, 0, 0, [[0, 6]]),  # lengths 0 and full
    (2, 3, 37, 64, torch.bfloat16, 3, torch.bfloat16, 1, 4, [[5, 1 + 4, 37], [20, 9, 11]]),
    (1, 4, 130, 128, torch.float16, None, torch.float16, 4, 0, [[4, 64, 100, 130]]),
    (3, 2, 100, 16, torch.float32, 1, torch.float32, 0, 0, [[1, 99], [0, 50], [100, 3]]),  # all tied
    (2, 2, 257, 64, torch.bfloat16, None, torch.float32, 3, 7, [[10, 200], [256, 257]]),
]


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("spec", EVICT_CASES, ids=[f"case{i}" for i in range(len(EVICT_CASES))])
def test_evict_versions_match_reference(impl, spec):
    """Same kept indices, layout and bit-identical K/V rows as v1, at irregular sizes and dtypes."""
    B, H, T, D, dtype, levels, sdtype, sink, window, counts = spec
    skip_v2_on_cuda(impl, dtype)
    k, v, scores = case(B, H, T, D, dtype, levels, sdtype)
    counts = torch.tensor(counts)
    assert_same_packed(EVICT[impl](k, v, scores, counts, sink, window, slack=3),
                       evict_v1(k, v, scores, counts, sink, window, slack=3), f"{impl} {spec}")


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("slice_len", [16, 64])
def test_evict_any_slice_length_keeps_the_same_tokens(monkeypatch, slice_len):
    """Rows cut into many slices (16, 64 tokens): exactly v1's tokens and rows, ties across slices too."""
    monkeypatch.setattr(kernels.TUNING, "select_slice", slice_len)
    for levels in (None, 3):
        k, v, scores = case(2, 2, 150, 16, levels=levels, seed=3)
        counts = torch.tensor([[9, 150], [70, 33]])
        assert_same_packed(kernels.evict_v3(k, v, scores, counts, 2, 3), evict_v1(k, v, scores, counts, 2, 3),
                           f"levels {levels}")


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits, dot", [(2, False), (4, False), (8, True)])
def test_evict_any_digit_width_keeps_the_same_tokens(monkeypatch, bits, dot):
    """2- and 4-bit radix digits, and 8-bit digits counted by a one-hot product, keep exactly v1's tokens and rows."""
    monkeypatch.setattr(kernels.TUNING, "radix_bits", bits)
    monkeypatch.setattr(kernels.TUNING, "histogram_dot", dot)
    monkeypatch.setattr(kernels.TUNING, "select_slice", 64)
    for levels in (None, 3):
        k, v, scores = case(2, 2, 150, 16, levels=levels, seed=4)
        counts = torch.tensor([[9, 150], [70, 33]])
        assert_same_packed(kernels.evict_v3(k, v, scores, counts, 2, 3), evict_v1(k, v, scores, counts, 2, 3),
                           f"bits {bits} levels {levels}")


@pytest.mark.parametrize("impl", impls(EVICT))
def test_evict_special_floats(impl):
    """-0.0 ties +0.0, every NaN ties and ranks above +inf, -inf ranks lowest, as torch.sort orders them."""
    vals = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0, -0.0, float("nan"), 0.0])
    scores = vals[torch.randperm(10, generator=torch.Generator().manual_seed(0))].repeat(1, 2, 3)  # (1, 2, 30)
    scores[0, 1, 5] = -float("nan")
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    counts = torch.tensor([[11, 17]])
    got = EVICT[impl](k.to(DEV), v.to(DEV), scores.to(DEV), counts)
    order = torch.sort(torch.where(scores.isnan(), float("nan"), scores), stable=True).indices  # (1, 2, 30)
    for h in range(2):
        want = torch.sort(order[0, h, 30 - int(counts[0, h]):]).values
        s, n = int(got.start[0, h]), int(got.length[0, h])
        assert got.pos[s:s + n].tolist() == want.tolist(), f"head {h}"


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("low_bit,n_bits", [(0, 8), (8, 8), (12, 8), (24, 4)],
                         ids=["lowest-digit", "one-digit", "two-digits", "top"])
def test_evict_scores_that_differ_in_few_bits(impl, low_bit, n_bits):
    """Scores whose fp32 patterns share all bits but a few (one or two 8-bit digits) select exactly v1's tokens."""
    g = torch.Generator().manual_seed(low_bit)
    bits = 0x3F000000 + (torch.randint(0, 2 ** n_bits, (2, 2, 300), generator=g, dtype=torch.int32) << low_bit)
    scores = bits.view(torch.float32) * torch.where(torch.rand(2, 2, 300, generator=g) < 0.3, -1.0, 1.0)
    k, v = (torch.randn(2, 2, 300, 16, generator=g).to(DEV) for _ in range(2))
    counts = torch.tensor([[3, 150], [299, 77]])
    assert_same_packed(EVICT[impl](k, v, scores.to(DEV), counts, 1, 2), evict_v1(k, v, scores.to(DEV), counts, 1, 2),
                       f"bits [{low_bit}, {low_bit + n_bits})")


@composite
def evict_inputs(draw):
    B, H, T = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 70))
    sink, window = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    floor = min(T, sink + window)
    counts = draw(st.lists(st.integers(floor, T), min_size=B * H, max_size=B * H))
    levels = draw(st.sampled_from([1, 2, 5, None]))
    seed = draw(st.integers(0, 2 ** 16))
    return B, H, T, sink, window, torch.tensor(counts).view(B, H), levels, seed


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=25, deadline=None)
@given(evict_inputs())
def test_evict_triton_matches_reference_random(inputs):
    """On random small shapes, counts, sink/window and tie-heavy scores, v3 equals v1 exactly."""
    B, H, T, sink, window, counts, levels, seed = inputs
    k, v, scores = case(B, H, T, 16, levels=levels, seed=seed)
    saved = kernels.TUNING.select_slice
    kernels.TUNING.select_slice = 16  # several slices per row (the size the slice test compiles on a GPU)
    try:
        got = kernels.evict_v3(k, v, scores, counts, sink, window, slack=2)
    finally:
        kernels.TUNING.select_slice = saved
    assert_same_packed(got, evict_v1(k, v, scores, counts, sink, window, slack=2), str(inputs))


# -----------------------------------------------------------------------------
# decode attention over the packed cache


def packed_cache(lengths, D, dtype, slack=3, seed=0):
    """Random packed K/V for per-head lengths (B, H); spare rows hold NaN, which no output may see."""
    g = torch.Generator().manual_seed(seed)
    capacity = lengths + slack
    start = torch.cumsum(capacity.flatten(), 0).view_as(capacity) - capacity
    N = int(capacity.sum())
    k, v = (torch.randn(N, D, generator=g).to(dtype) for _ in range(2))
    spare = torch.ones(N, dtype=torch.bool)
    for s, n in zip(start.flatten().tolist(), lengths.flatten().tolist()):
        spare[s:s + n] = False
    k[spare], v[spare] = float("nan"), float("nan")
    return k.to(DEV), v.to(DEV), start.to(DEV), lengths.clone().to(DEV), capacity.to(DEV)


DECODE_LENGTHS = {
    "edge": [[0, 1, 45], [45, 0, 2]],  # empty, one row, full
    "skewed": [[90, 3, 4], [2, 1, 5]],  # one long head, many short
}


@pytest.mark.parametrize("impl", impls(DECODE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,G,lengths", [(16, 1, "edge"), (64, 4, "skewed"), (128, 3, "edge")])
def test_decode_matches_fp64_reference(impl, dtype, D, G, lengths):
    """Outputs within dtype tolerance of fp64 attention; empty heads give zeros; GQA groups share K/V."""
    skip_v2_on_cuda(impl, dtype)
    lengths = torch.tensor(DECODE_LENGTHS[lengths])
    k, v, start, length, _ = packed_cache(lengths, D, dtype)
    q = torch.randn(2, 3, G, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    want = decode_v1(q.double(), k.double(), v.double(), start, length)
    got = kernels.decode_v3(q, k, v, start, length, chunk=16) if impl == "v3" else DECODE[impl](q, k, v, start, length)
    assert got.dtype == dtype and got.shape == q.shape
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype], diff(got, want)
    empty = lengths == 0
    assert torch.equal(got.cpu()[empty], torch.zeros_like(got.cpu()[empty])), "an empty head attends to nothing"


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_g1_multiply_sum_and_padded_dot_agree(monkeypatch, dtype):
    """At G = 1 the multiply-sum path and the 16-row padded tl.dot path are both within tolerance of fp64,
    and they are two code paths (their float rounding differs somewhere), not one path run twice."""
    k, v, start, length, _ = packed_cache(torch.tensor([[90, 3, 0, 45], [1, 64, 17, 2]]), 64, dtype)
    q = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    want = decode_v1(q.double(), k.double(), v.double(), start, length)
    got = {}
    for sum_g1 in (True, False):
        monkeypatch.setattr(kernels.TUNING, "decode_sum_g1", sum_g1)
        got[sum_g1] = kernels.decode_v3(q, k, v, start, length, chunk=16)
        err = (got[sum_g1].double() - want).abs().max().item()
        assert err <= TOL[dtype], f"decode_sum_g1={sum_g1}: {diff(got[sum_g1], want)}"
    if dtype == torch.float32:  # (a bf16 or fp16 output can round both paths to the same numbers)
        assert not torch.equal(got[True], got[False]), "both settings ran the same code path"


@pytest.mark.parametrize("evict_impl", impls(EVICT))
@pytest.mark.parametrize("decode_impl", impls(DECODE))
def test_nothing_kept_and_no_slack_gives_an_empty_cache(evict_impl, decode_impl):
    """Keeping 0 tokens with no spare rows gives an empty cache, and decoding over it gives zeros."""
    k, v, scores = case(2, 2, 9, 16)
    packed = EVICT[evict_impl](k, v, scores, torch.zeros(2, 2, dtype=torch.long), slack=0)
    assert packed.k.shape == (0, 16) and packed.length.sum() == 0
    q = torch.randn(2, 2, 3, 16).to(DEV)
    out = DECODE[decode_impl](q, packed.k, packed.v, packed.start, packed.length)
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 3, 16))


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("chunk", [5, 16, 64, None])
@pytest.mark.parametrize("fused", [False, True], ids=["combine-kernel", "fused-merge"])
def test_decode_split_count_does_not_change_the_answer(monkeypatch, chunk, fused):
    """Any part width of the split-KV token stream (parts inside a head, across heads) gives the same output."""
    monkeypatch.setattr(kernels.TUNING, "decode_fused_combine", fused)
    k, v, start, length, _ = packed_cache(torch.tensor([[100, 7], [64, 33]]), 64, torch.float32)
    q = torch.randn(2, 2, 2, 64).to(DEV)
    got = kernels.decode_v3(q, k, v, start, length, scale=0.3, chunk=chunk)
    want = decode_v1(q, k, v, start, length, scale=0.3)
    assert torch.allclose(got, want, atol=1e-5), diff(got, want)


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("lengths", [[[300, 0, 2, 1, 0, 9]], [[0, 0, 40, 0, 0, 0]], [[17, 17, 17, 17, 17, 17]]],
                         ids=["skewed", "one-head", "uniform"])
@pytest.mark.parametrize("fused", [False, True], ids=["combine-kernel", "fused-merge"])
def test_decode_automatic_parts_balance_any_lengths(monkeypatch, lengths, fused):
    """The automatic cut is exact for skewed, empty and uniform heads, merged by a second kernel or in place."""
    monkeypatch.setattr(kernels.TUNING, "decode_min_chunk", 1)  # many parts even at these small sizes
    monkeypatch.setattr(kernels.TUNING, "decode_block_n", 16)
    monkeypatch.setattr(kernels.TUNING, "decode_block_n_gqa", 16)
    monkeypatch.setattr(kernels.TUNING, "combine_block", 4)  # a head's parts span several merge tiles
    monkeypatch.setattr(kernels.TUNING, "decode_fused_combine", fused)
    k, v, start, length, _ = packed_cache(torch.tensor(lengths), 32, torch.float32)
    q = torch.randn(1, 6, 3, 32, generator=torch.Generator().manual_seed(2)).to(DEV)
    want = decode_v1(q, k, v, start, length)
    for call in range(2):  # the fused merge's tickets reset themselves: a second call is exact too
        got = kernels.decode_v3(q, k, v, start, length)
        assert torch.allclose(got, want, atol=1e-5), f"call {call}: {diff(got, want)}"
    if fused:
        assert int(kernels._TICKETS[q.device].abs().sum()) == 0, "tickets left behind"


@pytest.mark.parametrize("impl", impls(DECODE))
def test_decode_matches_kvcache_attend_after_eviction(impl):
    """decode_attention over a cache built by evict_into_cache equals model.KVCache.attend."""
    cfg = GPTConfig(vocab_size=8, block_size=128, n_layer=1, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=8)
    k, v, scores = case(2, 2, 50, 16, levels=3)
    cache = KVCache(cfg, 2, device=DEV, slack=4)
    evict_into_cache(cache, 0, k, v, scores, torch.tensor([[5, 50], [1, 23]]), sink=1, window=0, impl="v1")
    with pytest.raises(ValueError, match="the cache expects"):
        evict_into_cache(cache, 0, k[:, :1], v[:, :1], scores[:, :1], torch.tensor([[5], [1]]))
    q = torch.randn(2, 2, 2, 16).to(DEV)
    want, _ = cache.attend(0, q)
    got = decode_attention(q, cache.k[0], cache.v[0], cache.start[0], cache.length[0], impl=impl)
    assert torch.allclose(got, want, atol=1e-5), diff(got, want)


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_model_outputs_agree_with_triton_or_reference_eviction():
    """A tiny GPT decodes bit-identical logits after evicting with v3 or with v1 (or lukv.compress)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
    model = GPT(cfg).eval().to(DEV)
    idx = torch.randint(0, 97, (1, 40), device=DEV)
    new = torch.randint(0, 97, (1, 3), device=DEV)
    scores = torch.randint(0, 3, (2, 2, 40)).float()  # (L, H, T) with ties
    counts = torch.tensor([[6, 30], [12, 9]])
    logits = []
    with torch.no_grad():
        for impl in ("v1", "v3", "lukv"):
            cache = model.new_cache(1)
            model(idx, cache=cache)
            if impl == "lukv":
                protected = scores.clone()
                protected[..., :2] = float("inf")
                protected[..., 37:] = float("inf")
                compress(cache, protected, counts)
            for layer in range(cfg.n_layer):
                if impl != "lukv":
                    keys, values = (t[layer][cache._rows(layer, torch.arange(40, device=DEV))]
                                    for t in (cache.k, cache.v))  # (1, H, T, D)
                    evict_into_cache(cache, layer, keys, values, scores[layer][None].to(DEV), counts[layer][None],
                                     sink=2, window=3, impl=impl)
            logits.append(model(new, cache=cache))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2]), diff(logits[0], logits[1])


# -----------------------------------------------------------------------------
# append in place


@pytest.mark.parametrize("impl", impls(APPEND))
def test_append_writes_one_row_per_head_in_place(impl):
    """Append writes row start + length of each head, bumps length, and touches nothing else."""
    lengths = torch.tensor([[0, 4], [2, 1]])
    k, v, start, length, capacity = packed_cache(lengths, 16, torch.bfloat16, slack=2)
    pos = torch.full((k.shape[0],), -1, dtype=torch.long, device=DEV)
    k0, v0, ptr = k.clone(), v.clone(), k.data_ptr()
    k_new, v_new = (torch.randn(2, 2, 16).to(torch.bfloat16).to(DEV) for _ in range(2))
    APPEND[impl](k, v, pos, start, length, capacity, k_new, v_new, 9)
    rows = (start + lengths.to(DEV)).flatten()
    assert k.data_ptr() == ptr and torch.equal(length.cpu(), lengths + 1)
    assert torch.equal(k[rows], k_new.view(4, 16)) and torch.equal(v[rows], v_new.view(4, 16))
    assert pos[rows].tolist() == [9] * 4 and int((pos >= 0).sum()) == 4
    others = torch.ones(k.shape[0], dtype=torch.bool, device=DEV)
    others[rows] = False
    assert same(k[others], k0[others]) and same(v[others], v0[others])
    q = torch.randn(2, 2, 1, 16).to(torch.bfloat16).to(DEV)
    assert torch.equal(decode_attention(q, k, v, start, length, impl="v1"), decode_v1(q, k, v, start, length))


def test_layout_cache_hands_out_copies(monkeypatch):
    """Two evictions with the same counts share one cached layout, yet appending to the first leaves the second intact."""
    monkeypatch.setattr(kernels, "_LAYOUTS", {})
    k, v = (torch.randn(1, 2, 40, 16, device=DEV) for _ in range(2))
    scores, counts = torch.rand(1, 2, 40, device=DEV), torch.tensor([[5, 9]])
    first = evict_v1(k, v, scores, counts, slack=4)
    APPEND["v1"](first.k, first.v, first.pos, first.start, first.length, first.capacity,
                 torch.randn(1, 2, 16, device=DEV), torch.randn(1, 2, 16, device=DEV), 40)
    second = evict_v1(k, v, scores, counts, slack=4)
    assert len(kernels._LAYOUTS) == 1, f"{len(kernels._LAYOUTS)} cached layouts for one (counts, slack, device)"
    assert first.length.tolist() == [[6, 10]] and second.length.tolist() == [[5, 9]], (first.length, second.length)
    assert torch.equal(second.start, first.start)
    untouched = torch.ones_like(first.pos, dtype=torch.bool)
    untouched[first.start.flatten() + torch.tensor([5, 9], device=DEV)] = False  # the two appended rows
    assert torch.equal(second.pos[untouched], first.pos[untouched])


@pytest.mark.parametrize("impl", impls(APPEND))
def test_append_overflow_raises_and_unchecked_never_writes_past_capacity(impl):
    """A full head raises before any write; with check=False full heads are skipped, others appended."""
    k, v, start, length, capacity = packed_cache(torch.tensor([[2, 1]]), 16, torch.float32, slack=1)
    length[0, 0] += 1  # head 0 (rows 0..2) is full, head 1 (rows 3..4) has one spare row
    pos = torch.full((k.shape[0],), -1, dtype=torch.long, device=DEV)
    k0 = k.clone()
    kn, vn = torch.ones(1, 2, 16).to(DEV), torch.ones(1, 2, 16).to(DEV)
    with pytest.raises(ValueError, match="capacity overflow"):
        append_(k, v, pos, start, length, capacity, kn, vn, 5, impl=impl)
    assert same(k, k0) and length.tolist() == [[3, 1]]
    append_(k, v, pos, start, length, capacity, kn, vn, 5, impl=impl, check=False)
    assert length.tolist() == [[3, 2]] and same(k[:4], k0[:4]) and pos.tolist() == [-1, -1, -1, -1, 5]
    start[0, 1] = 4  # corrupt metadata: head 1's next row would be row 6 of 5
    append_(k, v, pos, start, length, capacity, kn, vn, 6, impl=impl, check=False)
    assert length.tolist() == [[3, 2]] and pos.tolist() == [-1, -1, -1, -1, 5], "nothing is written past N"


# -----------------------------------------------------------------------------
# bad input: a clear error before any launch


def _bad_evict():
    k, v, s = case(1, 2, 10, 16)
    c = torch.tensor([[3, 4]])
    return [
        ("counts above T", lambda i: EVICT[i](k, v, s, torch.tensor([[3, 11]])), "between"),
        ("negative counts", lambda i: EVICT[i](k, v, s, torch.tensor([[-1, 4]])), "between"),
        ("counts below sink + window", lambda i: EVICT[i](k, v, s, c, 2, 2), "protected"),
        ("float counts", lambda i: EVICT[i](k, v, s, c.float()), "integers"),
        ("counts shape", lambda i: EVICT[i](k, v, s, torch.tensor([3, 4])), "shape"),
        ("v dtype", lambda i: EVICT[i](k, v.half(), s, c), "dtype"),
        ("int scores", lambda i: EVICT[i](k, v, s.long(), c), "dtype"),
        ("non-contiguous k", lambda i: EVICT[i](k.transpose(2, 3).contiguous().transpose(2, 3), v, s, c), "contiguous"),
        ("scores shape", lambda i: EVICT[i](k, v, s[:, :, :9].contiguous(), c), "scores"),
        ("negative slack", lambda i: EVICT[i](k, v, s, c, slack=-1), ">= 0"),
        ("scores device", lambda i: EVICT[i](k, v, s.to("meta"), c), "device"),
    ]


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("n", range(len(_bad_evict())), ids=[b[0] for b in _bad_evict()])
def test_evict_bad_input_raises(impl, n):
    """Bad evict input raises a ValueError/TypeError saying what was expected."""
    _, fn, match = _bad_evict()[n]
    with pytest.raises((ValueError, TypeError), match=match):
        fn(impl)


def _bad_decode():
    k, v, start, length, _ = packed_cache(torch.tensor([[3, 4]]), 16, torch.float32)
    q = torch.randn(1, 2, 2, 16).to(DEV)
    return [
        ("q dtype mismatch", lambda i: DECODE[i](q.half(), k, v, start, length), "dtype"),
        ("int32 lengths", lambda i: DECODE[i](q, k, v, start, length.int()), "dtype"),
        ("head dim", lambda i: DECODE[i](q, k[:, :8].contiguous(), v[:, :8].contiguous(), start, length), "expected"),
        ("lengths shape", lambda i: DECODE[i](q, k, v, start, length[:, :1].contiguous()), "expected"),
        ("non-contiguous q", lambda i: DECODE[i](q.transpose(2, 3).contiguous().transpose(2, 3), k, v, start,
                                                 length), "contiguous"),
        ("device", lambda i: DECODE[i](q, k.to("meta"), v, start, length), "device"),
        ("3-d q", lambda i: DECODE[i](q[0], k, v, start, length), "dimensions"),
    ]


@pytest.mark.parametrize("impl", impls(DECODE))
@pytest.mark.parametrize("n", range(len(_bad_decode())), ids=[b[0] for b in _bad_decode()])
def test_decode_bad_input_raises(impl, n):
    """Bad decode input raises a ValueError saying what was expected."""
    _, fn, match = _bad_decode()[n]
    with pytest.raises(ValueError, match=match):
        fn(impl)


@pytest.mark.parametrize("impl", impls(APPEND))
def test_append_bad_input_raises(impl):
    """Wrong dtype, shape or contiguity of the new token raises before anything is written."""
    k, v, start, length, capacity = packed_cache(torch.tensor([[3, 4]]), 16, torch.float32)
    pos = torch.zeros(k.shape[0], dtype=torch.long, device=DEV)
    kn = torch.randn(1, 2, 16).to(DEV)
    with pytest.raises(ValueError, match="dtype"):
        append_(k, v, pos, start, length, capacity, kn.half(), kn, 3, impl=impl)
    with pytest.raises(ValueError, match="expected"):
        append_(k, v, pos, start, length, capacity, kn[:, :1].contiguous(), kn[:, :1].contiguous(), 3, impl=impl)
    with pytest.raises(ValueError, match="contiguous"):
        append_(k, v, pos, start, length, capacity, torch.randn(1, 16, 2).to(DEV).transpose(1, 2), kn, 3, impl=impl)
    with pytest.raises(ValueError, match="dtype"):
        append_(k, v, pos, start, length.int(), capacity, kn, kn, 3, impl=impl)


@pytest.mark.skipif(CUDA or not kernels.HAVE_TRITON, reason="checks the CPU refusal of compiled Triton")
def test_triton_on_cpu_without_interpreter_says_how_to_run(monkeypatch):
    """v3 on CPU tensors without the interpreter refuses with a message naming the fix."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    k, v, s = case(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.evict_v3(k, v, s, torch.tensor([[2]]))


# -----------------------------------------------------------------------------
# GPU-only sizes


@pytest.mark.skipif(not CUDA, reason="GPU-only size")
@pytest.mark.parametrize("H,T,levels", [(32, 32768, 50), (32, 32768, None), (4, 65536, None)])
def test_evict_full_size_on_gpu(H, T, levels):
    """At benchmark sizes (bf16, 10-30% kept, 16-32 slices per row) v3 keeps exactly v1's tokens and rows."""
    k, v, scores = case(1, H, T, 128, torch.bfloat16, levels=levels, score_dtype=torch.bfloat16 if levels else
                        torch.float32)
    counts = torch.linspace(0.1, 0.3, H).mul(T).long().view(1, H)
    assert_same_packed(kernels.evict_v3(k, v, scores, counts, 4, 64), evict_v1(k, v, scores, counts, 4, 64), "gpu")


@pytest.mark.skipif(not CUDA, reason="GPU-only size")
@pytest.mark.parametrize("B,H,G,T", [(1, 32, 1, 32768), (8, 8, 4, 32768), (1, 8, 4, 131072)])
@pytest.mark.parametrize("fused", [False, True], ids=["combine-kernel", "fused-merge"])
def test_decode_full_size_on_gpu(monkeypatch, B, H, G, T, fused):
    """At benchmark sizes (bf16, 20% mean, 0.5x-1.5x lengths) v3 is within bf16 tolerance of fp64, call after call."""
    monkeypatch.setattr(kernels.TUNING, "decode_fused_combine", fused)
    lengths = (torch.rand(B, H) + 0.5).mul(T // 5).long()
    k, v, start, length, _ = packed_cache(lengths, 128, torch.bfloat16)
    q = torch.randn(B, H, G, 128, device=DEV, dtype=torch.bfloat16)
    want = decode_v1(q.double(), k.double(), v.double(), start, length)
    for call in range(20):  # a race between the parts of a head would show in some call
        got = kernels.decode_v3(q, k, v, start, length)
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[torch.bfloat16], f"call {call}: {diff(got, want)}"


def test_auto_impl_uses_reference_on_cpu_and_triton_on_cuda():
    """impl='auto' picks v1 for CPU tensors and v3 for CUDA tensors, with the same answer."""
    k, v, s = case(1, 2, 12, 16, levels=2)
    c = torch.tensor([[3, 12]])
    assert_same_packed(evict(k, v, s, c), evict_v1(k, v, s, c), "auto")
