"""
Tests of the experiments (experiments/evaluate.py): the grid resumes and never reuses a record made
otherwise, a grid split by family merges, knockout cuts one head at a time, profiles and in-task
profiles are written and read back, the command line works on the tiny model and on small random
real-model folders (test_hf.py's; nothing is downloaded), and every command the README shows exists.

    python -m pytest -q tests/test_evaluate.py
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import lukv
import solver
import tasks
from experiments import calibration, evaluate, hf
from lukv import LUKVConfig
from test_lukv import tiny_model
from test_hf import folders  # noqa: F401  (the module-scoped fixture of three small model folders)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = lukv.DEFAULT_CHECKPOINT
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def shipped():
    return lukv.load_tiny(CHECKPOINT)


def command(*args, cwd=HERE):
    """Run python -m experiments.evaluate with args (from the repository root unless cwd): the finished process."""
    return subprocess.run([sys.executable, "-m", "experiments.evaluate", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": HERE})


def strip(records):
    return [{k: v for k, v in r.items() if k not in ("run", "timing")} for r in records]


# -----------------------------------------------------------------------------
# the grid


def test_every_allocator_keeps_a_fifth_at_80_percent_and_keep_all_is_the_full_cache(shipped):
    """At 80% compression every allocator keeps a fifth of the full cache's KV bytes, and keep-all
    (ratio 0) scores exactly as the full cache does on every example."""
    model, enc, _ = shipped
    cfg, shape = LUKVConfig(), (model.cfg.n_layer, model.cfg.n_kv_head)
    tables = evaluate.load_tables([tasks.profile_path(CHECKPOINT, "snapkv")], tasks.file_id(CHECKPOINT), shape, cfg)
    pairs = [("snapkv", a) for a in ("uniform", "pyramid", "adakv", "lukv")]
    res = evaluate.evaluate(model, tasks.TinySuite(enc), tables, ["niah_single", "qa"], [0.0, 0.8], pairs, 1, 512,
                            5, cfg, **QUIET)
    for rec in res["records"]:
        for key, m in rec["methods"].items():
            if key.endswith("|0.8"):
                assert abs(m["kv_bytes"] / rec["full_bytes"] - 0.2) < 0.005, (key, m, rec["full_bytes"])
            else:
                assert m["score"] == rec["full"], (key, m)


def test_an_interrupted_run_resumes_and_never_reuses_a_record_made_otherwise(shipped, tmp_path, monkeypatch):
    """A run stopped after its second example, run again, computes only the rest and gives the records of one
    uninterrupted run; a changed setting, weights' dtype or table CONTENT (same file, profiled again)
    recomputes every record instead of reusing the partial file's."""
    enc = shipped[1]
    model, cfg, suite = tiny_model(vocab_size=shipped[0].cfg.vocab_size), LUKVConfig(), tasks.TinySuite(enc)
    table = {"|snapkv": [("t", (np.full((99, 2, 2), 0.5) * np.arange(1, 100)[:, None, None] / 50).clip(0, 1), cfg)]}
    args = (model, suite, table, ["niah_single", "vt"], [0.5], [("snapkv", "uniform"), ("snapkv", "lukv")], 2, 128,
            5, cfg)
    partial = str(tmp_path / "run.partial.jsonl")
    calls, real_run = [], lukv.run_example
    monkeypatch.setattr(lukv, "run_example", lambda *a, **k: calls.append(1) or real_run(*a, **k))

    def stop_after_two(done, total, text):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(*args, partial=partial, log=stop_after_two)
    assert len(calls) == 2 and len(open(partial).readlines()) == 2
    resumed = evaluate.evaluate(*args, partial=partial, **QUIET)
    assert len(calls) == 4
    fresh = evaluate.evaluate(*args, partial=str(tmp_path / "other.jsonl"), **QUIET)
    assert strip(resumed["records"]) == strip(fresh["records"])
    assert f"timed phases of its {len(fresh['records'])} examples" in evaluate.format_table(fresh)
    evaluate.evaluate(*args[:-1], LUKVConfig(window=8), partial=partial, **QUIET)  # another config: recomputed
    evaluate.evaluate(model.to(torch.bfloat16), *args[1:], partial=partial, **QUIET)  # another dtype: too
    model.to(torch.float32)
    other_table = {"|snapkv": [("t", table["|snapkv"][0][1][::-1].copy(), cfg)]}
    evaluate.evaluate(args[0], args[1], other_table, *args[3:], partial=partial, **QUIET)  # another table: too
    assert len(calls) == 2 + 2 + 4 + 4 + 4 + 4


