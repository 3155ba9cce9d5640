"""Tests of the method in lukv.py: the oracle, the bridge to the solver, profiling, allocation,
compression through the eviction kernel, and the evaluation of one example.

    python -m pytest -q test_lukv.py

The solver's own properties (hull, greedy, DP, rounding, the fast twin) are in tests/test_solver.py;
the model and its cache in tests/test_model.py; scorers and baselines in tests/test_scorers.py.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lukv
import solver
import tasks
from lukv import LUKVConfig, Method, allocate, compress
from model import GPT, GPTConfig, KVCache, Probe

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "checkpoints", "tiny.pt")
QUIET = dict(log=lambda *a, **k: None)


def tiny_model(seed=0, n_kv_head=2, tie_embeddings=True, vocab_size=97, block_size=512):
    """A random 2-layer GQA model (4 query heads over n_kv_head KV heads) for fast CPU tests; the tests in
    tests/ use it too. (Tied, its greedy decode repeats the last token; untied, it wanders.)"""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                    n_embd=32, mlp_hidden=64, tie_embeddings=tie_embeddings)
    return GPT(cfg).eval()


def diff(a, b):
    """How far two tensors are apart, for an assertion's message (any dtype, any device)."""
    d = (a.double().cpu() - b.double().cpu()).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}" if d.numel() else "empty"


def oracle_of(model, ctx, q, cfg, max_new=4):
    cache, probe = lukv.prefill(model, ctx, cfg)
    answer, imp = lukv.oracle_importance(model, cache, probe, q, max_new)
    return cache, probe, answer, imp


# -----------------------------------------------------------------------------
# the oracle


def test_oracle_importance_equals_brute_force():
    """The oracle of the decode path equals max over steps and group heads of a * ||v W_O[q]|| / (its
    layer's sum), computed from the uncached forward's attention (the other code path)."""
    model = tiny_model(seed=3)
    ctx, q = torch.randint(0, 97, (30,)).tolist(), torch.randint(0, 97, (5,)).tolist()
    cache, probe, answer, imp = oracle_of(model, ctx, q, LUKVConfig(sink=1, window=2))
    seq = ctx + q + answer[:-1]  # every token the decode fed
    p = Probe(query_pos=torch.arange(len(ctx), len(seq)), keep_values=True)
    with torch.no_grad():
        model(torch.tensor([seq]), probe=p)
    brute = torch.zeros_like(imp)
    for l in range(2):
        a = p.prefill_attn[l][0][..., :30]  # (H, G, S, T)
        v = p.values[l][0][:, :30]  # (H, T, D)
        norms = torch.einsum("hgcd,htd->hgtc", model.o_proj_heads(l), v).norm(dim=-1)  # (H, G, T)
        brute[l] = (a * (norms / norms.sum())[:, :, None]).amax(dim=(1, 2)).detach()
    assert torch.allclose(imp, brute, rtol=1e-4, atol=1e-9), diff(imp, brute)


def test_value_norms_of_each_layer_sum_to_one():
    """The normalised ||v W_O|| of every layer sum to 1 over its heads, group heads and tokens."""
    model = tiny_model(seed=4)
    _, probe = lukv.prefill(model, torch.randint(0, 97, (25,)).tolist(), LUKVConfig())
    norms = lukv.value_out_norms(model, probe.values)  # (L, H, G, T)
    assert norms.shape == (2, 2, 2, 25) and (norms >= 0).all()
    assert torch.allclose(norms.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-6), norms.sum(dim=(1, 2, 3))


def teacher_forced_oracle(model, ctx, q, cfg):
    """The oracle (L, H, T) of a fixed future (the question itself, teacher-forced), and its attention steps."""
    cache, probe = lukv.prefill(model, ctx, cfg)
    future = Probe(decode=True)
    with torch.no_grad():
        model(torch.tensor([q]), cache=cache, probe=future)
    return lukv.oracle_from_steps(future.decode_attn, lukv.value_out_norms(model, probe.values), len(ctx)), \
        future.decode_attn, probe.values


