"""Ours against the peers: kvpress 0.5.5 (on transformers 5.2.0) and this project on one small random-weight
Llama built from a config (nothing is downloaded), the same weights in both.

KeyDiff, K-norm, StreamingLLM and average-pooled SnapKV keep exactly kvpress's sets at equal per-head
counts; Expected Attention's kept sets agree with kvpress's ExpectedAttentionPress (Jaccard 1.0 measured
in float32, at least JACCARD asserted); AdaKV and PyramidKV counts match kvpress's where kvpress follows
the original and differ where named; kvpress's LUKVPress, handed a table of ours by the line that
peers.kvpress_usage prints, prunes every (layer, KV head) by the table's row.

    pip install kvpress==0.5.5 transformers==5.2.0   # requirements-hf.txt pins both
    python -m pytest -q tests/test_peers.py                 # about 20 s on a CPU; skipped where kvpress is absent
"""
import dataclasses
import glob
import json
import os
from importlib.metadata import version

import numpy as np
import pytest
import torch

import baselines
import lukv
import solver
from experiments import hf, peers
from lukv import LUKVConfig
from model import GPT

kvpress = pytest.importorskip("kvpress", reason="the peer tests need kvpress==0.5.5: pip install -r requirements-hf.txt")
transformers = pytest.importorskip("transformers")
if (version("kvpress"), transformers.__version__) != ("0.5.5", "5.2.0"):
    pytest.skip(f"the peer tests are pinned to kvpress 0.5.5 on transformers 5.2.0, found kvpress "
                f"{version('kvpress')} on transformers {transformers.__version__}", allow_module_level=True)

from kvpress.utils import compute_n_kept  # noqa: E402

T = 400  # context tokens, all distinct (a repeated token has the same key norm at every position: a K-norm tie)
RATIOS = [0.5, 0.8, 0.9]
JACCARD = 0.98  # Expected Attention, ours vs kvpress, per (layer, KV head): measured 1.0 at every ratio
VOCAB = 512


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """(kvpress's model, our model on its weights, the context ids (1, T), our prefilled cache and probe)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        initializer_range=0.2,  # sharp attention, so the scores rank tokens clearly apart
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        architectures=["LlamaForCausalLM"])
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.config._attn_implementation = "sdpa"  # kvpress's head-wise presses refuse eager attention
    folder = str(tmp_path_factory.mktemp("llama"))
    ref.config.save_pretrained(folder)  # config.json only: experiments/hf.py maps it as it maps a real folder
    model = GPT.from_pretrained(hf.hf_config(folder), ref.state_dict().items())
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:T]
    cache, probe = lukv.prefill(model, ids.tolist(), LUKVConfig(sink=4, snap_window=16))
    return ref, model, ids[None], cache, probe


def kvpress_kept(peer, press):
    """kvpress's kept tokens (L, H, T) bool after prefilling the context with press on."""
    ref, _, ids, _, _ = peer
    full, cache = transformers.DynamicCache(), transformers.DynamicCache()
    with torch.no_grad():
        ref(ids, past_key_values=full)
        with press(ref):
            ref(ids, past_key_values=cache)
    kept = []
    for l, layer in enumerate(ref.model.layers):
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:  # head-wise presses (AdaKV, LU-KV) mask the pruned keys
            _, heads, slots = masked
            pruned = torch.zeros(full.layers[l].keys.shape[1], T, dtype=torch.bool)
            pruned[heads, slots] = True
            kept.append(~pruned)
        else:  # the others gather the kept keys: find each kept key among the full cache's (exact copies)
            same = (cache.layers[l].keys[0][:, :, None] == full.layers[l].keys[0][:, None]).all(-1)  # (H, K, T)
            assert (same.sum(-1) == 1).all(), "expected every kept key to be one token's key"
            kept.append(same.any(1))
    return torch.stack(kept)  # (L, H, T)


def ours_kept(peer, scores, counts):
    """Our kept tokens (L, H, T) bool: compress the prefilled cache by scores at counts (L, H)."""
    return lukv.compress(peer[3].clone(), scores, counts)


def jaccard(a, b):
    """Per (layer, KV head) Jaccard index of two kept masks (L, H, T): (L, H)."""
    return (a & b).sum(-1).double() / (a | b).sum(-1).double()