def test_a_torn_last_line_is_dropped_and_the_next_record_kept(shipped, tmp_path):
    """A record cut mid-line by a kill is skipped on reading, and the next record appended after it lands on
    its own line (not glued to the cut one), so a resumed run loses only the cut record."""
    enc = shipped[1]
    model, cfg, suite = tiny_model(vocab_size=shipped[0].cfg.vocab_size), LUKVConfig(), tasks.TinySuite(enc)
    args = (model, suite, {}, ["niah_single"], [0.5], [("snapkv", "uniform")], 2, 128, 5, cfg)
    partial = tmp_path / "p.jsonl"
    evaluate.evaluate(*args, partial=str(partial), **QUIET)
    lines = partial.read_text().splitlines()
    partial.write_text(lines[0] + "\n" + lines[1][:40])  # the second record cut by a kill
    evaluate.evaluate(*args, partial=str(partial), **QUIET)
    lines = partial.read_text().splitlines()
    assert len(lines) == 3 and len(evaluate.read_partial(str(partial), json.loads(lines[0])["run"])) == 2


def test_a_grid_split_by_family_merges_into_the_whole(shipped, tmp_path, monkeypatch):
    """Two runs over one family each, their partial files concatenated, give a run over both families
    (and more examples) that recomputes only the examples neither ran, with the records of one whole run."""
    enc = shipped[1]
    model, cfg, suite = tiny_model(vocab_size=shipped[0].cfg.vocab_size), LUKVConfig(), tasks.TinySuite(enc)
    rest = ([0.5], [("snapkv", "uniform")])
    calls, real_run = [], lukv.run_example
    monkeypatch.setattr(lukv, "run_example", lambda *a, **k: calls.append(a[2].family) or real_run(*a, **k))
    for fam in ("niah_single", "vt"):
        evaluate.evaluate(model, suite, {}, [fam], *rest, 2, 128, 5, cfg, partial=str(tmp_path / f"{fam}.jsonl"),
                          **QUIET)
    merged = tmp_path / "all.partial.jsonl"
    merged.write_text((tmp_path / "niah_single.jsonl").read_text() + (tmp_path / "vt.jsonl").read_text())
    calls.clear()
    whole = evaluate.evaluate(model, suite, {}, ["niah_single", "vt"], *rest, 3, 128, 5, cfg, partial=str(merged),
                              **QUIET)
    assert calls == ["niah_single", "vt"]  # only example 2 of each family is new
    fresh = evaluate.evaluate(model, suite, {}, ["niah_single", "vt"], *rest, 3, 128, 5, cfg, **QUIET)
    assert strip(whole["records"]) == strip(fresh["records"])


def test_several_tables_of_one_scorer_are_one_row_each_with_their_own_window(shipped, tmp_path):
    """--table A,B of one scorer evaluates each as its own LU-KV row (lukv:A, lukv:B) on the same examples,
    each protected as it was profiled (window 16 or 1), beside baselines at the run's window."""
    model, enc, _ = shipped
    cfg, shape, model_id = LUKVConfig(), (model.cfg.n_layer, model.cfg.n_kv_head), tasks.file_id(CHECKPOINT)
    one = LUKVConfig(window=1)
    table = lukv.load_profile(tasks.profile_path(CHECKPOINT, "keydiff"), "keydiff", model_id, shape, cfg)[0]
    solver.save_table(str(tmp_path / "A.npy"), table, lukv.profile_meta("keydiff", model_id, cfg))
    solver.save_table(str(tmp_path / "B.npy"), table, lukv.profile_meta("keydiff", model_id, one))
    tables = evaluate.load_tables([str(tmp_path / "A.npy"), str(tmp_path / "B.npy")], model_id, shape, cfg)
    rows = evaluate.methods_for([("keydiff", "uniform"), ("keydiff", "lukv")], [0.8], tables, "vt")
    assert [(m.label, m.cfg.window if m.cfg else None) for m in rows] == [("uniform", None), ("lukv:A", 16),
                                                                           ("lukv:B", 1)]
    res = evaluate.evaluate(model, tasks.TinySuite(enc), tables, ["vt"], [0.8], [("keydiff", "uniform"),
                            ("keydiff", "lukv")], 1, 256, 5, cfg, **QUIET)
    assert res["methods"] == [["keydiff", "uniform"], ["keydiff", "lukv:A"], ["keydiff", "lukv:B"]]
    assert "lukv:B" in evaluate.format_table(res)