@settings(max_examples=8, deadline=None)
@given(layer=st.integers(0, 1), scale=st.sampled_from([0.25, 3.0, 1000.0]))
def test_scaling_one_layers_output_projection_changes_neither_oracle_nor_table(layer, scale):
    """Scaling one layer's W_O by c > 0 scales its ||v W_O|| by c, which the per-layer normalisation
    divides out: on the same attention the oracle and the budget table are unchanged; and end to end for
    the last layer, whose W_O acts after every attention of a teacher-forced future."""
    model, cfg = tiny_model(seed=5), LUKVConfig(sink=1, window=2)
    ctx, q = torch.randint(0, 97, (40,)).tolist(), torch.randint(0, 97, (6,)).tolist()
    plain, steps, values = teacher_forced_oracle(model, ctx, q, cfg)
    with torch.no_grad():
        model.layers[layer].self_attn.o_proj.weight *= scale
    same_attention = lukv.oracle_from_steps(steps, lukv.value_out_norms(model, values), 40)
    assert torch.allclose(same_attention, plain, rtol=1e-5, atol=1e-12), diff(same_attention, plain)
    scores = lukv.protect(torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(0)), cfg)
    assert np.array_equal(lukv.context_table(same_attention, scores, cfg), lukv.context_table(plain, scores, cfg))
    if layer == 1:
        rerun = teacher_forced_oracle(model, ctx, q, cfg)[0]
        assert torch.allclose(rerun, plain, rtol=1e-4, atol=1e-12), diff(rerun, plain)


def test_oracle_is_the_max_over_decode_steps_and_grows_with_them():
    """oracle_from_steps of the first k steps never decreases as k grows, and over all steps it equals
    the elementwise max of the one-step oracles (a max over the future, not a sum)."""
    model, cfg = tiny_model(seed=6), LUKVConfig()
    cache, probe = lukv.prefill(model, torch.randint(0, 97, (30,)).tolist(), cfg)
    future = Probe(decode=True)
    model.generate(torch.tensor([[5, 6, 7]]), 6, cache=cache.clone(), probe=future)
    vnorm = lukv.value_out_norms(model, probe.values)
    steps = future.decode_attn
    assert len(steps) >= 6
    grown = [lukv.oracle_from_steps(steps[:k], vnorm, 30) for k in range(1, len(steps) + 1)]
    for before, after in zip(grown, grown[1:]):
        assert (after >= before).all()
    one_step = torch.stack([lukv.oracle_from_steps([s], vnorm, 30) for s in steps])
    assert torch.equal(grown[-1], one_step.amax(dim=0))
    assert not torch.allclose(grown[-1], one_step.sum(dim=0))


# -----------------------------------------------------------------------------
# the bridge to the solver


def test_head_curves_rows_are_loss_curves_and_both_solvers_give_one_table():
    """Row l * H + h of head_curves is solver.loss_curve of that head's evictable tokens, and
    context_table's fast and heap methods give the same table."""
    cfg = LUKVConfig(sink=2, window=3, min_share=0.05)
    g = torch.Generator().manual_seed(2)
    imp = torch.randint(0, 64, (2, 3, 50), generator=g).float() / 64  # dyadic: curves on their exact grid
    scores = lukv.protect(torch.randint(0, 5, (2, 3, 50), generator=g).float(), cfg)  # ties
    curves, floors, n_protected = lukv.head_curves(imp, scores, cfg)
    assert n_protected == 5 and curves.shape == (6, 46) and (floors == cfg.floor(50) - 5).all()
    for l in range(2):
        for h in range(3):
            want = solver.loss_curve(scores[l, h, 2:47].numpy(), imp[l, h, 2:47].numpy())
            assert np.allclose(curves[l * 3 + h], want)
    assert np.array_equal(lukv.context_table(imp, scores, cfg), lukv.context_table(imp, scores, cfg, "heap"))


def test_context_table_rows_evict_the_ratio_of_all_tokens():
    """Row r - 1 of one context's table evicts round_half_up(r% of L * H * T) tokens in all (protected
    tokens counted in T), wherever the floors allow."""
    cfg = LUKVConfig(min_share=0.0)
    g = torch.Generator().manual_seed(3)
    imp, scores = torch.rand(3, 2, 200, generator=g), lukv.protect(torch.rand(3, 2, 200, generator=g), cfg)
    table = lukv.context_table(imp, scores, cfg)
    limit = 3 * 2 * (200 - cfg.floor(200))
    for r in range(1, 100):
        assert round(table[r - 1].sum() * 200) == min(3 * 2 * 200 - solver.keep_count(3 * 2 * 200, r / 100), limit)


