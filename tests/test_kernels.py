"""Tests of kernels.py: eviction, decode attention and append, every version against an independent reference.

    python -m pytest -q tests/test_kernels.py              # CPU: under a minute; v2 (torch.compile) cases skipped
    python -m pytest -q tests/test_kernels.py --run-slow   # also the v2 cases (each compiles: ~10 s apiece on a CPU)

On the CPU the Triton kernels (v3) run under TRITON_INTERPRET=1 (conftest.py sets it) at small sizes;
GPU-only sizes skip. The references here are written independently of kernels.py's v1: a stable sort
per head for eviction, a loop over heads in fp64 for decode attention.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import composite

import kernels
from kernels import APPEND, DECODE, EVICT, PackedKV, append_, decode_attention, evict
from model import GPT, GPTConfig, KVCache
from test_lukv import diff

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_OK = kernels.HAVE_TRITON and (CUDA or kernels.INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max |diff| vs fp64 on O(1) outputs


def impls(table, compiles=True):
    """pytest params of versions (a kernels table or names); v2 is `slow` when it compiles, v3 skips without Triton."""
    out = []
    for name in table:
        marks = []
        if name == "v2" and compiles:
            marks = [pytest.mark.slow]
        if name == "v3":
            marks = [needs_triton]
        out.append(pytest.param(name, marks=marks))
    return out


@pytest.fixture(autouse=True)
def _v2_compiles_here(request):
    """A v2 case skips (with the reason) where torch.compile fails, e.g. without a C++ compiler."""
    params = getattr(request.node, "callspec", None)
    if params and "v2" in params.params.values() and "slow" in request.node.keywords:
        ok, why = kernels.v2_available(DEV)
        if not ok:
            pytest.skip(f"torch.compile unavailable: {why}")


def same(a, b):
    """Bit-for-bit equal, NaN equal to NaN (spare rows of the decode fixtures hold NaN)."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=0, atol=0, equal_nan=True)


def case(B, H, T, D, dtype=torch.float32, levels=None, score_dtype=torch.float32, seed=0):
    """Random k, v (B, H, T, D); scores drawn from `levels` values (many ties) or continuous."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    scores = torch.randint(0, levels, (B, H, T), generator=g).float() if levels else torch.randn(B, H, T, generator=g)
    return k.to(DEV), v.to(DEV), scores.to(score_dtype).to(DEV)


# -----------------------------------------------------------------------------
# the independent references


def reference_kept(scores, counts, sink, window):
    """Kept token indices per head, [[sorted list]], by a stable ascending sort of the fp32 scores.

    Ties keep index order (the lower index is evicted first); NaN ranks highest, -0.0 ties +0.0 (as
    torch.sort compares); the protected first `sink` and last `window` tokens are moved past everything
    by a second stable sort; the last counts[b, h] tokens of the order are kept.
    """
    s = scores.float().cpu()
    s = torch.where(s.isnan(), float("nan"), s)  # one NaN (a -NaN would sort like any NaN anyway)
    B, H, T = s.shape
    tok = torch.arange(T)
    protected = ((tok < sink) | (tok >= T - window)).long()  # (T,)
    order = torch.sort(s, dim=-1, stable=True).indices  # (B, H, T) ascending
    order = torch.gather(order, -1, torch.sort(protected[order], dim=-1, stable=True).indices)
    return [[sorted(order[b, h, T - int(counts[b, h]):].tolist()) for h in range(H)] for b in range(B)]


def reference_evict(k, v, scores, counts, sink, window, slack):
    """The packed cache that evict must build: heads back to back (capacity = count + slack), kept rows
    in ascending token order, spare rows zero with position -1."""
    B, H, T, D = k.shape
    capacity = counts.cpu().long() + slack
    start = torch.cumsum(capacity.flatten(), 0).view(B, H) - capacity
    N = int(capacity.sum())
    k_out, v_out = k.new_zeros(N, D), v.new_zeros(N, D)
    pos = torch.full((N,), -1, dtype=torch.long, device=k.device)
    for b, row in enumerate(reference_kept(scores, counts, sink, window)):
        for h, kept in enumerate(row):
            s = int(start[b, h])
            idx = torch.tensor(kept, dtype=torch.long, device=k.device)
            k_out[s:s + len(kept)], v_out[s:s + len(kept)], pos[s:s + len(kept)] = k[b, h, idx], v[b, h, idx], idx
    return PackedKV(k_out, v_out, pos, start, counts.cpu().long(), capacity)


def reference_decode(q, k_packed, v_packed, start, length, scale=None):
    """fp64 attention, one head at a time: softmax(q k^T * scale) v over the head's rows; empty heads give 0."""
    B, H, G, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, G, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s, n = int(start[b, h]), int(length[b, h])
            if n:
                keys, values = k_packed[s:s + n].double().cpu(), v_packed[s:s + n].double().cpu()  # (n, D)
                weights = torch.softmax(q[b, h].double().cpu() @ keys.T * scale, dim=-1)  # (G, n)
                out[b, h] = weights @ values
    return out


