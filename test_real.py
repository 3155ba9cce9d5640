"""
Tests of real.py on small random-weight models that `transformers` builds from configs here
(test_hf.py's folders; nothing is downloaded): the kvpress table, resumable profiling on text,
calibration text from files, and the command line.

    python -m pytest -q test_real.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hf
import lukv
import evaluate
import real
from lukv import LUKVConfig
from test_hf import folders  # noqa: F401  (the module-scoped fixture of three small model folders)

pytest.importorskip("transformers", reason="pip install -r requirements-hf.txt")
HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# profiling and the kvpress table

CFG = LUKVConfig(sink=4, window=4, horizon=4, snap_window=8)


def contexts_of(folder, n=4, length=64):
    model, enc, model_id = hf.load_model(folder)
    pairs = real.calibration_contexts(enc, real.generated_prose(), n, length, CFG.horizon)
    return model, model_id, [(c, [f]) for c, f in pairs]  # the one 'question' is the text's continuation


def test_exported_table_has_the_kvpress_layout(folders, tmp_path):
    """The table is float32 [99, n_layer, n_kv_head] prune ratios in [0, 1], nested across rows; row
    round(100 r) - 1 evicts a share r of all tokens wherever the floors allow, also when read the way
    LUKVPress reads it (per layer, keep (1 - p) * T rounded); the sidecar names scorer, sink and window."""
    model, model_id, contexts = contexts_of(folders["qwen2"][0])
    tables, _ = evaluate.profile_contexts(model, model_id, contexts, ["snapkv", "keydiff"], CFG,
                                          str(tmp_path / "cache"), log=lambda *a: None)
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    T = len(contexts[0][0])
    reachable = 1 - CFG.floor(T) / T  # the largest ratio the per-head floor allows
    for scorer, table in tables.items():
        path = str(tmp_path / f"{scorer}.npy")
        lukv.save_profile(path, table, lukv.profile_meta(scorer, model_id, CFG))
        saved = np.load(path, allow_pickle=False)
        meta = json.load(open(lukv.sidecar(path)))
        assert saved.shape == (99, L, H) and saved.dtype == np.float32
        assert (saved >= 0).all() and (saved <= 1).all() and (np.diff(saved, axis=0) >= -1e-6).all()
        assert (meta["scorer"], meta["sink"], meta["window"]) == (scorer, CFG.sink, CFG.window)
        assert "round(100 * ratio) - 1" in meta["layout"]
        for r in range(1, 100):
            ratio = r / 100
            if ratio > reachable:
                continue
            row = saved[round(100 * ratio) - 1]  # LUKVPress's index
            # the solver evicts round(ratio * N) of the N = L * H * T tokens: half a token of rounding
            assert abs(row.mean() - ratio) <= 0.5 / (L * H * T) + 1e-6, (scorer, ratio, row.mean())
            kept = sum(round(float(((1 - row[l]) * T).sum())) for l in range(L))  # LUKVPress, layer by layer
            # the table averages contexts, so a layer's keep total is fractional: kvpress rounds it per layer
            assert abs(kept / (L * H * T) - (1 - ratio)) <= (L + 1) * 0.5 / (L * H * T), (scorer, ratio, kept)


def test_profiling_resumes_without_recomputing_finished_contexts(folders, tmp_path, monkeypatch):
    """An interrupted profile, run again, recomputes only the unfinished contexts and gives the same table
    as one uninterrupted run."""
    model, model_id, contexts = contexts_of(folders["llama"][0], n=4)
    calls = []
    real_tables = lukv.calibration_tables
    monkeypatch.setattr(lukv, "calibration_tables", lambda *a, **k: calls.append(1) or real_tables(*a, **k))

    def interrupt_after_two(done, total, text):
        if done == 2:
            raise KeyboardInterrupt

    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        evaluate.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, cache, log=interrupt_after_two)
    assert len(calls) == 2
    resumed, counts = evaluate.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, cache,
                                                log=lambda *a: None)
    assert len(calls) == 4 and counts == {"computed": 2, "reused": 2}
    fresh, _ = evaluate.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, str(tmp_path / "fresh"),
                                         log=lambda *a: None)
    assert np.array_equal(resumed["snapkv"], fresh["snapkv"])
    # a changed setting is a different context: nothing is reused
    _, counts = evaluate.profile_contexts(model, model_id, contexts[:1], ["snapkv"],
                                          LUKVConfig(sink=2, window=4, horizon=4), cache, log=lambda *a: None)
    assert counts == {"computed": 1, "reused": 0}


def test_calibration_text_from_a_folder(tmp_path, folders):
    """A folder of text files is read in name order as one token stream and cut into (context, continuation)
    pairs; too little text says how much one context needs."""
    enc = hf.load_tokenizer(folders["llama"][0])
    (tmp_path / "b.txt").write_text("The river flows past the hill. " * 40)
    (tmp_path / "a.txt").write_text("Alice lives in Paris. " * 40)
    contexts = real.calibration_contexts(enc, real.read_documents(str(tmp_path)), 3, 50, 5)
    text = "Alice lives in Paris. " * 40 + "\n\n" + "The river flows past the hill. " * 40 + "\n\n"
    stream = enc.encode_ordinary(text)
    assert [c + f for c, f in contexts] == [stream[i * 55:(i + 1) * 55] for i in range(3)]
    with pytest.raises(ValueError, match="one calibration context needs 100005"):
        real.calibration_contexts(enc, real.read_documents(str(tmp_path)), 1, 100000, 5)


def test_cli_profiles_and_evaluates_a_folder(folders, tmp_path):
    """real.py --profile writes the table and its sidecar (resumable per context); --eval reads it and reports
    scores and kept KV bytes on the RULER-style suite; a table of other settings is refused by name."""
    folder = folders["llama"][0]  # context 512
    out = str(tmp_path / "curve.npy")
    base = [sys.executable, os.path.join(HERE, "real.py"), "--model", folder, "--length", "400", "--threads", "1",
            "--horizon", "4"]
    common = base + ["--sink", "4", "--window", "4"]
    run = subprocess.run(common + ["--profile", "--scorer", "snapkv", "--calib-contexts", "2", "--calib-questions",
                                   "2", "--out", out], capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert np.load(out).shape == (99, 2, 2) and os.path.exists(str(tmp_path / "curve.json"))
    assert len(os.listdir(str(tmp_path / "curve.cache"))) == 2
    run = subprocess.run(common + ["--eval", "--scorer", "snapkv", "--allocators", "uniform,lukv", "--table", out,
                                   "--families", "niah_single", "--n", "1", "--ratios", "0.5",
                                   "--json", str(tmp_path / "eval.json")], capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    result = json.load(open(tmp_path / "eval.json"))
    rec = result["records"][0]
    assert set(rec["methods"]) == {"snapkv|uniform|0.5", "snapkv|lukv|0.5"}
    assert all(abs(m["kv_bytes"] / rec["full_bytes"] - 0.5) < 0.02 for m in rec["methods"].values()), rec
    run = subprocess.run(base + ["--sink", "2", "--window", "4", "--eval", "--table", out, "--n", "1",
                                        "--families", "niah_single", "--json", str(tmp_path / "e2.json")],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 2 and "sink 4, not 2" in run.stderr and "Traceback" not in run.stderr, run.stderr[-500:]


def test_the_tiny_demo_points_a_real_model_to_real_py():
    """lukv.py imports nothing above it: asked for a real model, it names the real.py command instead of
    failing on an unknown flag or running the tiny model."""
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lukv.py"),
                          "--demo", "--model", "smollm2"], capture_output=True, text=True)
    assert run.returncode == 2 and "python real.py --demo --model smollm2" in run.stderr, run.stderr
