"""Tests of the project: model and cache, tasks and tokenizer, trainer, LU-KV solver and pipeline.

    python -m pytest -q test_lukv.py
"""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import composite

import lukv
import tasks
from lukv import LUKVConfig, allocate, compress, loss_curve, lower_convex_hull
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


def test_a_chunk_after_the_prompt_equals_one_token_at_a_time():
    """Feeding a question as one chunk through a compressed cache gives the logits, cache rows and oracle
    probe steps of feeding it token by token (the chunk's causal mask is the decode loop's)."""
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
        for h in range(2):
            assert torch.equal(ca.kept_positions(l, 1, h), cb.kept_positions(l, 1, h))
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
    assert cache.nbytes(allocated=True) == 2 * (n + 4 * 2) * 4 * 4 <= before
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
    """The kernel paths to hold against the v1 reference: v3 (CUDA, or TRITON_INTERPRET=1, which conftest.py
    sets without CUDA) and v2 (torch.compile; slow to compile, so only with --run-slow)."""
    import kernels
    ok = kernels.HAVE_TRITON and (torch.cuda.is_available() or kernels.INTERPRET)
    v3 = "v3" if ok else pytest.param("v3", marks=pytest.mark.skip("v3 needs CUDA or TRITON_INTERPRET=1"))
    return [v3, pytest.param("v2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl", _kernel_impls())
def test_kernel_backed_cache_agrees_with_reference(impl):
    """The model decodes the same logits and keeps the same tokens through kernels.py's v2 / v3 (evict, append,
    attend) as through the v1 reference on the CPU."""
    import kernels
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
        logits.append(torch.cat(steps, dim=1).cpu())
        caches.append(cache)
    assert torch.allclose(logits[0], logits[1], atol=1e-4 if dev == "cuda" else 1e-5), diff(logits[0], logits[1])
    for l in range(model.cfg.n_layer):
        assert torch.equal(caches[0].length[l], counts + 5) and torch.equal(caches[1].length[l].cpu(), counts + 5)
        for b in range(2):
            for h in range(2):
                assert torch.equal(caches[0].kept_positions(l, b, h), caches[1].kept_positions(l, b, h).cpu())


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
        lukv.load_tiny(path)  # 97-token toy model vs the real tokenizer: refused by size
    with pytest.raises(FileNotFoundError, match="train_tiny.py"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    enc = tasks.load_tokenizer(TOKENIZER)
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, mlp_hidden=16)
    small = GPT(cfg).eval()
    save_checkpoint(path, small, TOKENIZER, {})
    loaded, _, _ = lukv.load_tiny(path)
    x = torch.randint(0, enc.n_vocab, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(x), small.half().float()(x), atol=1e-5)
    with open(tmp_path / "tiny.tiktoken", "a") as f:
        f.write("QUJD 99999\n")  # the tokenizer beside it no longer matches the hash
    with pytest.raises(ValueError, match="sha256"):
        lukv.load_tiny(path)


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
    _, header = load_checkpoint(str(tmp_path / "b" / "tiny.pt"))
    meta = header["meta"]
    assert meta["steps"] == 6 and "train_tiny.py" in meta["command"]


def test_smoke_training_never_touches_the_shipped_files_and_refuses_another_configuration(tmp_path):
    """train_tiny.py --smoke, run as the README says, writes under runs/tiny and leaves checkpoints/ as it
    was; a tiny.pt of another configuration in --out is refused before any step, and left as it was."""
    shipped = {name: lukv.file_id(os.path.join(HERE, "checkpoints", name)) for name in ("tiny.pt", "tiny.tiktoken")}
    cmd = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--smoke", "--tokenizer", TOKENIZER,
           "--max-steps", "1", "--eval-every", "1000"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(tmp_path))
    assert (tmp_path / "runs" / "tiny" / "tiny.pt").exists()
    assert shipped == {name: lukv.file_id(os.path.join(HERE, "checkpoints", name)) for name in shipped}
    other = tmp_path / "other"
    other.mkdir()
    save_checkpoint(str(other / "tiny.pt"), tiny_model(), TOKENIZER, {"command": "another run"})
    before = lukv.file_id(str(other / "tiny.pt"))
    run = subprocess.run(cmd + ["--out", str(other)], capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode != 0 and "another configuration" in run.stderr, run.stderr
    assert lukv.file_id(str(other / "tiny.pt")) == before


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
    path = str(tmp_path / "p.npy")
    with pytest.raises(ValueError, match="a profile is a .npy file"):
        lukv.save_profile(str(tmp_path / "p.npz"), np.zeros((99, 2, 2)), {})
    lukv.save_profile(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "abc", cfg))
    with pytest.raises(ValueError, match="scorer 'snapkv', not 'keydiff'"):
        lukv.load_profile(path, "keydiff", "abc", (2, 2), cfg)
    with pytest.raises(ValueError, match=r"another model \(id 'abc'; this one is 'other'\)"):
        lukv.load_profile(path, "snapkv", "other", (2, 2), cfg)
    with pytest.raises(ValueError, match="sink 4, not 2"):
        lukv.load_profile(path, "snapkv", "abc", (2, 2), LUKVConfig(sink=2))
    with pytest.raises(ValueError, match="window 16, not 1"):
        lukv.load_profile(path, "snapkv", "abc", (2, 2), LUKVConfig(window=1))
    with pytest.raises(ValueError, match="shape"):
        lukv.load_profile(path, "snapkv", "abc", (3, 2), cfg)
    with pytest.raises(FileNotFoundError, match="--profile"):
        lukv.load_profile(str(tmp_path / "none.npy"), "snapkv", "abc", (2, 2), cfg)
    with pytest.raises(ValueError, match="SnapKV window 16, not 64"):
        lukv.load_profile(path, "snapkv", "abc", (2, 2), LUKVConfig(snap_window=64))
    lukv.save_profile(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "abc", LUKVConfig(snap_window=64)))
    assert lukv.load_profile(path, "snapkv", "abc", (2, 2), LUKVConfig(snap_window=64))[1]["snap_window"] == 64
    with pytest.raises(ValueError, match="SnapKV window 64, not 16"):  # every profile_meta records the window
        lukv.load_profile(path, "snapkv", "abc", (2, 2), cfg)


# -----------------------------------------------------------------------------
# the shipped checkpoint, its profiles, and the README's commands


@pytest.fixture(scope="module")
def shipped():
    return lukv.load_tiny(CHECKPOINT)


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
    model, cfg = shipped[0], LUKVConfig()
    model_id, shape = lukv.file_id(CHECKPOINT), (model.cfg.n_layer, model.cfg.n_kv_head)
    for name in ["snapkv", "keydiff", "knorm", "expected_attention", "oracle", "taskloss_snapkv"]:
        table, meta = lukv.load_profile(lukv.profile_path(CHECKPOINT, name), name.removeprefix("taskloss_"),
                                        model_id, shape, cfg)
        assert table.shape == (99, model.cfg.n_layer, model.cfg.n_kv_head)
        means = table.mean(axis=(1, 2))
        assert np.allclose(means[:90], np.arange(1, 91) / 100, atol=0.01), (name, means[:90])
        assert (np.diff(table, axis=0) >= -1e-6).all(), f"{name}: rows are not nested"


# -----------------------------------------------------------------------------
# known answers for the exercises (EXERCISES.md): scorers, baselines, knockout
