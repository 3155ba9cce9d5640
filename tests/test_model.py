"""Tests of model.py: the cached forward against the uncached one, the KV cache's verbs, generation, checkpoints.

    python -m pytest -q tests/test_model.py     # CPU, seconds; v3 runs under TRITON_INTERPRET=1 (conftest.py)
"""
import hashlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import composite

import kernels
from model import KVCache, Probe, load_checkpoint, save_checkpoint
from test_lukv import diff, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "checkpoints", "tiny.tiktoken")


def held(cache, layer, b, h):
    """The original positions head (b, h) of a layer holds, in row order."""
    s, n = int(cache.start[layer, b, h]), int(cache.length[layer, b, h])
    return cache.pos[layer][s:s + n].tolist()


def kernel_impls():
    """The kernel paths to hold against the v1 reference: v3 (CUDA, or TRITON_INTERPRET=1, which conftest.py
    sets without CUDA) and v2 (torch.compile; slow to compile, so only with --run-slow)."""
    ok = kernels.HAVE_TRITON and (torch.cuda.is_available() or kernels.INTERPRET)
    v3 = "v3" if ok else pytest.param("v3", marks=pytest.mark.skip("v3 needs CUDA or TRITON_INTERPRET=1"))
    return [v3, pytest.param("v2", marks=pytest.mark.slow)]


# -----------------------------------------------------------------------------
# the cached forward is the uncached one


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_cached_decode_matches_uncached_forward(n_kv_head):
    """After a prefill, decoding token by token and feeding the rest as one chunk each give the uncached logits."""
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(idx)
        for chunked in (False, True):
            cache = model.new_cache(2, slack=3)  # small slack: the decode re-packs several times
            prompt = model(idx[:, :20], cache=cache)
            rest = model(idx[:, 20:], cache=cache) if chunked else \
                torch.cat([model(idx[:, t:t + 1], cache=cache) for t in range(20, 50)], dim=1)
            got = torch.cat([prompt, rest], dim=1)
            assert torch.allclose(got, full, atol=1e-5), f"chunked={chunked}: {diff(got, full)}"
            assert cache.seen == 50 and cache.length.eq(50).all()


def test_a_chunk_after_the_prompt_equals_one_token_at_a_time():
    """A question fed as one chunk gives the logits, rows and probe steps of feeding it token by token."""
    model = tiny_model(n_kv_head=2)
    torch.manual_seed(1)
    idx, question = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 7))
    out = []
    for chunked in (True, False):
        cache, probe = model.new_cache(2, slack=3), Probe(decode=True)
        with torch.no_grad():
            model(idx, cache=cache)
            for l in range(model.cfg.n_layer):  # skewed per-head budgets, as after LU-KV
                cache.evict(l, torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(l)),
                            torch.tensor([[5, 17], [30, 9]]), sink=2, window=3)
            if chunked:
                logits = model(question, cache=cache, probe=probe)
            else:
                logits = torch.cat([model(question[:, t:t + 1], cache=cache, probe=probe) for t in range(7)], dim=1)
        out.append((logits, cache, probe))
    (a, ca, pa), (b, cb, pb) = out
    assert torch.allclose(a, b, atol=1e-5), diff(a, b)
    assert ca.seen == cb.seen == 47 and torch.equal(ca.length, cb.length)
    for l in range(model.cfg.n_layer):
        assert torch.equal(ca.kept_mask(l, 47), cb.kept_mask(l, 47))
        assert all(held(ca, l, i, h) == held(cb, l, i, h) for i in range(2) for h in range(2))
    assert len(pa.decode_attn) == len(pb.decode_attn) == 7
    for sa, sb in zip(pa.decode_attn, pb.decode_attn):
        for l in range(model.cfg.n_layer):
            K = sb[l].shape[-1]  # the stepped probe's rows end at its step; the chunk pads to the chunk's end
            assert torch.allclose(sa[l][..., :K], sb[l], atol=1e-6) and not sa[l][..., K:].any()