def assert_same_packed(got, want, what=""):
    """Identical layout and positions, bit-identical kept rows, and zeros in every spare row."""
    for name in ("start", "length", "capacity", "pos"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), \
            f"{what}: {name} differs\n got  {getattr(got, name).tolist()}\n want {getattr(want, name).tolist()}"
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v), f"{what}: rows differ, k {diff(got.k, want.k)}"


# -----------------------------------------------------------------------------
# evict (select + compact)


@pytest.mark.parametrize("impl", impls(EVICT))
def test_evict_known_answer(impl):
    """A 2-head, 6-token example, worked by hand (sink = window = 1, slack = 2).

    head 0: scores [5, 1, 3, 3, 0, 2], keep 3. Tokens 0 and 5 are protected; one more is needed and
            tokens 2 and 3 tie at 3: the lower index is evicted first, so 3 is kept -> [0, 3, 5].
    head 1: all scores 2, keep 4. Protected 0 and 5; of the tied 1..4 the two highest stay -> [0, 3, 4, 5].
    Capacities 5 and 6, so head 1 starts at row 5; spare rows hold position -1.
    """
    k, v = torch.randn(1, 2, 6, 16).to(DEV), torch.randn(1, 2, 6, 16).to(DEV)
    scores = torch.tensor([[[5., 1, 3, 3, 0, 2], [2, 2, 2, 2, 2, 2]]]).to(DEV)
    packed = EVICT[impl](k, v, scores, torch.tensor([[3, 4]]), sink=1, window=1, slack=2)
    assert packed.pos.tolist() == [0, 3, 5, -1, -1, 0, 3, 4, 5, -1, -1]
    assert packed.start.tolist() == [[0, 5]] and packed.capacity.tolist() == [[5, 6]]
    assert torch.equal(packed.k[5:9], k[0, 1, [0, 3, 4, 5]]) and not packed.v[9:].any()


EVICT_CASES = [  # B, H, T, D, dtype, score levels (None: continuous), score dtype, sink, window, counts
    (1, 2, 6, 16, torch.float32, 2, torch.float32, 0, 0, [[0, 6]]),  # lengths 0 and full
    (2, 3, 37, 64, torch.bfloat16, 3, torch.bfloat16, 1, 4, [[5, 1 + 4, 37], [20, 9, 11]]),
    (1, 4, 130, 128, torch.float16, None, torch.float16, 4, 0, [[4, 64, 100, 130]]),
    (3, 2, 100, 16, torch.float32, 1, torch.float32, 0, 0, [[1, 99], [0, 50], [100, 3]]),  # all tied
    (2, 2, 257, 64, torch.bfloat16, None, torch.float32, 3, 7, [[10, 200], [256, 257]]),
]


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("spec", EVICT_CASES, ids=[f"case{i}" for i in range(len(EVICT_CASES))])
def test_evict_matches_the_stable_sort_reference(impl, spec):
    """Every version builds the reference's layout, positions and bit-identical K/V rows, at irregular sizes."""
    B, H, T, D, dtype, levels, sdtype, sink, window, counts = spec
    k, v, scores = case(B, H, T, D, dtype, levels, sdtype)
    counts = torch.tensor(counts)
    assert_same_packed(EVICT[impl](k, v, scores, counts, sink, window, slack=3),
                       reference_evict(k, v, scores, counts, sink, window, slack=3), f"{impl} {spec}")


@needs_triton
@pytest.mark.parametrize("slice_len,levels", [(16, 3), (32, None)], ids=["16-ties", "32-continuous"])
def test_evict_any_slice_length_keeps_the_same_tokens(monkeypatch, slice_len, levels):
    """Rows cut into many slices (16, 32 tokens) keep exactly the reference's tokens and rows, ties across slices."""
    monkeypatch.setattr(kernels.TUNING, "select_slice", slice_len)
    k, v, scores = case(2, 2, 100, 16, levels=levels, seed=3)
    counts = torch.tensor([[9, 100], [70, 33]])
    assert_same_packed(kernels.evict_v3(k, v, scores, counts, 2, 3),
                       reference_evict(k, v, scores, counts, 2, 3, slack=32), f"levels {levels}")


