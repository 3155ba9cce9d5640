"""Tests of the project: model and cache, tasks and tokenizer, trainer, LU-KV solver and pipeline.

    python -m pytest -q test_lukv.py
"""
import os
import random
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import composite

import lukv
import tasks
from lukv import (LUKVConfig, allocate, compress, dp_exact, greedy_budget_table, greedy_evictions,
                  largest_remainder, loss_curve, lower_convex_hull, pava_slopes, relaxed_loss, true_loss)
from model import GPT, GPTConfig, KVCache, Probe, load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "checkpoints", "tiny.tiktoken")
CHECKPOINT = os.path.join(HERE, "checkpoints", "tiny.pt")


def tiny_model(seed=0, n_kv_head=2):
    """A random 2-layer GQA model (4 query heads over 2 KV heads) for fast CPU tests."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, block_size=256, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                    mlp_hidden=64)
    return GPT(cfg).eval()


def diff(a, b):
    d = (a - b).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


# -----------------------------------------------------------------------------
# model and KV cache


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_cached_decode_matches_uncached_forward(n_kv_head):
    """Prefill + one-token-at-a-time decoding gives the uncached forward's logits (float tolerance)."""
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, slack=3)  # small slack: the decode re-packs several times
        stepped = torch.cat([model(idx[:, :20], cache=cache), model(idx[:, 20:], cache=cache)], dim=1)
    assert torch.allclose(stepped, full, atol=1e-5), diff(stepped, full)


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


@composite
def evictions(draw):
    """Per-head kept-slot sets for a (B=2, H=2, T) cache, any order, some empty or full."""
    T = draw(st.integers(1, 12))
    kept = [[draw(st.lists(st.integers(0, T - 1), unique=True, max_size=T)) for _ in range(2)] for _ in range(2)]
    return T, kept


@settings(max_examples=60, deadline=None)
@given(evictions())
def test_keep_holds_exactly_the_requested_tokens_in_order(case):
    """After keep, each head holds exactly the requested tokens in ascending order, its length is their
    count, and the bytes (used and allocated) shrink to match."""
    T, kept = case
    cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, mlp_hidden=8)
    cache = KVCache(cfg, 2, slack=2)
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
    assert cache.nbytes(allocated=True) == 2 * (n + 4 * 2) * 4 * 4 <= before + 0 * n
    for b in range(2):
        for h in range(2):
            want = sorted(kept[b][h])
            assert cache.kept_positions(0, b, h).tolist() == want
            rows = cache.k[0][cache.start[0, b, h]:cache.start[0, b, h] + len(want)]
            assert torch.equal(rows, k[b, h, want]), f"head ({b},{h}) holds other keys than requested"


def test_attend_after_eviction_equals_attention_over_kept_rows():
    """Decode attention over an evicted cache equals plain softmax attention over each head's kept keys."""
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    cache.prefill(0, k, v)
    kept = [torch.tensor([0, 3, 7, 19]), torch.tensor([5, 6])]
    idx = torch.zeros(1, 2, 4, dtype=torch.long)
    idx[0, 0], idx[0, 1, :2] = kept[0], kept[1]
    cache.keep(0, idx, torch.tensor([[4, 2]]))
    q = torch.randn(1, 2, 2, 8)
    out, _ = cache.attend(0, q)
    for h in range(2):
        w = torch.softmax(q[0, h] @ k[0, h, kept[h]].T / 8 ** 0.5, dim=-1)  # (G, K)
        assert torch.allclose(out[0, h], w @ v[0, h, kept[h]], atol=1e-6)