def test_keep_all_is_exactly_the_full_cache():
    """Keeping every token of every head changes nothing: bit-identical logits afterwards."""
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        a, b = model.new_cache(1), model.new_cache(1)
        model(idx[:, :30], cache=a)
        model(idx[:, :30], cache=b)
        for l in range(2):
            b.keep(l, torch.arange(30).expand(1, 2, 30))
        assert torch.equal(model(idx[:, 30:], cache=a), model(idx[:, 30:], cache=b))


@pytest.mark.parametrize("impl", kernel_impls())
def test_kernel_backed_cache_agrees_with_reference(impl):
    """v2 / v3 caches decode the v1 reference's logits and keep its tokens (evict, append, chunk, attend)."""
    dev = "cpu" if impl == "v2" or kernels.INTERPRET else "cuda"  # v3 runs where Triton does
    model = tiny_model(n_kv_head=2)
    torch.manual_seed(3)
    idx, scores = torch.randint(0, 97, (2, 40)), torch.rand(2, model.cfg.n_layer, 2, 40)  # (B, L, H, T)
    counts = torch.tensor([[7, 19], [12, 40]])  # per (b, h): skewed, one head keeps everything
    logits, caches = [], []
    for cache_impl, device in (("v1", "cpu"), (impl, dev)):
        model, x, s, c = model.to(device), idx.to(device), scores.to(device), counts.to(device)
        cache = model.new_cache(2, slack=2, impl=cache_impl)  # slack 2: the decode re-packs on the way
        with torch.no_grad():
            model(x, cache=cache)
            for l in range(model.cfg.n_layer):
                cache.evict(l, s[:, l], c, sink=2, window=3)
            steps = [model(x[:, -1:] * 0 + t, cache=cache) for t in range(5)]  # 5 decode steps
            steps.append(model(x[:, :4], cache=cache))  # and a chunk of 4
        logits.append(torch.cat(steps, dim=1).cpu())
        caches.append(cache)
    assert torch.allclose(logits[0], logits[1], atol=1e-4 if dev == "cuda" else 1e-5), diff(logits[0], logits[1])
    for l in range(model.cfg.n_layer):
        assert torch.equal(caches[0].length[l], counts + 9) and torch.equal(caches[1].length[l].cpu(), counts + 9)
        assert torch.equal(caches[0].kept_mask(l, 49), caches[1].kept_mask(l, 49).cpu())


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    """A checkpoint loads back to the same outputs beside its tokenizer's hash; bad files say what is wrong."""
    model = tiny_model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, TOKENIZER, {"command": "test"})
    loaded, header = load_checkpoint(path)
    x = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.half().float()(x), atol=1e-5)  # the file holds fp16 weights
    assert header["meta"] == {"command": "test"} and header["tokenizer_path"] == str(tmp_path / "tiny.tiktoken")
    with open(header["tokenizer_path"], "rb") as f:
        assert header["tokenizer_sha256"] == hashlib.sha256(f.read()).hexdigest()
    with pytest.raises(FileNotFoundError, match="train_tiny.py"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_layer"] = 3  # a config the weights do not fill
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="does not match"):
        load_checkpoint(path)


def test_prompt_longer_than_context_is_refused():
    """A prompt past block_size names both lengths instead of indexing out of the RoPE table."""
    model = tiny_model(block_size=256)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        model(torch.zeros(1, 300, dtype=torch.long))


# -----------------------------------------------------------------------------
# the cache's verbs


@composite
def evictions(draw):
    """Per-head kept-slot sets for a (B=2, H=2, T) cache, any order, some empty or full."""
    T = draw(st.integers(1, 12))
    kept = [[draw(st.lists(st.integers(0, T - 1), unique=True, max_size=T)) for _ in range(2)] for _ in range(2)]
    return T, kept