@pytest.mark.parametrize("impl", impls(EVICT))
def test_evict_special_floats(impl):
    """-0.0 ties +0.0, every NaN ties and ranks above +inf, -inf ranks lowest, as torch.sort orders them."""
    vals = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0, -0.0, float("nan"), 0.0])
    scores = vals[torch.randperm(10, generator=torch.Generator().manual_seed(0))].repeat(1, 2, 3)  # (1, 2, 30)
    scores[0, 1, 5] = -float("nan")
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    counts = torch.tensor([[11, 17]])
    got = EVICT[impl](k.to(DEV), v.to(DEV), scores.to(DEV), counts)
    for h, want in enumerate(reference_kept(scores, counts, 0, 0)[0]):
        s, n = int(got.start[0, h]), int(got.length[0, h])
        assert got.pos[s:s + n].tolist() == want, f"head {h}"


@pytest.mark.parametrize("impl", impls(EVICT))
@pytest.mark.parametrize("low_bit,n_bits", [(0, 8), (8, 8), (12, 8), (24, 4)],
                         ids=["lowest-digit", "one-digit", "two-digits", "top"])
def test_evict_scores_that_differ_in_few_bits(impl, low_bit, n_bits):
    """Scores whose fp32 patterns share all bits but a few (one or two 8-bit radix digits) select exactly."""
    g = torch.Generator().manual_seed(low_bit)
    bits = 0x3F000000 + (torch.randint(0, 2 ** n_bits, (2, 2, 300), generator=g, dtype=torch.int32) << low_bit)
    scores = (bits.view(torch.float32) * torch.where(torch.rand(2, 2, 300, generator=g) < 0.3, -1.0, 1.0)).to(DEV)
    k, v = (torch.randn(2, 2, 300, 16, generator=g).to(DEV) for _ in range(2))
    counts = torch.tensor([[3, 150], [299, 77]])
    assert_same_packed(EVICT[impl](k, v, scores, counts, 1, 2), reference_evict(k, v, scores, counts, 1, 2, 32),
                       f"bits [{low_bit}, {low_bit + n_bits})")


@composite
def evict_inputs(draw):
    B, H, T = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 50))
    sink, window = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    floor = min(T, sink + window)
    counts = draw(st.lists(st.integers(floor, T), min_size=B * H, max_size=B * H))
    levels = draw(st.sampled_from([1, 2, 5, None]))
    seed = draw(st.integers(0, 2 ** 16))
    return B, H, T, sink, window, torch.tensor(counts).view(B, H), levels, seed


@pytest.mark.parametrize("impl", impls(("v1", "v3")))
@given(inputs=evict_inputs())
def test_evict_matches_reference_on_random_inputs(impl, inputs):
    """On random small shapes, counts, sink/window and tie-heavy scores, v1 and v3 (16-token slices) are exact."""
    # examples: conftest.py's hypothesis profile ("ci": 10; each costs v3 about a second in the interpreter)
    B, H, T, sink, window, counts, levels, seed = inputs
    k, v, scores = case(B, H, T, 16, levels=levels, seed=seed)
    saved = kernels.TUNING.select_slice
    kernels.TUNING.select_slice = 16  # several slices per row (a fixture would not reset between examples)
    try:
        got = EVICT[impl](k, v, scores, counts, sink, window, slack=2)
    finally:
        kernels.TUNING.select_slice = saved
    assert_same_packed(got, reference_evict(k, v, scores, counts, sink, window, slack=2), str(inputs))


@pytest.mark.parametrize("impl", impls(EVICT))
def test_nothing_kept_and_no_slack_gives_an_empty_cache(impl):
    """Keeping 0 tokens with no spare rows gives an empty cache, and every decode version returns zeros over it."""
    k, v, scores = case(2, 2, 9, 16)
    packed = EVICT[impl](k, v, scores, torch.zeros(2, 2, dtype=torch.long), slack=0)
    assert packed.k.shape == (0, 16) and packed.length.sum() == 0
    q = torch.randn(2, 2, 3, 16).to(DEV)
    for decode_impl in ("v1", "v3") if TRITON_OK else ("v1",):
        out = DECODE[decode_impl](q, packed.k, packed.v, packed.start, packed.length)
        assert torch.equal(out.cpu(), torch.zeros(2, 2, 3, 16)), decode_impl