# -----------------------------------------------------------------------------
# profiling


def test_profile_resumes_and_recomputes_what_changed(tmp_path):
    """A profile run writes one file per context and scorer; the same run again reads them all back to the
    same table, while another dtype of the weights recomputes every context."""
    model, enc = tiny_model(vocab_size=tasks.load_tokenizer(os.path.join(HERE, "checkpoints", "tiny.tiktoken")).n_vocab), \
        tasks.load_tokenizer(os.path.join(HERE, "checkpoints", "tiny.tiktoken"))
    cfg, stop = LUKVConfig(), {enc.encode_ordinary("\n")[0]}
    contexts = tasks.TinySuite(enc).calibration(2, 2, 200)
    first, counts = lukv.profile(model, "m", contexts, ["snapkv", "keydiff"], cfg, str(tmp_path), stop, **QUIET)
    assert counts == {"computed": 2, "reused": 0} and len(os.listdir(tmp_path)) == 4
    again, counts = lukv.profile(model, "m", contexts, ["snapkv", "keydiff"], cfg, str(tmp_path), stop, **QUIET)
    assert counts == {"computed": 0, "reused": 2}
    assert all(np.array_equal(first[s], again[s]) for s in first)
    _, counts = lukv.profile(model.to(torch.bfloat16), "m", contexts, ["snapkv"], cfg, str(tmp_path), stop, **QUIET)
    assert counts == {"computed": 2, "reused": 0}


def test_sampled_answers_are_reproducible_and_differ_from_greedy(tmp_path):
    """At a temperature the calibration answers are sampled from a generator seeded by the context's key:
    two runs give the same table, and it differs from the greedy one."""
    model, cfg = tiny_model(seed=7), LUKVConfig(sink=1, window=1, horizon=12)
    contexts = [(torch.randint(0, 97, (200,)).tolist(), [[1, 2, 3], [4, 5]])]
    greedy, _ = lukv.profile(model, "m", contexts, ["keydiff"], cfg, str(tmp_path / "a"), **QUIET)
    hot = [lukv.profile(model, "m", contexts, ["keydiff"], cfg, str(tmp_path / d), temperature=5.0, **QUIET)[0]
           for d in "bc"]
    assert np.array_equal(hot[0]["keydiff"], hot[1]["keydiff"])
    assert not np.array_equal(hot[0]["keydiff"], greedy["keydiff"])


def test_saved_profiles_are_checked_on_the_way_back(tmp_path):
    """load_profile refuses, by name, a table of another model, scorer, shape or protected setting, and a
    damaged table or sidecar; save_profile refuses values outside [0, 1]."""
    cfg, path = LUKVConfig(), str(tmp_path / "p.npy")
    with pytest.raises(ValueError, match="a budget table is a .npy file"):
        solver.save_table(str(tmp_path / "p.npz"), np.zeros((99, 2, 2)), {})
    with pytest.raises(ValueError, match=r"prune ratios in \[0, 1\]"):
        solver.save_table(path, np.full((99, 2, 2), np.nan), {})
    solver.save_table(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "abc", cfg))
    assert lukv.load_profile(path, "snapkv", "abc", (2, 2), cfg)[0].shape == (99, 2, 2)
    for args, message in [(("keydiff", "abc", (2, 2), cfg), "scorer 'snapkv', not 'keydiff'"),
                          (("snapkv", "other", (2, 2), cfg), r"another model \(id 'abc'; this one is 'other'\)"),
                          (("snapkv", "abc", (2, 2), LUKVConfig(sink=2)), "sink 4, not 2"),
                          (("snapkv", "abc", (2, 2), LUKVConfig(window=1)), "window 16, not 1"),
                          (("snapkv", "abc", (2, 2), LUKVConfig(snap_window=64)), "snap_window 16, not 64"),
                          (("snapkv", "abc", (3, 2), cfg), "shape")]:
        with pytest.raises(ValueError, match=message):
            lukv.load_profile(path, *args)
    with pytest.raises(FileNotFoundError, match="--profile"):
        lukv.load_profile(str(tmp_path / "none.npy"), "snapkv", "abc", (2, 2), cfg)
    with open(solver.sidecar(path), "w") as f:
        f.write('{"scorer": "snap')  # a cut sidecar
    with pytest.raises(ValueError, match="p.json is not JSON"):
        lukv.load_profile(path, "snapkv", "abc", (2, 2), cfg)
    solver.save_table(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "abc", cfg))
    with open(path, "r+b") as f:
        f.truncate(100)  # a cut table
    with pytest.raises(ValueError, match="p.npy is not a readable budget table"):
        lukv.load_profile(path, "snapkv", "abc", (2, 2), cfg)