def test_int8_weights_are_an_option_whose_records_never_mix_with_float32s(tmp_path):
    """--dtype int8 (the CPU speed option) quantizes every linear layer to int8, names its records apart from
    float32's (a resumed float32 run never reads them), and still gives the oracle its output projections."""
    model32, enc, model_id, suite = evaluate.load("tiny")
    model8 = evaluate.load("tiny", "int8")[0]
    assert model8.weights_key() == "torch.float32/cpu/int8 per_channel_affine" != model32.weights_key()
    assert not any(isinstance(m, torch.nn.Linear) for m in model8.modules())
    assert torch.allclose(model8.o_proj_heads(0), model32.o_proj_heads(0), atol=0.02)
    args = ([0.8], [("keydiff", "uniform")], 256, 5, LUKVConfig(), {})
    assert evaluate.run_key(model8, suite, model_id, *args) != evaluate.run_key(model32, suite, model_id, *args)
    rec = lukv.run_example(model8, suite, suite.items("niah_single", 1, 256, 5)[0],
                           [lukv.Method("keydiff", "uniform", 0.8)], LUKVConfig())
    assert 0 <= rec["full"] <= 1 and "keydiff|uniform|0.8" in rec["methods"]


def test_intervals_known_answers():
    """Wilson's interval for 8 of 10 is [0.490, 0.943]; for 10 of 10 it is [0.722, 1.0] (not zero width);
    a paired difference of identical scores is exactly zero."""
    m, lo, hi = tasks.interval([1] * 8 + [0] * 2)
    assert (m, round(lo, 3), round(hi, 3)) == (0.8, 0.490, 0.943)
    m, lo, hi = tasks.interval([1] * 10)
    assert (m, round(lo, 3), round(hi, 3)) == (1.0, 0.722, 1.0)
    for n in range(1, 101):  # never outside [0, 1], where rounding once printed "-0.00"
        low, high = tasks.interval([0] * n)[1], tasks.interval([1] * n)[2]
        assert 0.0 <= low < 1e-12 and 1.0 - 1e-12 < high <= 1.0 and f"{low:.2f}" == "0.00", n
    assert evaluate.paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)


def test_knockout_cuts_each_head_once_and_nothing_when_the_window_covers_the_context(shipped, monkeypatch):
    """knockout cuts exactly one head per row to sink + window (every head once per example); when sink +
    window covers the context nothing is cut and every head scores the full-cache accuracy."""
    enc = shipped[1]
    model, suite = tiny_model(vocab_size=shipped[0].cfg.vocab_size), tasks.TinySuite(enc)
    calls, real_compress = [], lukv.compress

    def recording_compress(cache, scores, counts):
        calls.append(np.array(counts))
        return real_compress(cache, scores, counts)

    monkeypatch.setattr(lukv, "compress", recording_compress)
    acc = evaluate.knockout(model, suite, ["niah_single", "vt"], 2, 64, 5, LUKVConfig(), **QUIET)
    assert acc.shape == (2, 2, 2) and ((acc >= 0) & (acc <= 1)).all(), acc
    assert len(calls) == 2 * 2, f"expected one batched compress per (family, example), got {len(calls)}"
    for c in calls:
        T = int(c.max())
        cut = [tuple(np.argwhere(row != T)[0]) for row in c]
        assert all((row != T).sum() == 1 and row.min() == 4 + 16 for row in c), c.tolist()
        assert sorted(cut) == [(l, h) for l in range(2) for h in range(2)], cut
    wide = LUKVConfig(window=10_000)
    acc = evaluate.knockout(model, suite, ["niah_single"], 1, 64, 5, wide, **QUIET)
    full = evaluate.evaluate(model, suite, {}, ["niah_single"], [], [], 1, 64, 5, wide, **QUIET)["records"][0]["full"]
    assert (acc == full).all(), (acc[..., 0], full)


# -----------------------------------------------------------------------------
# the command line on the tiny model