def our_scores(peer, name, **config):
    _, model, _, cache, probe = peer
    imp = torch.zeros(model.cfg.n_layer, model.cfg.n_kv_head, T)
    return lukv.scores_for(name, model, cache, probe, imp, LUKVConfig(min_share=0.0, snap_window=16, **config))


# each scorer with kvpress's press and the protection kvpress's press has (SnapKV: its observation window)
SCORERS = {"keydiff": (lambda r: kvpress.KeyDiffPress(compression_ratio=r), dict(sink=0, window=0)),
           "knorm": (lambda r: kvpress.KnormPress(compression_ratio=r), dict(sink=0, window=0)),
           "streaming": (lambda r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4), dict(sink=4, window=0)),
           "snapkv": (lambda r: kvpress.SnapKVPress(compression_ratio=r, window_size=16, kernel_size=5),
                      dict(sink=0, window=16, snap_pool="avg"))}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", list(SCORERS))
def test_scorers_keep_kvpress_sets_at_equal_counts(peer, name, ratio):
    """KeyDiff, K-norm, StreamingLLM and average-pooled SnapKV keep exactly kvpress's tokens in every head
    when every head keeps kvpress's count int(T (1 - ratio))."""
    make_press, config = SCORERS[name]
    counts = np.full((2, 2), compute_n_kept(T, ratio))
    theirs, ours = kvpress_kept(peer, make_press(ratio)), ours_kept(peer, our_scores(peer, name, **config), counts)
    assert torch.equal(theirs, ours), f"{name} at {ratio}: Jaccard per head {jaccard(theirs, ours).tolist()}"


def test_max_pooled_snapkv_is_not_kvpress(peer):
    """Named difference: max pooling (AdaKV's code, our old default) keeps other tokens than kvpress's SnapKVPress
    (min Jaccard per head 0.80 at 80%), so kvpress_usage says so for a max-pooled profile."""
    counts = np.full((2, 2), compute_n_kept(T, 0.8))
    theirs = kvpress_kept(peer, kvpress.SnapKVPress(compression_ratio=0.8, window_size=16, kernel_size=5))
    ours = ours_kept(peer, our_scores(peer, "snapkv", sink=0, window=16, snap_pool="max"), counts)
    assert jaccard(theirs, ours).min() < 0.9
    assert peers.scorer_press_source("snapkv", dict(snap_window=16, window=16, snap_kernel=5, snap_pool="max"))[1]


@pytest.mark.parametrize("ratio", RATIOS)
def test_expected_attention_agrees_with_kvpress(peer, ratio):
    """Our Expected Attention keeps what kvpress's ExpectedAttentionPress(epsilon=0.02, n_sink=4) keeps, per
    head, at kvpress's count: Jaccard >= JACCARD (measured 1.0)."""
    counts = np.full((2, 2), compute_n_kept(T, ratio))
    theirs = kvpress_kept(peer, kvpress.ExpectedAttentionPress(compression_ratio=ratio, epsilon=0.02, n_sink=4))
    ours = ours_kept(peer, our_scores(peer, "expected_attention", sink=4, window=0, ea_epsilon=0.02), counts)
    j = jaccard(theirs, ours)
    assert j.min() >= JACCARD, f"Jaccard per head at {ratio}: {j.tolist()}"


def test_counts_are_integers_where_kvpress_slips():
    """Named difference: kvpress keeps int(T (1 - ratio)), which floats make 79 at T = 400, 80%; ours keep 80."""
    assert compute_n_kept(T, 0.8) == 79 and solver.keep_count(T, 0.8) == 80
    assert compute_n_kept(T, 0.9) == 39 and solver.keep_count(T, 0.9) == 40


@pytest.mark.parametrize("ratio", RATIOS)
def test_adakv_counts_match_kvpress_variant(peer, ratio):
    """kvpress's AdaKVPress(SnapKVPress) is our adakv_blend="kvpress" (floor, then pooled top-k): the same counts
    and tokens at equal totals. Our default, the original blend, keeps the layer's total but moves tokens."""
    n = compute_n_kept(T, ratio)
    theirs = kvpress_kept(peer, kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=16)))
    equal = 1 - n / T  # the ratio at which we keep kvpress's n per head (keep_count is exact in millionths)
    config = dict(sink=0, window=16, min_share=0.0, snap_window=16)
    scores = our_scores(peer, "snapkv", sink=0, window=16)
    counts = baselines.adakv_counts(scores, equal, LUKVConfig(adakv_blend="kvpress", **config))
    assert counts.tolist() == theirs.sum(-1).tolist()
    assert torch.equal(ours_kept(peer, scores, counts), theirs)
    original = baselines.adakv_counts(scores, equal, LUKVConfig(adakv_blend="original", **config))
    assert (original.sum(1) == counts.sum(1)).all()  # the same budget per layer, shared by the original rule