def test_layout_cache_hands_out_copies(monkeypatch):
    """Two evictions with the same counts share one cached layout; appending to the first leaves the second intact."""
    monkeypatch.setattr(kernels, "_LAYOUTS", {})
    k, v = (torch.randn(1, 2, 40, 16, device=DEV) for _ in range(2))
    scores, counts = torch.rand(1, 2, 40, device=DEV), torch.tensor([[5, 9]])
    first = kernels.evict_v1(k, v, scores, counts, slack=4)
    APPEND["v1"](first.k, first.v, first.pos, first.start, first.length, first.capacity,
                 torch.randn(1, 2, 1, 16, device=DEV), torch.randn(1, 2, 1, 16, device=DEV), 40)
    second = kernels.evict_v1(k, v, scores, counts, slack=4)
    assert len(kernels._LAYOUTS) == 1, f"{len(kernels._LAYOUTS)} cached layouts for one (counts, slack, device)"
    assert first.length.tolist() == [[6, 10]] and second.length.tolist() == [[5, 9]], (first.length, second.length)
    assert torch.equal(second.start, first.start)
    untouched = torch.ones_like(first.pos, dtype=torch.bool)
    untouched[first.start.flatten() + torch.tensor([5, 9], device=DEV)] = False  # the two appended rows
    assert torch.equal(second.pos[untouched], first.pos[untouched])


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


@pytest.mark.parametrize("impl", impls(DECODE))
def test_decode_known_answer(impl):
    """Two heads worked by hand (scale 1, D = 2).

    head 0: keys (1, 0) and (0, 1), query (ln 3, 0): scores ln 3 and 0, weights 3/4 and 1/4; values
            (4, 0) and (0, 8) -> output (3, 2). head 1 holds no rows -> output (0, 0).
    """
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).to(DEV)  # row 2: a spare row, never read
    v = torch.tensor([[4.0, 0.0], [0.0, 8.0], [9.0, 9.0]]).to(DEV)
    start, length = torch.tensor([[0, 3]]).to(DEV), torch.tensor([[2, 0]]).to(DEV)
    q = torch.tensor([[[[torch.tensor(3.0).log().item(), 0.0]], [[1.0, 1.0]]]]).to(DEV)  # (1, 2, 1, 2)
    got = DECODE[impl](q, k, v, start, length, scale=1.0)
    assert torch.allclose(got.cpu(), torch.tensor([[[[3.0, 2.0]], [[0.0, 0.0]]]]), atol=1e-5), got


DECODE_LENGTHS = {
    "edge": [[0, 1, 45], [45, 0, 2]],  # empty, one row, full
    "skewed": [[90, 3, 4], [2, 1, 5]],  # one long head, many short
}