def test_append_grows_past_capacity_and_keeps_positions():
    """Appending past a head's spare rows re-packs the layer; every token and position survives."""
    cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, mlp_hidden=8)
    cache = KVCache(cfg, 1, slack=1)
    cache.prefill(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    cache.keep(0, torch.tensor([[[0, 2], [1, 1]]]), torch.tensor([[2, 1]]))
    for step in range(5):
        cache.append(0, torch.full((1, 2, 4), float(step)), torch.zeros(1, 2, 4))
    assert cache.length[0].tolist() == [[7, 6]]
    assert cache.kept_positions(0, 0, 0).tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert cache.kept_positions(0, 0, 1).tolist() == [1, 3, 4, 5, 6, 7]


def _kernel_impls():
    """kernels.py paths that can run here: v1 always, v3 on CUDA or under TRITON_INTERPRET=1."""
    import kernels
    ok = kernels.HAVE_TRITON and (torch.cuda.is_available() or kernels.INTERPRET)
    return ["v1", "v3"] if ok else ["v1", pytest.param("v3", marks=pytest.mark.skip(
        "v3 needs CUDA or TRITON_INTERPRET=1 (the kernel tests set it)"))]


@pytest.mark.parametrize("impl", _kernel_impls())
def test_kernel_backed_cache_agrees_with_reference(impl):
    """The model decodes the same logits through kernels.py (evict, append, attend) as through the reference."""
    import kernels
    dev = "cpu" if impl == "v1" or kernels.INTERPRET else "cuda"  # v3 runs where Triton does
    model = tiny_model(n_kv_head=2).to(dev)
    torch.manual_seed(3)
    idx, scores = torch.randint(0, 97, (2, 40), device=dev), torch.rand(2, model.cfg.n_layer, 2, 40)  # (B, L, H, T)
    counts = torch.tensor([[7, 19], [12, 40]])  # per (b, h): skewed, one head keeps everything
    logits, caches = [], []
    for cache_impl in ("reference", impl):
        cache = model.new_cache(2, slack=2, impl=cache_impl)  # slack 2: the decode re-packs on the way
        with torch.no_grad():
            model(idx, cache=cache)
            for l in range(model.cfg.n_layer):
                cache.evict(l, scores[:, l], counts, sink=2, window=3)
            steps = [model(idx[:, -1:] * 0 + t, cache=cache) for t in range(5)]  # 5 decode steps
        logits.append(torch.cat(steps, dim=1))
        caches.append(cache)
    assert torch.allclose(logits[0], logits[1], atol=1e-4 if dev == "cuda" else 1e-5), diff(logits[0], logits[1])
    for l in range(model.cfg.n_layer):
        assert torch.equal(caches[0].length[l].cpu(), counts + 5)
        for b in range(2):
            for h in range(2):
                assert torch.equal(caches[0].kept_positions(l, b, h), caches[1].kept_positions(l, b, h))


def test_evict_by_score_keeps_the_top_tokens_with_sink_and_window():
    """cache.evict keeps each head's highest-scoring tokens plus sink and window; ties go to the later token."""
    cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    cache.prefill(0, torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4))
    scores = torch.tensor([[[0., 9, 1, 8, 1, 1, 7, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]])
    cache.evict(0, scores, torch.tensor([[5, 4]]), sink=1, window=1)
    assert cache.kept_positions(0, 0, 0).tolist() == [0, 1, 3, 6, 9]  # sink 0, window 9, best 1, 3, 6
    assert cache.kept_positions(0, 0, 1).tolist() == [0, 7, 8, 9]  # all tied: the most recent win
    assert cache.nbytes() == 2 * 9 * 4 * 4


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
    cfg = GPTConfig(vocab_size=10, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    cache.prefill(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=message):
        cache.keep(0, idx, counts)


def test_prompt_longer_than_context_is_refused():
    """A prompt past block_size names both lengths instead of indexing out of the RoPE table."""
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        model(torch.zeros(1, 300, dtype=torch.long))


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    """A saved checkpoint loads back to the same outputs; missing, corrupt or mismatched files say what is wrong."""
    model = tiny_model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, TOKENIZER, {"command": "test"})
    with pytest.raises(ValueError, match="tokens, the checkpoint expects 97"):
        load_checkpoint(path)  # 97-token toy model vs the real tokenizer: refused by size
    with pytest.raises(FileNotFoundError, match="train_tiny.py"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    enc = tasks.load_tokenizer(TOKENIZER)
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, mlp_hidden=16)
    small = GPT(cfg).eval()
    save_checkpoint(path, small, TOKENIZER, {})
    loaded, _, _ = load_checkpoint(path)
    x = torch.randint(0, enc.n_vocab, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(x), small.half().float()(x), atol=1e-5)
    with open(tmp_path / "tiny.tiktoken", "a") as f:
        f.write("QUJD 99999\n")  # the tokenizer beside it no longer matches the hash
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(path)


# -----------------------------------------------------------------------------
# tokenizer and tasks


@pytest.fixture(scope="module")
def enc():
    return tasks.load_tokenizer(TOKENIZER)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trip_on_any_text(enc, text):
    """Any unicode text, including bytes the BPE never saw, decodes back to itself."""
    assert enc.decode(enc.encode_ordinary(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100))
def test_tokenizer_round_trip_on_any_bytes(enc, data):
    """Arbitrary bytes survive encode -> decode_bytes (byte-level BPE has no unknown token)."""
    text = data.decode("utf-8", errors="surrogateescape")
    assert enc.decode_bytes(enc.encode_ordinary(text.encode("utf-8", "surrogateescape").decode("latin-1"))) \
        .decode("utf-8").encode("latin-1") == data


def test_task_anchors_are_single_tokens(enc):
    """Every key, value, name and coded word is one token: the anchors a tiny model copies."""
    words = tasks.NAMES + tasks.CITIES + tasks.KEYS + tasks.CWE_WORDS + tasks.CODED + tasks.VAR_NAMES
    numbers = [str(n) for n in range(100, 1000)]
    long = [w for w in words + numbers if len(enc.encode_ordinary(" " + w)) != 1]
    assert not long, f"multi-token anchors: {long[:10]}"


def test_bpe_training_is_deterministic_and_round_trips(tmp_path):
    """Training the BPE twice on the same text gives the same ranks, which tiktoken loads and round-trips."""
    text = tasks.tokenizer_corpus(seed=5, n_docs=8)[:20000]
    a, b = tasks.train_bpe(text, 400), tasks.train_bpe(text, 400)
    assert a == b and len(a) == 400
    tasks.save_ranks(a, tmp_path / "t.tiktoken")
    enc = tasks.load_tokenizer(tmp_path / "t.tiktoken")
    assert enc.decode(enc.encode_ordinary(text[:3000])) == text[:3000]


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_generators_are_deterministic_and_answers_recoverable(family, enc):
    """The same seed gives the same examples, and a rule-based reader recovers every answer from its context."""
    a = tasks.example_set(family, 3, 512, seed=7)
    assert a == tasks.example_set(family, 3, 512, seed=7)
    rng = random.Random(family)
    for length in (512, 1024, 4096):
        ex = tasks.make_example(family, rng, length, n_questions=5)
        n = len(enc.encode_ordinary(ex.context))
        assert 0.75 * length <= n <= 1.15 * length, f"{family}: asked {length} tokens, got {n}"
        for q, ans in ex.qa:
            got = tasks.solve(family, ex.context, q)
            assert tasks.exact_match(family, got, ans), f"{family}: {q!r} -> {got!r}, expected {ans!r}"


def test_every_qa_answer_is_the_only_word_after_its_prompt():
    """In a qa context, each answer prompt's words are followed by the answer and by no other word (one answer per question)."""
    rng = random.Random("unique")
    for _ in range(20):
        ex = tasks.make_example("qa", rng, 1024, 40)
        for q, ans in ex.qa:
            found = set(tasks.qa_answers(ex.context, q))  # both sentences of an event repeat "Tom bought a chair"
            assert found == {ans.strip()}, (q, found, ans)


def test_events_of_a_context_differ_in_verb_and_object():
    """No two events of a qa context share a verb or an object, and " near" comes only before event cities."""
    rng = random.Random("distinct")
    for _ in range(50):
        cast = tasks.make_cast(rng, rng.randint(4, 7))
        events = tasks.make_events(rng, cast, len(cast))
        assert len({e.verb for e in events}) == len({e.obj for e in events}) == len(events) == len(cast), events
        sentences, _ = tasks.prose_sentences(rng, 600, cast, events)
        near_sentences = [s for s in sentences if " near " in s]
        assert sorted(near_sentences) == sorted(tasks.event_sentences(e)[1] for e in events)


def test_more_events_than_verbs_raise():
    """Asking for more events than there are verbs raises a ValueError that names the limit."""
    cast = tasks.make_cast(random.Random(0), len(tasks.VERBS) + 2)
    with pytest.raises(ValueError, match=f"at most {len(tasks.VERBS)} events"):
        tasks.make_events(random.Random(0), cast, len(cast))


def test_every_qa_question_has_a_kind():
    """question_kind names every calibration question, and all seven kinds occur (the per-kind accuracy is complete)."""
    rng = random.Random("kinds")
    kinds = [tasks.question_kind(q) for _ in range(20) for q, _ in tasks.make_example("qa", rng, 512, 30).qa]
    assert "other" not in kinds and set(kinds) == set(tasks.QA_KINDS.values())


def test_unknown_family_and_short_length_are_refused():
    """Bad task requests name what is accepted."""
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.make_example("nope", random.Random(0), 512)
    with pytest.raises(ValueError, match="at least 64"):
        tasks.make_example("vt", random.Random(0), 10)


# -----------------------------------------------------------------------------
# trainer


def run_train(out, *extra):
    cmd = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--smoke", "--out", str(out), "--tokenizer", TOKENIZER,
           "--max-steps", "6", "--eval-every", "1000", *extra]
    subprocess.run(cmd, check=True, capture_output=True, cwd=HERE)