def test_pyramid_budgets_match_kvpress_where_it_follows_the_original(peer):
    """kvpress's PyramidKVPress budgets equal the original formula at its base = (1 - ratio) T where kvpress
    follows it, and differ where named: its fallback to uniform, and our short-context rule."""
    ref = peer[0]
    layers = [layer.self_attn for layer in ref.model.layers]

    def theirs(ratio, window=4):
        press = kvpress.PyramidKVPress(compression_ratio=ratio, window_size=window)
        return [press.get_layer_budget(m, T) for m in layers]

    # 50%, 75%: base 200, 100 -> min 10, 5 -> [390, 10], [195, 5] on both sides (kvpress's window sits inside
    # these budgets, the original's on top: at equal base ours are the budgets before the window)
    for ratio, base in ((0.5, 200), (0.75, 100)):
        assert theirs(ratio) == baselines.pyramid_layer_budgets(2, T, base + 4, 4).tolist()
    # 90%: min 40 / 20 = 2 < window 4, and kvpress falls back to uniform; the original keeps its pyramid
    assert theirs(0.9) == [40, 40] and baselines.pyramid_layer_budgets(2, T, 44, 4).tolist() == [78, 2]
    # 80%: (1 - 0.8) * 400 = 79.99999999999999 makes kvpress's min 3.99.. < 4: uniform by a float slip
    assert theirs(0.8) == [80, 80] and baselines.pyramid_layer_budgets(2, T, 84, 4).tolist() == [156, 4]
    # 60%: the original keeps base in every layer (T < 2 base); kvpress caps max at T - window instead
    assert theirs(0.4) == [396, 84] and baselines.pyramid_layer_budgets(2, T, 244, 4).tolist() == [240, 240]
    # and kvpress's tokens at its own budgets are ours (avg-pooled SnapKV). 20%, window 16: base 320, min 16,
    # max 624 capped at 400 - 16 = 384, min 640 - 384 = 256 -> [384, 256] (the original: uniform, T < 2 base)
    press = kvpress.PyramidKVPress(compression_ratio=0.2, window_size=16)
    counts = np.array([[b, b] for b in [press.get_layer_budget(m, T) for m in layers]])
    assert counts[:, 0].tolist() == [384, 256]
    assert torch.equal(kvpress_kept(peer, press), ours_kept(peer, our_scores(peer, "snapkv", sink=0, window=16),
                                                             counts))


@pytest.fixture(scope="module")
def ea_profile(peer, tmp_path_factory):
    """A table of ours for the random model with Expected Attention (sink 4, window 1), saved as a profile."""
    _, model, ids, cache, probe = peer
    cfg = LUKVConfig(sink=4, window=1, snap_window=16)
    _, imp = lukv.oracle_importance(model, cache, probe, [1, 2, 3], 8)
    table = lukv.context_table(imp, lukv.scores_for("expected_attention", model, cache, probe, imp, cfg), cfg)
    path = str(tmp_path_factory.mktemp("profile") / "profile_expected_attention.npy")
    solver.save_table(path, table, lukv.profile_meta("expected_attention", "random-llama", cfg))
    return path, table, cfg