@settings(max_examples=60, deadline=None)
@given(evictions())
def test_keep_holds_exactly_the_requested_tokens_in_order(case):
    """After keep each head holds exactly the requested tokens, ascending; length, mask and bytes match."""
    T, kept = case
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4, batch_size=2, slack=2)
    k = torch.randn(2, 2, T, 4)
    cache.prefill(0, k, -k)
    before = cache.nbytes(allocated=True)
    K = max(1, max(len(s) for row in kept for s in row))
    idx = torch.zeros(2, 2, K, dtype=torch.long)
    counts = torch.zeros(2, 2, dtype=torch.long)
    for b in range(2):
        for h in range(2):
            idx[b, h, :len(kept[b][h])] = torch.tensor(kept[b][h], dtype=torch.long)
            counts[b, h] = len(kept[b][h])
    cache.keep(0, idx, counts)
    assert torch.equal(cache.length[0], counts)
    n = int(counts.sum())
    assert cache.nbytes() == 2 * n * 4 * 4
    assert cache.nbytes(allocated=True) == 2 * (n + 4 * 2) * 4 * 4 <= before
    mask = cache.kept_mask(0, T)
    for b in range(2):
        for h in range(2):
            want = sorted(kept[b][h])
            assert held(cache, 0, b, h) == want and mask[b, h].nonzero()[:, 0].tolist() == want
            rows = cache.k[0][cache.start[0, b, h]:cache.start[0, b, h] + len(want)]
            assert torch.equal(rows, k[b, h, want]), f"head ({b},{h}) holds other keys than requested"


def test_attend_after_eviction_equals_attention_over_kept_rows():
    """Decode attention over an evicted cache equals plain softmax attention over each head's kept keys."""
    torch.manual_seed(1)
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=8)
    k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    cache.prefill(0, k, v)
    kept = [torch.tensor([0, 3, 7, 19]), torch.tensor([5, 6])]
    idx = torch.zeros(1, 2, 4, dtype=torch.long)
    idx[0, 0], idx[0, 1, :2] = kept[0], kept[1]
    cache.keep(0, idx, torch.tensor([[4, 2]]))
    q = torch.randn(1, 2, 2, 1, 8)  # (B, H, G, Tq = 1, D)
    out, probs = cache.attend(0, q)
    assert probs is None and out.shape == q.shape
    for h in range(2):
        w = torch.softmax(q[0, h, :, 0] @ k[0, h, kept[h]].T / 8 ** 0.5, dim=-1)  # (G, K)
        assert torch.allclose(out[0, h, :, 0], w @ v[0, h, kept[h]], atol=1e-6)