# -----------------------------------------------------------------------------
# allocation and compression


def prefilled(T=40, B=1, seed=0):
    model = tiny_model(seed)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, T)), cache=cache)
    return model, cache.repeat(B) if B > 1 else cache


def test_compress_keeps_each_heads_top_tokens_and_frees_memory():
    """compress keeps exactly the counts[l, h] highest-scored tokens (protected ones included) and the
    cache's bytes fall to the kept rows."""
    _, cache = prefilled()
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
            assert keep[l, h].nonzero().flatten().tolist() == want.tolist()
            assert set(range(2)) | set(range(37, 40)) <= set(want.tolist())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["uniform", "adakv", "oracle"]), st.booleans())
def test_compress_through_the_kernel_keeps_what_explicit_slots_keep(seed, allocator, ties):
    """compress (KVCache.evict, kernels.evict) keeps the same positions, rows and decode output as ranking
    the scores by hand (stable ascending sort: among ties the lower index goes first) and keeping the
    slots with KVCache.keep, the path of the exercises, for every row of a batched cache."""
    g = torch.Generator().manual_seed(seed)
    cfg = LUKVConfig(sink=2, window=3)
    raw = torch.randint(0, 4, (2, 2, 60), generator=g).float() if ties else torch.rand(2, 2, 60, generator=g)
    scores, imp = lukv.protect(raw, cfg), torch.rand(2, 2, 60, generator=g)
    counts = np.stack([allocate(a, r, scores, cfg, imp=imp) for a, r in [(allocator, 0.8), ("uniform", 0.5)]])
    model, by_kernel = prefilled(60, B=2, seed=seed % 7)
    by_slots = by_kernel.clone()
    keep = compress(by_kernel, scores, counts)
    order = torch.sort(scores, dim=-1, stable=True).indices  # (L, H, T) eviction order
    for b in range(2):
        for l in range(2):
            kept = [torch.sort(order[l, h, 60 - int(counts[b, l, h]):]).values for h in range(2)]
            assert [keep[b, l, h].nonzero().flatten().tolist() for h in range(2)] == [k.tolist() for k in kept]
    for l in range(2):
        K = int(counts[:, l].max())
        slots = torch.zeros(2, 2, K, dtype=torch.long)
        for b in range(2):
            for h in range(2):
                n = int(counts[b, l, h])
                slots[b, h, :n] = torch.sort(order[l, h, 60 - n:]).values
        by_slots.keep(l, slots, torch.as_tensor(counts[:, l]))
        assert torch.equal(by_kernel.kept_mask(l, 60), by_slots.kept_mask(l, 60))
    q = torch.randn(2, 2, 2, 1, model.cfg.head_dim)
    for l in range(2):
        assert torch.allclose(by_kernel.attend(l, q)[0], by_slots.attend(l, q)[0], atol=1e-6)


@pytest.mark.parametrize("allocator", ["uniform", "pyramid", "adakv", "lukv", "oracle", "shuffled"])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9, 0.875])
def test_every_allocator_keeps_the_same_total_above_floors(allocator, ratio):
    """All allocators, the per-input oracle included, keep solver.keep_count(L * H * T, ratio) tokens in all
    and every head at least its floor."""
    L, H, T = 3, 4, 300
    cfg = LUKVConfig()
    g = torch.Generator().manual_seed(0)
    scores = lukv.protect(torch.rand(L, H, T, generator=g), cfg)
    imp = torch.rand(L, H, T, generator=g) ** 4
    profile = np.random.default_rng(0).uniform(0, 1, (99, L, H))
    profile = np.clip(profile * (np.arange(1, 100) / 100)[:, None, None] / profile.mean(axis=(1, 2))[:, None, None], 0, 0.9)
    counts = allocate(allocator, ratio, scores, cfg, profile, imp)
    assert counts.shape == (L, H)
    assert counts.sum() == solver.keep_count(L * H * T, ratio), (allocator, counts.sum())
    assert (counts >= cfg.floor(T)).all() and (counts <= T).all()