def test_in_task_profiles_are_written_and_read_by_the_intask_allocator(tmp_path):
    """--intask writes one table per family (its sidecar of kind intask_<family>); --eval's intask allocator
    reads it through --table, and without it the run stops at once, naming the command that makes it."""
    common = ["--families", "niah_single", "--scorers", "snapkv", "--length", "256", "--threads", "1"]
    calibration_table = tasks.profile_path(CHECKPOINT, "snapkv")
    run = command("--eval", *common, "--allocators", "intask", "--n", "1", "--table", calibration_table, "--json",
                  tmp_path / "e.json")
    assert run.returncode == 2 and "--intask" in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = command("--intask", *common, "--calib-contexts", "2", "--out", tmp_path / "p.npy")
    assert run.returncode == 0, run.stderr
    path = tmp_path / "p_intask_niah_single.npy"
    table, meta = lukv.load_profile(str(path), "snapkv", tasks.file_id(CHECKPOINT), (6, 4), LUKVConfig())
    assert table.shape == (99, 6, 4) and meta["kind"] == "intask_niah_single"
    assert "calibration      niah_single" in run.stdout  # the budget correlation with the shipped profile
    run = command("--eval", *common, "--allocators", "lukv,intask", "--n", "1", "--ratios", "0.8", "--table",
                  f"{calibration_table},{path}", "--json", tmp_path / "e.json")
    assert run.returncode == 0, run.stderr
    record = json.load(open(tmp_path / "e.json"))["records"][0]
    assert {"snapkv|lukv|0.8", "snapkv|intask|0.8"} <= set(record["methods"])


def test_a_saved_result_prints_its_table_again(tmp_path):
    """--from RESULT.json prints the table of a saved run with this code, without running it; a file that
    is not a result is refused by name."""
    path = os.path.join(HERE, "results", "raw", "2026-12-01-cpu", "eval_tiny_n25.json")
    run = command("--from", path)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.rstrip("\n") == evaluate.format_table(json.load(open(path)))
    run = command("--from", path, f"--json={tmp_path / 'again.json'}")  # the --flag=value spelling too
    assert run.returncode == 0 and json.load(open(tmp_path / "again.json")) == json.load(open(path)), run.stderr[-500:]
    (tmp_path / "x.json").write_text('{"knockout": []}')
    run = command("--from", tmp_path / "x.json")
    assert run.returncode == 2 and "is not a result" in run.stderr and "Traceback" not in run.stderr


# -----------------------------------------------------------------------------
# real models: small random folders


CFG = LUKVConfig(sink=4, window=4, horizon=4, snap_window=8)


def test_exported_table_has_the_kvpress_layout(folders, tmp_path):
    """A profiled table is float32 [99, n_layer, n_kv_head] prune ratios in [0, 1], nested across rows;
    row solver.row_of(r) evicts a share r of all tokens wherever the floors allow, also when read the way
    LUKVPress reads it (per layer, keep (1 - p) * T rounded); the sidecar names scorer, sink and window."""
    model, enc, model_id = hf.load_model(folders["qwen2"][0])
    contexts = calibration.text_contexts(enc, calibration.generated_prose(), 4, 64, CFG.horizon)
    tables, _ = lukv.profile(model, model_id, contexts, ["snapkv", "keydiff"], CFG, str(tmp_path / "cache"), **QUIET)
    L, H, T = model.cfg.n_layer, model.cfg.n_kv_head, len(contexts[0][0])
    reachable = 1 - CFG.floor(T) / T  # the largest ratio the per-head floor allows
    for scorer, table in tables.items():
        path = str(tmp_path / f"{scorer}.npy")
        solver.save_table(path, table, lukv.profile_meta(scorer, model_id, CFG))
        saved, meta = np.load(path, allow_pickle=False), json.load(open(solver.sidecar(path)))
        assert saved.shape == (99, L, H) and saved.dtype == np.float32
        assert (saved >= 0).all() and (saved <= 1).all() and (np.diff(saved, axis=0) >= -1e-6).all()
        assert (meta["scorer"], meta["sink"], meta["window"]) == (scorer, CFG.sink, CFG.window)
        for r in range(1, 100):
            if r / 100 > reachable:
                continue
            row = saved[solver.row_of(r / 100)]
            assert abs(row.mean() - r / 100) <= 0.5 / (L * H * T) + 1e-6, (scorer, r, row.mean())
            kept = sum(round(float(((1 - row[l]) * T).sum())) for l in range(L))  # LUKVPress, layer by layer
            assert abs(kept / (L * H * T) - (1 - r / 100)) <= (L + 1) * 0.5 / (L * H * T), (scorer, r, kept)