def test_append_grows_past_capacity_and_keeps_positions():
    """Appending past a head's spare rows re-packs the layer; every token and position survives."""
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4, slack=1)
    cache.prefill(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    cache.keep(0, torch.tensor([[[0, 2], [1, 1]]]), torch.tensor([[2, 1]]))
    for step in range(5):
        cache.append(0, torch.full((1, 2, 1, 4), float(step)), torch.zeros(1, 2, 1, 4))
    assert cache.length[0].tolist() == [[7, 6]] and cache.seen == 8
    assert held(cache, 0, 0, 0) == [0, 2, 3, 4, 5, 6, 7]
    assert held(cache, 0, 0, 1) == [1, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("impl", ["v1"] + kernel_impls()[:1])
def test_appending_a_chunk_equals_appending_its_tokens_one_by_one(impl):
    """One append of T tokens holds the rows of T one-token appends; each token attends as its decode step did."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    new_k, new_v, q = (torch.randn(2, 3, *shape, generator=g) for shape in ((5, 8), (5, 8), (2, 5, 8)))
    kept = torch.tensor([[[0, 4, 8], [1, 2, 0], [5, 0, 0]], [[3, 6, 0], [0, 1, 2], [7, 0, 0]]])  # (B, H, K)
    caches, outs = [], []
    for chunked, cache_impl in ((False, "v1"), (True, "v1"), (True, impl)):
        dev = "cpu" if cache_impl == "v1" or kernels.INTERPRET else "cuda"  # v3 runs where Triton does
        cache = KVCache(n_layer=1, n_kv_head=3, head_dim=8, batch_size=2, device=dev, slack=2, impl=cache_impl)
        cache.prefill(0, k.to(dev), v.to(dev))
        cache.keep(0, kept, torch.tensor([[3, 2, 1], [2, 3, 1]]))  # skewed lengths; 5 new rows overflow 2 spare
        if chunked:
            cache.append(0, new_k.to(dev), new_v.to(dev))
            out = cache.attend(0, q.to(dev))[0]
        else:
            out = []
            for t in range(5):
                cache.append(0, new_k[:, :, t:t + 1], new_v[:, :, t:t + 1])
                out.append(cache.attend(0, q[:, :, :, t:t + 1])[0])
            out = torch.cat(out, dim=3)  # (B, H, G, 5, D)
        caches.append(cache)
        outs.append(out.cpu())
    stepped = caches[0]
    for cache, out in zip(caches[1:], outs[1:]):
        assert cache.seen == stepped.seen == 14 and torch.equal(cache.length.cpu(), stepped.length)
        assert torch.equal(cache.kept_mask(0, 14).cpu(), stepped.kept_mask(0, 14))
        for b in range(2):
            for h in range(3):
                assert held(cache, 0, b, h) == held(stepped, 0, b, h), (b, h)
                s, n, s1 = int(cache.start[0, b, h]), int(cache.length[0, b, h]), int(stepped.start[0, b, h])
                assert torch.equal(cache.k[0][s:s + n].cpu(), stepped.k[0][s1:s1 + n]), (b, h)
        assert torch.allclose(out, outs[0], atol=1e-6), diff(out, outs[0])


def test_evict_by_score_keeps_the_top_tokens_with_sink_and_window():
    """cache.evict keeps each head's highest-scoring tokens plus sink and window; ties go to the later token."""
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4)
    cache.prefill(0, torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4))
    scores = torch.tensor([[[0., 9, 1, 8, 1, 1, 7, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]])
    cache.evict(0, scores, torch.tensor([[5, 4]]), sink=1, window=1)
    assert held(cache, 0, 0, 0) == [0, 1, 3, 6, 9]  # sink 0, window 9, best 1, 3, 6
    assert held(cache, 0, 0, 1) == [0, 7, 8, 9]  # all tied: the most recent win
    assert cache.nbytes() == 2 * 9 * 4 * 4


def test_kept_mask_follows_keep_evict_and_append():
    """kept_mask marks the positions a head holds after keep, evict (positions kept) and appends (past T only)."""
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4, slack=1)
    cache.prefill(0, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    cache.keep(0, torch.tensor([[[1, 3, 5, 7], [0, 2, 4, 6]]]))  # 4 rows each: evict may follow
    assert cache.kept_mask(0, 8).int().tolist() == [[[0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0, 1, 0]]]
    cache.evict(0, torch.tensor([[[0., 9, 0, 9], [9, 0, 0, 9]]]), torch.tensor([[2, 2]]))
    assert held(cache, 0, 0, 0) == [3, 7] and held(cache, 0, 0, 1) == [0, 6], "evict keeps original positions"
    for _ in range(3):
        cache.append(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # positions 8, 9, 10 (re-packs)
    assert cache.kept_mask(0, 8).nonzero()[:, 1:].tolist() == [[0, 3], [0, 7], [1, 0], [1, 6]]
    assert cache.kept_mask(0, 11)[0, :, 8:].all() and cache.kept_mask(0, 11).sum() == 10


def test_clone_and_repeat_are_independent_copies():
    """clone and repeat copy every field (repeat row i * B + b is row b) and share no storage with the original."""
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache(2)
        model(idx, cache=cache)
        keys = [cache.keys(l, b).clone() for l in range(2) for b in range(2)]
        copy, batch = cache.clone(), cache.repeat(3)
        assert batch.B == 6 and batch.seen == copy.seen == 20
        assert all(torch.equal(batch.keys(l, 2 * i + b), cache.keys(l, b)) for l in range(2) for b in range(2)
                   for i in range(3))
        counts = torch.tensor([[3, 20], [5, 7], [20, 20], [20, 20], [20, 20], [20, 20]])
        for l in range(2):
            copy.evict(l, torch.rand(2, 2, 20), counts[:2])
            batch.evict(l, torch.rand(6, 2, 20), counts)
        step = torch.ones(6, 1, dtype=torch.long)
        after = model(step, cache=batch)  # (6, 1, V) rows 2..5 hold the full cache
        assert cache.length.eq(20).all() and cache.seen == 20
        assert all(torch.equal(cache.keys(l, b), keys[2 * l + b]) for l in range(2) for b in range(2))
        assert torch.allclose(after[2:4], after[4:6]), "two untouched copies decode alike"
        assert torch.allclose(after[2:4], model(step[:2], cache=cache), atol=1e-6), "and like the original"


@pytest.mark.parametrize("idx, counts, message", [
    (torch.tensor([[[0, -1], [0, 1]]]), None, "lie in"),
    (torch.tensor([[[1, 1], [0, 1]]]), None, "distinct"),
    (torch.tensor([[0, 1]]), None, "shape"),
    (torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[2, 3]]), "between 0 and its length"),
    (torch.tensor([[[0, 9], [0, 1]]]), None, "lie in"),
    (torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]), None, "integer"),
])
def test_keep_refuses_bad_indices(idx, counts, message):
    """Negative, duplicate, out-of-range or mis-shaped kept indices raise a clear ValueError."""
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4)
    cache.prefill(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=message):
        cache.keep(0, idx, counts)