def test_training_resumes_exactly(tmp_path):
    """Six steps in one call and three + three steps in two calls give bit-identical weights."""
    run_train(tmp_path / "a")
    run_train(tmp_path / "b", "--chunk-steps", "3")
    assert not (tmp_path / "b" / "tiny.pt").exists()
    run_train(tmp_path / "b", "--chunk-steps", "3")
    a = torch.load(tmp_path / "a" / "resume.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "resume.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resuming"
    model, _, meta = load_checkpoint(str(tmp_path / "b" / "tiny.pt"))
    assert meta["steps"] == 6 and "train_tiny.py" in meta["command"]


# -----------------------------------------------------------------------------
# LU-KV pipeline: oracle, scorers, allocation, compression


def test_oracle_importance_equals_brute_force():
    """run_full's oracle (decode path) equals max over steps and group heads of ||a * v @ W_O[q]||
    computed from the uncached forward's attention (the other code path)."""
    model = tiny_model(seed=3)
    ctx, q = torch.randint(0, 97, (30,)).tolist(), torch.randint(0, 97, (5,)).tolist()
    cfg = LUKVConfig(sink=1, window=2, horizon=4, normalise_values=False)
    cache, probe, answer, imp = lukv.run_full(model, ctx, q, cfg, 4, stop_token=None)
    seq = ctx + q + answer[:-1]  # every token the decode fed
    p = Probe(query_pos=torch.arange(len(ctx), len(seq)), keep_values=True)
    with torch.no_grad():
        model(torch.tensor([seq]), probe=p)
    brute = torch.zeros_like(imp)
    for l in range(2):
        a = p.prefill_attn[l][0][..., :30]  # (H, G, S, T)
        w = model.o_proj_heads(l)  # (H, G, C, D)
        v = p.values[l][0][:, :30]  # (H, T, D)
        contrib = torch.einsum("hgcd,htd->hgtc", w, v).norm(dim=-1)  # (H, G, T)
        brute[l] = (a * contrib[:, :, None]).amax(dim=(1, 2)).detach()
    assert torch.allclose(imp, brute, rtol=1e-4, atol=1e-8), diff(imp, brute)


def prefilled(T=40, seed=0):
    model = tiny_model(seed)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, T)), cache=cache)
    return model, cache