def test_lukv_press_prunes_each_head_by_our_table(peer, ea_profile):
    """kvpress's LUKVPress, built by the line kvpress_usage prints, prunes every (layer, KV head) by our table's
    row at 50, 80 and 90% (within 1 / T), and keeps the tokens our Expected Attention keeps at its counts."""
    path, table, cfg = ea_profile
    line = peers.kvpress_usage("expected_attention", path, cfg)
    assert "ExpectedAttentionPress(epsilon=0.02, n_sink=4" in line and "window=1)" in line and "#" not in line
    namespace = {}
    exec(line, namespace)  # the line as printed
    press = namespace["press"]
    assert isinstance(press, kvpress.LUKVPress)
    scores = our_scores(peer, "expected_attention", sink=4, window=1)
    for ratio in RATIOS:
        press.compression_ratio = ratio
        kept = kvpress_kept(peer, press)
        pruned = 1 - kept.sum(-1).double().numpy() / T  # (L, H)
        row = table[solver.row_of(ratio)]
        assert np.abs(pruned - row).max() <= 1 / T + 1e-6, (ratio, pruned.tolist(), row.tolist())
        j = jaccard(kept, ours_kept(peer, scores, kept.sum(-1).numpy()))
        assert j.min() >= JACCARD, (ratio, j.tolist())
        # our lukv allocator rounds over all heads, kvpress's per layer: a token apart at most (equal here)
        ours = lukv.allocate("lukv", ratio, scores, cfg, table)
        assert np.abs(ours - kept.sum(-1).numpy()).max() <= 1, (ratio, ours.tolist(), kept.sum(-1).tolist())


def test_usage_line_names_what_kvpress_cannot_match(tmp_path):
    """kvpress_usage follows the profile's settings, says where kvpress's scorer differs, and refuses the rest."""
    path = str(tmp_path / "profile_snapkv.npy")
    cfg = LUKVConfig(window=16, snap_window=16, snap_pool="avg")
    solver.save_table(path, np.zeros((99, 2, 2)), lukv.profile_meta("snapkv", "m", cfg))
    line = peers.kvpress_usage("snapkv", path, cfg)
    assert "SnapKVPress(window_size=16, kernel_size=5)" in line and "window=16)" in line and "#" not in line
    meta = json.load(open(solver.sidecar(path)))
    del meta["snap_pool"]  # a profile from before snap_pool existed: max-pooled
    json.dump(meta, open(solver.sidecar(path), "w"))
    with pytest.raises(ValueError, match="snap_pool 'max', not snap_pool 'avg'"):
        peers.kvpress_usage("snapkv", path, cfg)
    assert "max pooling" in peers.kvpress_usage("snapkv", path, dataclasses.replace(cfg, snap_pool="max"))
    os.remove(solver.sidecar(path))
    assert "observation window" in peers.kvpress_usage("snapkv", path, LUKVConfig(window=1, snap_window=16))
    assert "no kvpress press ranks as ours" in peers.kvpress_usage("streaming", path, cfg)
    with pytest.raises(ValueError, match="oracle"):
        peers.kvpress_usage("oracle", path, cfg)


def test_lukv_press_refuses_a_table_of_another_scorer_or_shape(peer, ea_profile):
    """lukv_press refuses a table for another scorer, sink/window or model shape, by name."""
    path, _, _ = ea_profile
    with pytest.raises(ValueError, match="scorer 'expected_attention'"):
        peers.lukv_press(path, kvpress.KnormPress(), sink=4, window=1)
    with pytest.raises(ValueError, match="window 1, not sink 4 and window 16"):
        peers.lukv_press(path, kvpress.ExpectedAttentionPress(), sink=4, window=16)
    ref = peer[0]
    ref.config.num_hidden_layers = 3
    try:
        with pytest.raises(ValueError, match="the model needs"):
            peers.lukv_press(path, kvpress.ExpectedAttentionPress(), sink=4, window=1, model=ref)
    finally:
        ref.config.num_hidden_layers = 2


def test_every_shipped_sidecars_kvpress_line_runs_from_the_repository(monkeypatch):
    """The kvpress line recorded in each shipped table's sidecar, run as recorded from the repository's root,
    builds kvpress's LUKVPress holding that very table (and its scorer's press, protected tokens as profiled)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    paths = sorted(glob.glob("checkpoints/*.npy") + glob.glob("checkpoints/intask/*.npy"))
    ran = 0
    for path in paths:
        meta = solver.read_sidecar(path)
        if meta["scorer"] not in peers.PRESSES:
            assert "kvpress" not in meta, path  # no press of kvpress ranks as the oracle does
            continue
        namespace = {}
        exec(meta["kvpress"], namespace)
        press = namespace["press"]
        assert isinstance(press, kvpress.LUKVPress) and type(press.press).__name__ == peers.PRESSES[meta["scorer"]]
        assert np.array_equal(press._budget_curves, np.load(path)) and (press.sink, press.window) == \
            (meta["sink"], meta["window"]), path
        ran += 1
    assert ran >= 20, f"only {ran} shipped tables carry a kvpress line"