@pytest.mark.parametrize("impl", impls(DECODE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,G,lengths", [(16, 1, "edge"), (64, 4, "skewed"), (128, 3, "edge")])
def test_decode_matches_fp64_reference(impl, dtype, D, G, lengths):
    """Outputs within dtype tolerance of fp64 attention; empty heads give zeros; GQA groups share K/V."""
    if impl == "v2" and dtype != torch.float32:
        pytest.skip("v2: fp32 only (each dtype is another torch.compile of v1's math)")
    lengths = torch.tensor(DECODE_LENGTHS[lengths])
    k, v, start, length, _ = packed_cache(lengths, D, dtype)
    q = torch.randn(2, 3, G, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    want = reference_decode(q, k, v, start, length)
    got = kernels.decode_v3(q, k, v, start, length, chunk=16) if impl == "v3" else DECODE[impl](q, k, v, start, length)
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.double().cpu() - want).abs().max().item() <= TOL[dtype], diff(got, want)
    empty = lengths == 0
    assert torch.equal(got.cpu()[empty], torch.zeros_like(got.cpu()[empty])), "an empty head attends to nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_chunk_is_its_tokens_decoded_one_after_another(dtype):
    """attend_rows over a chunk of Tq tokens: token t's output is a decode step over its head's rows up to
    length - (Tq - 1 - t) (fp64 reference), its weights are 0 past that row, and each weight row sums to 1."""
    Tq, G, D = 3, 2, 16
    lengths = torch.tensor([[7, 3], [12, 5]])  # every head holds the chunk's 3 rows at its end
    k, v, start, length, _ = packed_cache(lengths, D, dtype)
    q = torch.randn(2, 2, G, Tq, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEV)
    out, probs = kernels.attend_rows(q, k, v, start, length, return_probs=True)
    assert out.shape == q.shape and probs.shape == (2, 2, G, Tq, 12)
    for t in range(Tq):
        seen = length - (Tq - 1 - t)  # (B, H): the rows token t may see
        want = reference_decode(q[:, :, :, t], k, v, start, seen)
        assert (out[:, :, :, t].double().cpu() - want).abs().max().item() <= TOL[dtype], t
        past = torch.arange(12, device=DEV) >= seen[..., None, None].to(DEV)  # (B, H, 1, 12)
        assert torch.equal(probs[:, :, :, t][past.expand(-1, -1, G, -1)].cpu(), torch.zeros(int(past.sum()) * G,
                                                                                              dtype=probs.dtype))
    assert torch.allclose(probs.sum(-1).double().cpu(), torch.ones(2, 2, G, Tq, dtype=torch.float64), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("chunk", [5, 16, 64, None])
def test_decode_split_count_does_not_change_the_answer(chunk):
    """Any part width of the split-KV token stream (parts inside a head, across heads) gives the same output."""
    k, v, start, length, _ = packed_cache(torch.tensor([[100, 7], [64, 33]]), 64, torch.float32)
    q = torch.randn(2, 2, 2, 64).to(DEV)
    got = kernels.decode_v3(q, k, v, start, length, scale=0.3, chunk=chunk)
    want = reference_decode(q, k, v, start, length, scale=0.3)
    assert torch.allclose(got.double().cpu(), want, atol=1e-5), diff(got, want)


@needs_triton
@pytest.mark.parametrize("lengths", [[[300, 0, 2, 1, 0, 9]], [[0, 0, 40, 0, 0, 0]], [[17, 17, 17, 17, 17, 17]]],
                         ids=["skewed", "one-head", "uniform"])
def test_decode_automatic_parts_balance_any_lengths(monkeypatch, lengths):
    """The automatic cut is exact for skewed, empty and uniform heads, with a head's parts over several merge tiles."""
    monkeypatch.setattr(kernels.TUNING, "decode_min_chunk", 1)  # many parts even at these small sizes
    monkeypatch.setattr(kernels.TUNING, "decode_block_n", 16)
    monkeypatch.setattr(kernels.TUNING, "decode_block_n_gqa", 16)
    monkeypatch.setattr(kernels.TUNING, "combine_block", 4)  # a head's parts span several merge tiles
    k, v, start, length, _ = packed_cache(torch.tensor(lengths), 32, torch.float32)
    q = torch.randn(1, 6, 3, 32, generator=torch.Generator().manual_seed(2)).to(DEV)
    got = kernels.decode_v3(q, k, v, start, length)
    want = reference_decode(q, k, v, start, length)
    assert torch.allclose(got.double().cpu(), want, atol=1e-5), diff(got, want)


# -----------------------------------------------------------------------------
# the kernels inside model.KVCache


@pytest.mark.parametrize("impl", impls(EVICT))
def test_kvcache_evict_installs_the_kernels_rows_and_attends_to_them(impl):
    """KVCache.evict holds the reference's packed rows, attend matches fp64, need_probs weights sum to 1 per head."""
    k, v, scores = case(2, 2, 50, 16, levels=3)
    counts = torch.tensor([[5, 50], [1, 23]])
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=16, batch_size=2, device=DEV, slack=4, impl=impl)
    cache.prefill(0, k, v)
    cache.evict(0, scores, counts, sink=1, window=0)
    want = reference_evict(k, v, scores, counts, 1, 0, slack=4)
    assert_same_packed(PackedKV(cache.k[0], cache.v[0], cache.pos[0], cache.start[0], cache.length[0],
                                cache.capacity[0]), want, impl)
    q = torch.randn(2, 2, 2, 1, 16).to(DEV)  # (B, H, G, Tq = 1, D): a decode step
    want_out = reference_decode(q[:, :, :, 0], *want[:2], want.start, want.length)
    out, probs = cache.attend(0, q)
    assert probs is None and torch.allclose(out[:, :, :, 0].double().cpu(), want_out, atol=1e-5)
    out_p, probs = cache.attend(0, q, need_probs=True)
    assert torch.allclose(out_p[:, :, :, 0].double().cpu(), want_out, atol=1e-5)
    assert probs.shape == (2, 2, 2, 1, 50) and torch.allclose(probs.sum(-1).cpu(), torch.ones(2, 2, 2, 1))
    assert not probs[0, 0, :, :, 5:].any(), "no weight past a head's kept rows"


@needs_triton
def test_model_outputs_agree_after_triton_or_reference_eviction():
    """v1 and v3 caches keep the same tokens and logits; keeping the reference's slots gives v1's bit for bit."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
    model = GPT(cfg).eval().to(DEV)
    idx = torch.randint(0, 97, (1, 40), device=DEV)
    new = torch.randint(0, 97, (1, 3), device=DEV)
    scores = torch.randint(0, 3, (2, 2, 40)).float()  # (L, H, T) with ties
    counts = torch.tensor([[6, 30], [12, 9]])
    logits, caches = {}, {}
    with torch.no_grad():
        for how in ("v1", "v3", "keep"):
            cache = model.new_cache(1, impl="v1" if how == "keep" else how)
            model(idx, cache=cache)
            if how == "keep":
                for layer in range(cfg.n_layer):
                    rows = reference_kept(scores[layer][None], counts[layer][None], 2, 3)[0]  # H sorted lists
                    kept = torch.tensor([r + [0] * (30 - len(r)) for r in rows])  # (H, K = 30), padded
                    cache.keep(layer, kept[None].to(DEV), counts[layer][None])
            else:
                for layer in range(cfg.n_layer):
                    cache.evict(layer, scores[layer][None].to(DEV), counts[layer][None], sink=2, window=3)
            logits[how], caches[how] = model(new, cache=cache), cache
    assert torch.equal(logits["v1"], logits["keep"]), diff(logits["v1"], logits["keep"])
    assert torch.allclose(logits["v1"], logits["v3"], atol=1e-5), diff(logits["v1"], logits["v3"])
    for layer in range(cfg.n_layer):
        assert torch.equal(caches["v1"].kept_mask(layer, 43), caches["v3"].kept_mask(layer, 43))


# -----------------------------------------------------------------------------
# append in place


@pytest.mark.parametrize("impl", impls(("v1", "v3")))
def test_append_writes_one_row_per_head_in_place(impl):
    """Append writes row start + length of each head, bumps length, and touches nothing else."""
    lengths = torch.tensor([[0, 4], [2, 1]])
    k, v, start, length, capacity = packed_cache(lengths, 16, torch.bfloat16, slack=2)
    pos = torch.full((k.shape[0],), -1, dtype=torch.long, device=DEV)
    k0, v0, ptr = k.clone(), v.clone(), k.data_ptr()
    k_new, v_new = (torch.randn(2, 2, 1, 16).to(torch.bfloat16).to(DEV) for _ in range(2))  # (B, H, T = 1, D)
    APPEND[impl](k, v, pos, start, length, capacity, k_new, v_new, 9)
    rows = (start + lengths.to(DEV)).flatten()
    assert k.data_ptr() == ptr and torch.equal(length.cpu(), lengths + 1)
    assert torch.equal(k[rows], k_new.view(4, 16)) and torch.equal(v[rows], v_new.view(4, 16))
    assert pos[rows].tolist() == [9] * 4 and int((pos >= 0).sum()) == 4
    others = torch.ones(k.shape[0], dtype=torch.bool, device=DEV)
    others[rows] = False
    assert same(k[others], k0[others]) and same(v[others], v0[others])


@pytest.mark.parametrize("impl", impls(("v1", "v3")))
def test_append_overflow_raises_and_unchecked_never_writes_past_capacity(impl):
    """A full head raises before any write; with check=False full heads are skipped, others appended."""
    k, v, start, length, capacity = packed_cache(torch.tensor([[2, 1]]), 16, torch.float32, slack=1)
    length[0, 0] += 1  # head 0 (rows 0..2) is full, head 1 (rows 3..4) has one spare row
    pos = torch.full((k.shape[0],), -1, dtype=torch.long, device=DEV)
    k0 = k.clone()
    kn, vn = torch.ones(1, 2, 1, 16).to(DEV), torch.ones(1, 2, 1, 16).to(DEV)
    with pytest.raises(ValueError, match="capacity overflow"):
        append_(k, v, pos, start, length, capacity, kn, vn, 5, impl=impl)
    assert same(k, k0) and length.tolist() == [[3, 1]]
    append_(k, v, pos, start, length, capacity, kn, vn, 5, impl=impl, check=False)
    assert length.tolist() == [[3, 2]] and same(k[:4], k0[:4]) and pos.tolist() == [-1, -1, -1, -1, 5]
    start[0, 1] = 4  # corrupt metadata: head 1's next row would be row 6 of 5
    append_(k, v, pos, start, length, capacity, kn, vn, 6, impl=impl, check=False)
    assert length.tolist() == [[3, 2]] and pos.tolist() == [-1, -1, -1, -1, 5], "nothing is written past N"


@pytest.mark.parametrize("impl", impls(("v1", "v3")))
@pytest.mark.parametrize("slack", [3, 2], ids=["fits", "overflows"])
def test_append_a_chunk_is_its_tokens_appended_one_by_one(impl, slack):
    """Appending T tokens writes what T one-token appends write; a head short of rows refuses, or skips them."""
    lengths = torch.tensor([[0, 4], [2, 1]])
    k, v, start, length, capacity = packed_cache(lengths, 16, torch.float32, slack=slack)
    pos = torch.full((k.shape[0],), -1, dtype=torch.long, device=DEV)
    k_new, v_new = (torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(s)).to(DEV) for s in (1, 2))
    ref_k, ref_v, ref_pos, ref_length = k.clone(), v.clone(), pos.clone(), length.clone()
    for t in range(3):  # the reference: one token at a time, full heads skipped
        APPEND["v1"](ref_k, ref_v, ref_pos, start, ref_length, capacity, k_new[:, :, t:t + 1].contiguous(),
                     v_new[:, :, t:t + 1].contiguous(), 7 + t, check=False)
    if slack == 2:
        with pytest.raises(ValueError, match="capacity overflow"):
            APPEND[impl](k, v, pos, start, length, capacity, k_new, v_new, 7)
        assert torch.equal(length.cpu(), lengths) and int((pos >= 0).sum()) == 0
    APPEND[impl](k, v, pos, start, length, capacity, k_new, v_new, 7, check=slack == 3)
    assert torch.equal(length.cpu(), lengths + min(3, slack)) and torch.equal(length, ref_length)
    assert same(k, ref_k) and same(v, ref_v) and torch.equal(pos, ref_pos), f"k {diff(k, ref_k)}"


# -----------------------------------------------------------------------------
# bad input: a clear error before any launch (and before any compile)


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


@pytest.mark.parametrize("impl", impls(EVICT, compiles=False))
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


@pytest.mark.parametrize("impl", impls(DECODE, compiles=False))
@pytest.mark.parametrize("n", range(len(_bad_decode())), ids=[b[0] for b in _bad_decode()])
def test_decode_bad_input_raises(impl, n):
    """Bad decode input raises a ValueError saying what was expected."""
    _, fn, match = _bad_decode()[n]
    with pytest.raises(ValueError, match=match):
        fn(impl)


@pytest.mark.parametrize("impl", impls(("v1", "v3")))
def test_append_bad_input_raises(impl):
    """Wrong dtype, shape or contiguity of the new token raises before anything is written."""
    k, v, start, length, capacity = packed_cache(torch.tensor([[3, 4]]), 16, torch.float32)
    pos = torch.zeros(k.shape[0], dtype=torch.long, device=DEV)
    kn = torch.randn(1, 2, 1, 16).to(DEV)
    with pytest.raises(ValueError, match="dtype"):
        append_(k, v, pos, start, length, capacity, kn.half(), kn, 3, impl=impl)
    with pytest.raises(ValueError, match="expected"):
        append_(k, v, pos, start, length, capacity, kn[:, :1].contiguous(), kn[:, :1].contiguous(), 3, impl=impl)
    with pytest.raises(ValueError, match="dimensions"):
        append_(k, v, pos, start, length, capacity, kn[:, :, 0], kn[:, :, 0], 3, impl=impl)
    with pytest.raises(ValueError, match="contiguous"):
        append_(k, v, pos, start, length, capacity, torch.randn(1, 2, 16, 2).to(DEV).transpose(2, 3), kn, 3, impl=impl)
    with pytest.raises(ValueError, match="dtype"):
        append_(k, v, pos, start, length.int(), capacity, kn, kn, 3, impl=impl)


def test_unknown_impl_names_the_known_ones():
    """KVCache and the three wrappers refuse an unknown impl by listing v1, v2, v3."""
    with pytest.raises(ValueError, match=r"\['v1', 'v2', 'v3'\]"):
        KVCache(n_layer=1, n_kv_head=2, head_dim=16, impl="reference")
    k, v, s = case(1, 2, 10, 16)
    kp, vp, start, length, capacity = packed_cache(torch.tensor([[3, 4]]), 16, torch.float32)
    pos, kn = torch.zeros(kp.shape[0], dtype=torch.long, device=DEV), torch.randn(1, 2, 1, 16).to(DEV)
    for call in (lambda: evict(k, v, s, torch.tensor([[3, 4]]), impl="v4"),
                 lambda: decode_attention(torch.randn(1, 2, 1, 16).to(DEV), kp, vp, start, length, impl="v4"),
                 lambda: append_(kp, vp, pos, start, length, capacity, kn, kn, 3, impl="v4")):
        with pytest.raises(ValueError, match=r"\['v1', 'v2', 'v3'\]"):
            call()


@pytest.mark.skipif(CUDA or not kernels.HAVE_TRITON, reason="checks the CPU refusal of compiled Triton")
def test_triton_on_cpu_without_interpreter_says_how_to_run(monkeypatch):
    """v3 on CPU tensors without the interpreter refuses with a message naming the fix."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    k, v, s = case(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.evict_v3(k, v, s, torch.tensor([[2]]))


def test_auto_impl_is_v1_on_cpu_and_v3_on_cuda():
    """impl='auto' runs v1 on CPU tensors and v3 on CUDA tensors (where Triton is installed), both wrappers."""
    k, v, s = case(1, 2, 12, 16, levels=2)
    assert kernels._auto_impl(k) == ("v3" if CUDA and kernels.HAVE_TRITON else "v1")
    assert kernels._auto_impl(torch.zeros(1)) == "v1"
    packed = evict(k, v, s, torch.tensor([[3, 12]]))
    assert_same_packed(packed, reference_evict(k, v, s, torch.tensor([[3, 12]]), 0, 0, 32), "auto")
    q = torch.randn(1, 2, 2, 16).to(DEV)
    got = decode_attention(q, packed.k, packed.v, packed.start, packed.length)
    want = reference_decode(q, packed.k, packed.v, packed.start, packed.length)
    assert torch.allclose(got.double().cpu(), want, atol=1e-5), diff(got, want)


# -----------------------------------------------------------------------------
# GPU-only sizes


@pytest.mark.skipif(not CUDA, reason="GPU-only size")
@pytest.mark.parametrize("H,T,levels", [(32, 32768, 50), (32, 32768, None), (4, 65536, None)])
def test_evict_full_size_on_gpu(H, T, levels):
    """At benchmark sizes (bf16, 10-30% kept, 16-32 slices per row) v3 keeps exactly v1's tokens and rows."""
    k, v, scores = case(1, H, T, 128, torch.bfloat16, levels=levels, score_dtype=torch.bfloat16 if levels else
                        torch.float32)
    counts = torch.linspace(0.1, 0.3, H).mul(T).long().view(1, H)
    assert_same_packed(kernels.evict_v3(k, v, scores, counts, 4, 64), kernels.evict_v1(k, v, scores, counts, 4, 64),
                       "gpu")


@pytest.mark.skipif(not CUDA, reason="GPU-only size")
@pytest.mark.parametrize("B,H,G,T", [(1, 32, 1, 32768), (8, 8, 4, 32768), (1, 8, 4, 131072)])
def test_decode_full_size_on_gpu(B, H, G, T):
    """At benchmark sizes (bf16, 20% mean, 0.5x-1.5x lengths) v3 is within bf16 tolerance of fp64, call after call."""
    lengths = (torch.rand(B, H) + 0.5).mul(T // 5).long()
    k, v, start, length, _ = packed_cache(lengths, 128, torch.bfloat16)
    q = torch.randn(B, H, G, 128, device=DEV, dtype=torch.bfloat16)
    want = kernels.decode_v1(q.double(), k.double(), v.double(), start, length)  # fp64 on the GPU: fast here
    for call in range(20):  # a race between the parts of a head would show in some call
        got = kernels.decode_v3(q, k, v, start, length)
        assert (got.double() - want).abs().max().item() <= TOL[torch.bfloat16], f"call {call}: {diff(got, want)}"