def test_compress_keeps_each_heads_top_tokens_and_frees_memory():
    """compress keeps exactly the counts[l, h] highest-scored tokens (protected ones included) and the
    cache's bytes fall to the kept rows."""
    model, cache = prefilled()
    cfg = LUKVConfig(sink=2, window=3, min_share=0.0)
    scores = lukv.protect(torch.randn(2, 2, 40), cfg)
    counts = np.array([[5, 12], [40, 7]])
    full = cache.nbytes()
    keep = compress(cache, scores, counts)
    assert cache.length[:, 0].tolist() == counts.tolist()
    assert cache.nbytes() == full * counts.sum() / (2 * 2 * 40)
    for l in range(2):
        for h in range(2):
            want = torch.sort(torch.topk(scores[l, h], int(counts[l, h])).indices).values
            assert cache.kept_positions(l, 0, h).tolist() == want.tolist()
            assert keep[l, h].nonzero().flatten().tolist() == want.tolist()
            assert set(range(2)) | set(range(37, 40)) <= set(want.tolist())


@pytest.mark.parametrize("allocator", ["uniform", "pyramid", "adakv", "lukv", "oracle", "shuffled"])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9])
def test_every_allocator_keeps_the_same_total_above_floors(allocator, ratio):
    """All allocators keep round((1 - ratio) * L * H * T) tokens in total and every head keeps its floor."""
    L, H, T = 3, 4, 300
    cfg = LUKVConfig()
    g = torch.Generator().manual_seed(0)
    scores = lukv.protect(torch.rand(L, H, T, generator=g), cfg)
    imp = torch.rand(L, H, T, generator=g) ** 4
    profile = np.random.default_rng(0).uniform(0, 1, (99, L, H))
    profile = np.clip(profile * (np.arange(1, 100) / 100)[:, None, None] / profile.mean(axis=(1, 2))[:, None, None], 0, 0.9)
    counts = allocate(allocator, ratio, scores, cfg, profile, imp)
    assert counts.shape == (L, H)
    assert counts.sum() == round((1 - ratio) * L * H * T), (allocator, counts.sum())
    assert (counts >= cfg.floor(T)).all() and (counts <= T).all()