def test_oracle_counts_keep_keep_counts_total_where_rounding_differs():
    """At SmolLM2's shape (30 x 3 heads) the per-input oracle keeps keep_count's total like every allocator,
    also where round((1 - r) L H T), its old formula, keeps one token more (T = 901 at 25%, 45%, 85%;
    T = 903 at 35%, 75%: a float product landing just below a half)."""
    cfg, L, H = LUKVConfig(), 30, 3
    for T, ratio in [(901, 0.25), (901, 0.45), (901, 0.85), (903, 0.35), (903, 0.75)]:
        g = torch.Generator().manual_seed(T)
        scores, imp = lukv.protect(torch.rand(L, H, T, generator=g), cfg), torch.rand(L, H, T, generator=g)
        total = solver.keep_count(L * H * T, ratio)
        assert total != round((1 - ratio) * L * H * T)
        assert allocate("oracle", ratio, scores, cfg, imp=imp).sum() == total


def test_lukv_allocation_follows_the_profile_row():
    """The lukv allocator gives each head its profiled share of the ratio's row (up to rounding)."""
    L, H, T = 2, 2, 1000
    profile = np.zeros((99, L, H))
    profile[79] = [[0.95, 0.95], [0.9, 0.4]]  # mean 0.8
    counts = allocate("lukv", 0.8, torch.zeros(L, H, T), LUKVConfig(), profile)
    assert counts.tolist() == [[50, 50], [100, 600]]


@pytest.mark.parametrize("ratio", [0.001, 0.005, 0.0051, 0.125, 0.5, 0.8, 0.995, 0.999, np.float32(0.8)])
def test_lukv_reads_the_row_kvpress_reads(ratio):
    """lukv_counts reads solver.row_of(ratio), the row kvpress's LUKVPress reads (round(100 r) - 1, clamped
    to 0..98), so a table does the same in both: a profile whose row i keeps i% marks the row read."""
    L, H, T = 1, 99, 10000
    profile = np.zeros((99, L, H))
    for i in range(99):
        profile[i, 0] = 1 - (i + 1) / 100 * np.eye(99)[i]  # row i: all heads but head i pruned away
    cfg = LUKVConfig(sink=0, window=0, min_share=0.0)
    counts = lukv.lukv_counts(ratio, T, cfg, profile)
    row = max(0, min(98, int(round(float(ratio) * 100)) - 1))
    assert solver.row_of(ratio) == row and int(np.argmax(counts[0])) == row


def test_oracle_allocation_never_loses_more_than_uniform_relaxed():
    """Per input, the oracle allocator's true loss is at most uniform's plus one head's hull gap."""
    L, H, T = 2, 3, 200
    cfg = LUKVConfig(min_share=0.0)
    g = torch.Generator().manual_seed(1)
    scores = lukv.protect(torch.rand(L, H, T, generator=g), cfg)
    imp = torch.rand(L, H, T, generator=g) ** 6 * torch.tensor([1.0, 5.0, 0.1]).view(1, H, 1)
    curves, floors, _ = lukv.head_curves(imp, scores, cfg)
    gap = max(float(np.max(c - solver.lower_convex_hull(c)[0])) for c in curves)
    losses = {}
    for name in ("uniform", "oracle"):
        counts = allocate(name, 0.8, scores, cfg, imp=imp)
        cache = KVCache(L, H, 8)
        for l in range(L):
            cache.prefill(l, torch.randn(1, H, T, 8), torch.randn(1, H, T, 8))
        losses[name] = float((imp * ~compress(cache, scores, counts)).sum())
    assert losses["oracle"] <= losses["uniform"] + gap + 1e-9, losses