def test_profiling_resumes_without_recomputing_finished_contexts(folders, tmp_path, monkeypatch):
    """An interrupted profile, run again, recomputes only the unfinished contexts and gives the same table
    as one uninterrupted run; a changed setting recomputes."""
    model, enc, model_id = hf.load_model(folders["llama"][0])
    contexts = calibration.text_contexts(enc, calibration.generated_prose(), 4, 64, CFG.horizon)
    calls, real_tables = [], lukv.calibration_tables
    monkeypatch.setattr(lukv, "calibration_tables", lambda *a, **k: calls.append(1) or real_tables(*a, **k))

    def interrupt_after_two(done, total, text):
        if done == 2:
            raise KeyboardInterrupt

    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        lukv.profile(model, model_id, contexts, ["snapkv"], CFG, cache, log=interrupt_after_two)
    assert len(calls) == 2
    resumed, counts = lukv.profile(model, model_id, contexts, ["snapkv"], CFG, cache, **QUIET)
    assert len(calls) == 4 and counts == {"computed": 2, "reused": 2}
    fresh, _ = lukv.profile(model, model_id, contexts, ["snapkv"], CFG, str(tmp_path / "fresh"), **QUIET)
    assert np.array_equal(resumed["snapkv"], fresh["snapkv"])
    _, counts = lukv.profile(model, model_id, contexts[:1], ["snapkv"], LUKVConfig(sink=2, window=4, horizon=4),
                             cache, **QUIET)
    assert counts == {"computed": 1, "reused": 0}


def test_cli_profiles_and_evaluates_a_folder(folders, tmp_path):
    """--profile writes the table and its sidecar (resumable per context, its kvpress line naming the table);
    --eval reads it and reports scores and kept KV bytes on the RULER-style suite; a table of other settings
    is refused by name with exit code 2."""
    folder = folders["llama"][0]  # context 512
    out = tmp_path / "curve.npy"
    base = ["--model", folder, "--length", "400", "--threads", "1", "--horizon", "4", "--scorers", "snapkv"]
    run = command(*base, "--sink", "4", "--window", "4", "--profile", "--calib-contexts", "2", "--calib-questions",
                  "2", "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert np.load(out).shape == (99, 2, 2) and len(os.listdir(tmp_path / "curve.cache")) == 2
    assert "peers.lukv_press(" in json.load(open(tmp_path / "curve.json"))["kvpress"]
    run = command(*base, "--sink", "4", "--window", "4", "--eval", "--allocators", "uniform,lukv", "--table", out,
                  "--families", "niah_single", "--n", "1", "--ratios", "0.5", "--json", tmp_path / "eval.json",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rec = json.load(open(tmp_path / "eval.json"))["records"][0]
    assert set(rec["methods"]) == {"snapkv|uniform|0.5", "snapkv|lukv|0.5"}
    assert all(abs(m["kv_bytes"] / rec["full_bytes"] - 0.5) < 0.02 for m in rec["methods"].values()), rec
    run = command(*base, "--sink", "2", "--window", "4", "--eval", "--table", out, "--n", "1", "--families",
                  "niah_single", "--json", tmp_path / "e2.json", cwd=tmp_path)
    assert run.returncode == 2 and "sink 4, not 2" in run.stderr and "Traceback" not in run.stderr, run.stderr[-500:]


# -----------------------------------------------------------------------------
# the README's commands


def readme_commands():
    """Every `python FILE.py ...` or `python -m MODULE ...` line in README.md's code blocks, as (file, flags)."""
    readme = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        for m in re.finditer(r"python (-m [\w.]+|\w+\.py)([^#&|;]*)", line):
            target = m.group(1)
            file = target[3:].replace(".", "/") + ".py" if target.startswith("-m ") else target
            if file != "pytest.py":
                commands.append((file, re.findall(r"(--[\w-]+)", m.group(2))))
    return commands


def test_every_readme_command_names_a_file_and_flags_that_exist():
    """Each command the README shows runs a file of the repository, and every flag it passes is one that
    file's --help lists (a renamed or removed option fails here, not in a newcomer's terminal)."""
    commands = readme_commands()
    assert commands, "README.md shows no python command"
    helps = {}
    for file, flags in commands:
        assert os.path.exists(os.path.join(HERE, file)), f"README runs {file}, which does not exist"
        if file not in helps:
            module = file[:-3].replace("/", ".")
            run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=HERE)
            assert run.returncode == 0, f"{file} --help failed: {run.stderr[-500:]}"
            helps[file] = run.stdout
        missing = [f for f in flags if f not in helps[file]]
        assert not missing, f"README: python {file} uses {missing}, which {file} --help does not list"