def test_lukv_allocation_follows_the_profile_row():
    """The lukv allocator gives each head its profiled share of the ratio's row (up to rounding)."""
    L, H, T = 2, 2, 1000
    profile = np.zeros((99, L, H))
    profile[79] = [[0.95, 0.95], [0.9, 0.4]]  # mean 0.8
    counts = allocate("lukv", 0.8, torch.zeros(L, H, T), LUKVConfig(), profile)
    assert counts.tolist() == [[50, 50], [100, 600]]


def test_oracle_allocation_never_loses_more_than_uniform_relaxed():
    """Per input, the oracle allocator's true loss is at most uniform's plus one head's hull gap."""
    L, H, T = 2, 3, 200
    cfg = LUKVConfig(min_share=0.0)
    g = torch.Generator().manual_seed(1)
    scores = lukv.protect(torch.rand(L, H, T, generator=g), cfg)
    imp = torch.rand(L, H, T, generator=g) ** 6 * torch.tensor([1.0, 5.0, 0.1]).view(1, H, 1)
    curves, floors, _ = lukv.head_curves(imp, scores, cfg)
    gap = max(float(np.max(c - lower_convex_hull(c)[0])) for c in curves)
    losses = {}
    for name in ("uniform", "oracle"):
        counts = allocate(name, 0.8, scores, cfg, imp=imp)
        losses[name] = float((imp * ~lukv.compress(_dummy_cache(L, H, T), scores, counts)).sum())
    assert losses["oracle"] <= losses["uniform"] + gap + 1e-9, losses