def test_bad_method_inputs_are_refused():
    """Ratios outside [0, 1) of any type, a profile of another shape, NaN scores, empty contexts and bad
    settings raise, saying what was expected."""
    cfg, scores = LUKVConfig(), torch.rand(2, 2, 100)
    for ratio in (-0.1, 1.0, 1.5, float("nan"), True, "0.8", None):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            allocate("uniform", ratio, scores, cfg)
    assert allocate("uniform", np.float32(0.8), torch.rand(2, 2, 400), cfg).sum() == solver.keep_count(1600, 0.8)
    with pytest.raises(ValueError, match="below the floor"):
        allocate("uniform", 0.99, scores, cfg)
    with pytest.raises(ValueError, match="unknown allocator"):
        allocate("best", 0.5, scores, cfg)
    with pytest.raises(ValueError, match="belongs to another model"):
        allocate("lukv", 0.5, torch.rand(6, 4, 100), cfg, np.full((99, 2, 2), 0.5))
    with pytest.raises(ValueError, match="empty context"):
        lukv.prefill(tiny_model(), [], cfg)
    with pytest.raises(ValueError, match="expected T >= 1"):
        lukv.context_table(torch.zeros(2, 2, 0), torch.zeros(2, 2, 0), cfg)
    for bad in (dict(sink=-1), dict(window=-4), dict(window=2.5), dict(snap_kernel=4), dict(min_share=1.0)):
        with pytest.raises(ValueError):
            LUKVConfig(**bad)


# -----------------------------------------------------------------------------
# one example, every method as a row of one batch


def test_batched_rows_answer_as_each_method_alone(shipped):
    """run_example's scores, kept bytes and oracle losses of every method equal those of running each
    method alone (a batch of one), and a ratio of 0 is the full cache exactly."""
    model, enc, _ = shipped
    cfg, suite = LUKVConfig(), tasks.TinySuite(enc)
    table = lukv.load_profile(tasks.profile_path(CHECKPOINT, "snapkv"), "snapkv", tasks.file_id(CHECKPOINT),
                              (model.cfg.n_layer, model.cfg.n_kv_head), cfg)[0]
    item = suite.items("niah_multikey", 1, 512, 7)[0]
    methods = [Method("snapkv", a, r, table) for a in ("uniform", "pyramid", "adakv", "lukv", "oracle")
               for r in (0.5, 0.8)] + [Method("keydiff", "uniform", 0.0)]
    together = lukv.run_example(model, suite, item, methods, cfg)
    for m in methods:
        alone = lukv.run_example(model, suite, item, [m], cfg)
        assert alone["methods"][m.key] == pytest.approx(together["methods"][m.key]), m
    assert together["methods"]["keydiff|uniform|0.0"]["score"] == together["full"]
    assert together["methods"]["keydiff|uniform|0.0"]["oracle_loss"] == 0.0


# -----------------------------------------------------------------------------
# the shipped checkpoint and its profiles


@pytest.fixture(scope="module")
def shipped():
    return lukv.load_tiny(CHECKPOINT)


def test_shipped_checkpoint_is_small_and_records_its_making(shipped):
    """The shipped checkpoint stays under 16 MB and records the command and data seed that made it."""
    model, enc, meta = shipped
    assert os.path.getsize(CHECKPOINT) < 16e6
    assert "train_tiny.py" in meta["command"] and "data_seed" in meta
    assert model.cfg.n_kv_head < model.cfg.n_head  # GQA: the cache is stored per KV head


def test_shipped_profiles_belong_to_the_shipped_model(shipped):
    """Every shipped profile of the tiny model loads through load_profile, and its rows' mean prune ratio
    matches the row's ratio wherever the floors allow."""
    model, cfg = shipped[0], LUKVConfig()
    model_id, shape = tasks.file_id(CHECKPOINT), (model.cfg.n_layer, model.cfg.n_kv_head)
    for name in ["snapkv", "keydiff", "knorm", "expected_attention", "oracle", "taskloss_snapkv"]:
        table, meta = lukv.load_profile(tasks.profile_path(CHECKPOINT, name), name.removeprefix("taskloss_"),
                                        model_id, shape, cfg)
        means = table.mean(axis=(1, 2))
        assert np.allclose(means[:90], np.arange(1, 91) / 100, atol=0.01), (name, means[:90])
        assert (np.diff(table, axis=0) >= -1e-6).all(), f"{name}: rows are not nested"