def test_cache_refuses_unknown_impl_and_wrong_shapes():
    """The constructor lists the known impls for an unknown one; prefill, append and evict say what they expected."""
    with pytest.raises(ValueError, match=r"\['v1', 'v2', 'v3'\]"):
        KVCache(n_layer=1, n_kv_head=2, head_dim=4, impl="reference")
    cache = KVCache(n_layer=1, n_kv_head=2, head_dim=4)
    with pytest.raises(ValueError, match=r"prefill expects k, v \(B=1, H=2, T >= 1, D=4\)"):
        cache.prefill(0, torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4))
    cache.prefill(0, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="append expects"):
        cache.append(0, torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="append expects"):  # v must match k
        cache.append(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 2, 4))
    cache.keep(0, torch.tensor([[[0, 1], [0, 0]]]), torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="use keep"):
        cache.evict(0, torch.rand(1, 2, 2), torch.tensor([[1, 1]]))


# -----------------------------------------------------------------------------
# generation: one greedy decoder, a stop rule per row


def test_generate_finishes_each_row_on_its_own():
    """A row ends before a stop id or at done(), gets nothing after, and decodes alone as it does in a batch."""
    model = tiny_model(tie_embeddings=False)
    prompts = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    free = model.generate(prompts, 10)  # no rule: 10 tokens per row
    assert [len(r) for r in free] == [10, 10, 10]
    stop, last = free[0][3], free[1][1]  # row 0 stops before its 4th token; done() takes row 1's 2nd
    assert stop not in free[0][:3] and last not in free[1][:1], "pick another seed: the rule fires early"

    def expected(row):
        for i, token in enumerate(row):
            if token == stop:
                return row[:i]
            if token == last:
                return row[:i + 1]
        return row

    def done(ids):
        return ids[-1] == last

    batch = model.generate(prompts, 10, stop_ids=[stop], done=done)
    alone = [model.generate(prompts[b:b + 1], 10, stop_ids=[stop], done=done)[0] for b in range(3)]
    assert batch == alone == [expected(r) for r in free], (batch, alone, free)
    assert [len(r) for r in batch] == [3, 2, 10] and stop not in batch[0] and batch[1][-1] == last


def test_generate_feeds_the_cache_and_the_probe():
    """generate prefills or continues the cache and feeds back every step's token (the probe sees each one)."""
    model = tiny_model(tie_embeddings=False)  # untied, weights 4x the init's: its tokens depend on what the cache holds
    for p in model.parameters():
        if p.dim() == 2:
            p.data.mul_(4)
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(7))
    cache, probe = model.new_cache(1), Probe(decode=True)
    first = model.generate(idx[:, :15], 0, cache=cache)
    assert first == [[]] and cache.seen == 15 and probe.decode_attn == []
    out = model.generate(idx[:, 15:], 4, cache=cache, probe=probe)[0]
    assert len(out) == 4 and cache.seen == 24 and len(probe.decode_attn) == 5 + 4
    assert out == model.generate(idx, 4)[0] != model.generate(idx[:, 15:], 4)[0]  # the cache's 15 tokens count