def _dummy_cache(L, H, T):
    cfg = GPTConfig(vocab_size=10, block_size=T, n_layer=L, n_head=H, n_kv_head=H, n_embd=8 * H, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    for l in range(L):
        cache.prefill(l, torch.randn(1, H, T, 8), torch.randn(1, H, T, 8))
    return cache


def test_bad_method_inputs_are_refused(tmp_path):
    """Ratios outside [0, 1), NaN scores, empty contexts and profiles of another scorer/model/shape raise."""
    cfg = LUKVConfig()
    scores = torch.rand(2, 2, 100)
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            allocate("uniform", ratio, scores, cfg)
    with pytest.raises(ValueError, match="below the floor"):
        allocate("uniform", 0.99, scores, cfg)
    with pytest.raises(ValueError, match="unknown allocator"):
        allocate("best", 0.5, scores, cfg)
    with pytest.raises(ValueError, match="NaN"):
        loss_curve(np.array([np.nan, 1.0]), np.ones(2))
    with pytest.raises(ValueError, match="empty context"):
        lukv.run_full(tiny_model(), [], [1, 2], cfg, 2, None)
    path = str(tmp_path / "p.npz")
    lukv.save_profile(path, np.zeros((99, 2, 2)), {"scorer": "snapkv", "model": "abc"})
    with pytest.raises(ValueError, match="scorer 'snapkv', not 'keydiff'"):
        lukv.load_profile(path, "keydiff", "abc", 2, 2)
    with pytest.raises(ValueError, match="model abc"):
        lukv.load_profile(path, "snapkv", "other", 2, 2)
    with pytest.raises(ValueError, match="shape"):
        lukv.load_profile(path, "snapkv", "abc", 3, 2)
    with pytest.raises(FileNotFoundError, match="--profile"):
        lukv.load_profile(str(tmp_path / "none.npz"), "snapkv", "abc", 2, 2)
    with pytest.raises(ValueError, match="SnapKV window 16, not 64"):  # a profile without the field: the default
        lukv.load_profile(path, "snapkv", "abc", 2, 2, snap_window=64)
    lukv.save_profile(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "abc", LUKVConfig(snap_window=64)))
    assert lukv.load_profile(path, "snapkv", "abc", 2, 2, snap_window=64)[1]["snap_window"] == 64
    with pytest.raises(ValueError, match="SnapKV window 64, not 16"):  # every profile_meta records the window
        lukv.load_profile(path, "snapkv", "abc", 2, 2, snap_window=16)


def test_scorers_rank_every_token_and_protect_sink_and_window():
    """Each scorer returns finite (L, H, T) scores, with +inf exactly on sink and window tokens."""
    model = tiny_model()
    cfg = LUKVConfig(sink=2, window=3, snap_window=4)
    cache, probe, _, imp = lukv.run_full(model, list(range(30)), [1, 2], cfg, 2, None)
    for name in ("snapkv", "keydiff", "knorm", "streaming", "oracle"):
        s = lukv.scores_for(name, cache, probe, imp, cfg)
        assert s.shape == (2, 2, 30)
        assert torch.isinf(s[..., :2]).all() and torch.isinf(s[..., -3:]).all()
        assert torch.isfinite(s[..., 2:-3]).all()


# -----------------------------------------------------------------------------
# solver property tests (small, bounded, structured instances)

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


# -----------------------------------------------------------------------------
# the shipped checkpoint, its profiles, and the README's commands


@pytest.fixture(scope="module")
def shipped():
    model, enc, meta = load_checkpoint(CHECKPOINT)
    return model, enc, meta


def test_shipped_checkpoint_is_small_and_records_its_making(shipped):
    """The shipped checkpoint stays under 16 MB and records the command and data seed that made it."""
    model, enc, meta = shipped
    assert os.path.getsize(CHECKPOINT) < 16e6
    assert "train_tiny.py" in meta["command"] and "data_seed" in meta
    assert model.cfg.n_kv_head < model.cfg.n_head  # GQA: the cache is stored per KV head


def test_correct_only_calibration_keeps_exactly_the_right_answers(enc, monkeypatch):
    """--calib-correct-only keeps exactly the questions judged right, and refuses by name when none is."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          mlp_hidden=64)).eval()
    lines = []
    log = lambda done, total, text: lines.append(text)  # noqa: E731
    table = lukv.build_profile(model, enc, ["snapkv"], LUKVConfig(), 1, 4, 256, log=log)["snapkv"]
    assert table.shape == (99, 2, 2) and "(4 (context, question) tables" in lines[-1], lines[-1]
    verdicts = iter([True, False, False, True])  # the judge of the 4 calibration answers, in order
    monkeypatch.setattr(tasks, "exact_match", lambda *args: next(verdicts))
    lukv.build_profile(model, enc, ["snapkv"], LUKVConfig(correct_only=True), 1, 4, 256, log=log)
    assert "(2 (context, question) tables" in lines[-1], lines[-1]
    monkeypatch.setattr(tasks, "exact_match", lambda *args: False)
    with pytest.raises(RuntimeError, match="no calibration question was kept"):
        lukv.build_profile(model, enc, ["snapkv"], LUKVConfig(correct_only=True), 1, 4, 256, log=log)


def test_shipped_profiles_belong_to_the_shipped_model(shipped):
    """Every shipped profile has the kvpress layout, and its rows' mean prune ratio matches the row's ratio
    wherever the floors allow."""
    model = shipped[0]
    profiles = lukv.load_profiles(CHECKPOINT, model, lukv.PROFILE_SCORERS, required=True)
    for name, table in profiles.items():
        assert table.shape == (99, model.cfg.n_layer, model.cfg.n_kv_head)
        means = table.mean(axis=(1, 2))
        assert np.allclose(means[:90], np.arange(1, 91) / 100, atol=0.01), (name, means[:90])
        assert (np.diff(table, axis=0) >= -1e-6).all(), f"{name}: rows are not nested"


def test_compressed_evaluation_on_the_shipped_model(shipped):
    """At 80% compression every allocator keeps a fifth of the full cache's KV bytes, and keep-all
    (ratio 0) answers exactly as the full cache does."""
    model, enc, _ = shipped
    profiles = lukv.load_profiles(CHECKPOINT, model, ["snapkv"])
    methods = [("snapkv", a) for a in ("uniform", "pyramid", "adakv", "lukv")]
    res = lukv.evaluate(model, enc, profiles, ["niah_single", "qa"], [0.0, 0.8], methods, 1, 512, 5, LUKVConfig(),
                        log=lambda *a, **k: None)
    rows = res["rows"]
    for family in ("niah_single", "qa"):
        full_bytes = res["full_kv_bytes"]["agnostic"][family]
        kept = [r["kv_bytes"] for r in rows if r["ratio"] == 0.8 and r["family"] == family]
        # adakv rounds per layer, the others globally: a few rows apart at most
        assert len(kept) == 4 and all(abs(k / full_bytes - 0.2) < 0.005 for k in kept), (family, kept, full_bytes)
    for r in rows:
        if r["ratio"] == 0.0:
            assert r["accuracy"] == res["full"]["agnostic"][r["family"]], r


def test_ci_runs_the_readme_test_command():
    """.ci/run calls exactly the test command that README.md gives a new user."""
    readme = open(os.path.join(HERE, "README.md")).read()
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    command = "pip install -r requirements.txt -r requirements-hf.txt && python -m pytest -q"
    assert command in readme and command in ci.splitlines()


# -----------------------------------------------------------------------------
# known answers for the exercises (EXERCISES.md): scorers, baselines, knockout


def test_snapkv_and_keydiff_known_answer():
    """SnapKV sums the window's attention, averages the GQA group and max-pools; KeyDiff keeps the odd key out.

    snapkv: 1 layer, 1 KV head, 2 query heads, 2 observing positions, 7 tokens, pool width 3.
            query head 0 pays 0.8 to token 1 (first row) and 0.2 to token 4 (second row); query
            head 1 pays nothing: summed and averaged [0, .4, 0, 0, .1, 0, 0]; max over each
            3-wide neighbourhood -> [.4, .4, .4, .1, .1, .1, 0].
    keydiff: keys (1, 0), (1, 0), (0, 1); their mean direction is (2, 1) / sqrt(5), so the cosines
             are 2, 2, 1 over sqrt(5) and the scores their negatives: the third key ranks highest."""
    attn = torch.zeros(1, 1, 2, 2, 7)  # (B, H, G, w, T)
    attn[0, 0, 0, 0, 1], attn[0, 0, 0, 1, 4] = 0.8, 0.2
    probe = Probe(prefill_attn={0: attn})
    got = lukv.snapkv_scores(probe, LUKVConfig(snap_kernel=3))
    want = torch.tensor([[[0.4, 0.4, 0.4, 0.1, 0.1, 0.1, 0.0]]])
    assert torch.allclose(got, want, atol=1e-7), diff(got, want)
    cfg = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=2, mlp_hidden=8)
    cache = KVCache(cfg, 1)
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])  # (B, H, T, D)
    cache.prefill(0, keys, keys)
    got = lukv.keydiff_scores(cache)
    want = -torch.tensor([[[2.0, 2.0, 1.0]]]) / 5 ** 0.5
    assert torch.allclose(got, want, atol=1e-6), diff(got, want)


def test_pyramid_and_adakv_known_answer():
    """PyramidKV falls linearly from 2 * avg - avg / beta to avg / beta; AdaKV pools a layer's scores above a floor.

    pyramid: 3 layers, T = 100, ratio 0.5: the average budget is 50, the last layer keeps 50 / 20
             = 2.5 and the first 2 * 50 - 2.5 = 97.5 -> [97.5, 50, 2.5] for every head.
    adakv: 1 layer, 2 heads, T = 10, ratio 0.5, no sink/window/min share: each head's floor is
           int(0.2 * 5) = 1 token; the other 10 - 2 = 8 go to the layer's best remaining scores,
           which all belong to head 0 -> [9, 1]."""
    shares = lukv.pyramid_shares(3, 2, 100, 0.5)
    assert np.allclose(shares, [[97.5, 97.5], [50, 50], [2.5, 2.5]]), shares
    scores = torch.stack([torch.arange(10.0, 20.0), torch.arange(10.0)])[None]  # (L, H, T)
    counts = lukv.adakv_counts(scores, 0.5, LUKVConfig(sink=0, window=0, min_share=0.0))
    assert counts.tolist() == [[9, 1]]


def test_knockout_cuts_each_head_once_and_nothing_when_the_window_covers_the_context(shipped, monkeypatch):
    """knockout cuts exactly one head per run to sink + window (every head once per example); when sink +
    window covers the context nothing is cut and every head scores the full-cache accuracy."""
    enc = shipped[1]
    torch.manual_seed(0)  # a random 2-layer model over the real tokenizer: fast, and the pipeline is the same
    model = GPT(GPTConfig(vocab_size=shipped[0].cfg.vocab_size, block_size=512, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=32, mlp_hidden=64)).eval()
    calls, real_compress = [], lukv.compress

    def recording_compress(cache, scores, counts):
        calls.append(np.array(counts))
        return real_compress(cache, scores, counts)

    monkeypatch.setattr(lukv, "compress", recording_compress)
    quiet = dict(log=lambda *a, **k: None)
    acc = lukv.knockout(model, enc, ["niah_single", "vt"], 2, 64, 5, LUKVConfig(), **quiet)
    assert acc.shape == (2, 2, 2) and ((acc >= 0) & (acc <= 1)).all(), acc
    assert len(calls) == 2 * 2 * 2 * 2, f"expected one run per (family, example, layer, head), got {len(calls)}"
    cut = []
    for c in calls:
        T = int(c.max())
        assert (c != T).sum() == 1 and c.min() == 4 + 16, f"expected one head cut to sink + window, got {c.tolist()}"
        cut.append(tuple(np.argwhere(c != T)[0]))
    assert sorted(cut) == sorted([(l, h) for l in range(2) for h in range(2)] * 4), cut
    wide = LUKVConfig(window=10_000)
    acc = lukv.knockout(model, enc, ["niah_single"], 1, 64, 5, wide, **quiet)
    full = lukv.evaluate(model, enc, {}, ["niah_single"], [], [], 1, 64, 5, wide, **quiet)["full"]["agnostic"]
    assert (acc == full["niah_single"]).all(), (acc[..., 0], full)
