"""
Tests of the experiment harness (evaluate.py): the batched decode of many compressed caches
equals one decode per cache, a run resumes from its partial file, intervals have known answers,
knockout cuts one head at a time, and every command README.md shows still names real flags.

    python -m pytest -q test_evaluate.py
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import lukv
from evaluate import TinySuite
from lukv import LUKVConfig
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = lukv.DEFAULT_CHECKPOINT
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def shipped():
    return lukv.load_tiny(CHECKPOINT)


def random_model(vocab_size, seed=0):
    """A random 2-layer GQA model over the real tokenizer: fast, and the pipeline is the same."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         mlp_hidden=64)).eval()


def test_batched_rows_answer_as_one_decode_per_cache(shipped):
    """Compressing B copies of a prefilled cache with B allocators and decoding them as one batch gives
    every allocator the same answer, kept tokens and KV bytes as compressing and decoding it alone."""
    model, enc, _ = shipped
    cfg, suite = LUKVConfig(), TinySuite(enc)
    model_id, shape = lukv.file_id(CHECKPOINT), (model.cfg.n_layer, model.cfg.n_kv_head)
    profile = lukv.load_profile(lukv.profile_path(CHECKPOINT, "snapkv"), "snapkv", model_id, shape, cfg)[0]
    item = suite.items("niah_multikey", 1, 512, 7)[0]
    stop = min(suite.stop_ids)
    cache, probe, _, imp = lukv.run_full(model, item.context, item.question, cfg, item.max_new, stop)
    scores = lukv.scores_for("snapkv", cache, probe, imp, cfg)
    names = ["uniform", "pyramid", "adakv", "lukv", "oracle"]
    counts = np.stack([lukv.allocate(a, 0.8, scores, cfg, profile, imp) for a in names])
    batch = cache.repeat(len(names))
    keep = lukv.compress(batch, scores, counts)
    kept_batched = [[batch.kept_positions(0, b, h).tolist() for h in range(shape[1])] for b in range(len(names))]
    rows_batched = batch.length.sum(dim=(0, 2)).tolist()  # (B,) rows each allocator holds
    answers = evaluate.decode_rows(model, batch, item.question, item.max_new, suite.stop_ids)
    for b, name in enumerate(names):
        alone = cache.clone()
        keep_alone = lukv.compress(alone, scores, counts[b])
        assert torch.equal(keep[b], keep_alone), name
        assert kept_batched[b] == [alone.kept_positions(0, 0, h).tolist() for h in range(shape[1])], name
        assert rows_batched[b] == int(alone.length.sum()), name  # the same rows held
        single = lukv.answer_with(model, enc, alone, item.question, item.max_new, stop)
        assert suite.answer(answers[b]) == single, (name, suite.answer(answers[b]), single)


def test_every_allocator_keeps_a_fifth_at_80_percent_and_keep_all_is_the_full_cache(shipped):
    """At 80% compression every allocator keeps a fifth of the full cache's KV bytes, and keep-all
    (ratio 0) scores exactly as the full cache does on every example."""
    model, enc, _ = shipped
    cfg = LUKVConfig()
    model_id, shape = lukv.file_id(CHECKPOINT), (model.cfg.n_layer, model.cfg.n_kv_head)
    profiles = evaluate.load_profiles(CHECKPOINT, model_id, shape, ["snapkv"], cfg)
    methods = [("snapkv", a) for a in ("uniform", "pyramid", "adakv", "lukv")]
    res = evaluate.evaluate(model, TinySuite(enc), profiles, ["niah_single", "qa"], [0.0, 0.8], methods, 1, 512, 5,
                            cfg, **QUIET)
    for rec in res["records"]:
        for key, m in rec["methods"].items():
            if key.endswith("|0.8"):
                assert abs(m["kv_bytes"] / rec["full_bytes"] - 0.2) < 0.005, (key, m, rec["full_bytes"])
            else:
                assert m["score"] == rec["full"], (key, m)


def test_an_interrupted_run_resumes_without_recomputing(shipped, tmp_path, monkeypatch):
    """A run stopped after its second example, run again with the same arguments, computes only the rest
    and gives the records of one uninterrupted run; other arguments ignore the partial file."""
    enc = shipped[1]
    model, cfg, suite = random_model(shipped[0].cfg.vocab_size), LUKVConfig(), TinySuite(enc)
    args = (model, suite, {}, ["niah_single", "vt"], [0.5], [("snapkv", "uniform")], 2, 128, 5, cfg)
    partial = str(tmp_path / "run.partial.jsonl")
    calls, real_run = [], evaluate.run_example
    monkeypatch.setattr(evaluate, "run_example", lambda *a, **k: calls.append(1) or real_run(*a, **k))

    def stop_after_two(done, total, text):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(*args, partial=partial, log=stop_after_two)
    assert len(calls) == 2 and len(open(partial).readlines()) == 2
    resumed = evaluate.evaluate(*args, partial=partial, **QUIET)
    assert len(calls) == 4
    fresh = evaluate.evaluate(*args, partial=str(tmp_path / "other.jsonl"), **QUIET)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("run", "timing")} for r in recs]  # noqa: E731
    assert strip(resumed["records"]) == strip(fresh["records"])
    for r in fresh["records"]:  # where the time went: one batch of one compressed row after the full cache's answer
        t = r["timing"]
        assert t["compressed_rows"] == 1 and t["full_tokens"] >= 1 and min(t["prefill"], t["full_decode"]) > 0
    assert f"timed phases of its {len(fresh['records'])} examples" in evaluate.format_table(fresh)
    evaluate.evaluate(*args[:-1], LUKVConfig(window=8), partial=partial, **QUIET)  # another config: recomputed
    evaluate.evaluate(model.to(torch.bfloat16), *args[1:], partial=partial, **QUIET)  # other weights' dtype: too
    assert len(calls) == 2 + 2 + 4 + 4 + 4  # interrupted, resumed, fresh, another config, another dtype


def test_a_grid_split_by_family_merges_into_the_whole(shipped, tmp_path, monkeypatch):
    """Two runs over one family each, their partial files concatenated, give a run over both families
    (and more examples) that recomputes only the examples neither ran, with the records of one whole run."""
    enc = shipped[1]
    model, cfg, suite = random_model(shipped[0].cfg.vocab_size), LUKVConfig(), TinySuite(enc)
    rest = ([0.5], [("snapkv", "uniform")])
    calls, real_run = [], evaluate.run_example
    monkeypatch.setattr(evaluate, "run_example", lambda *a, **k: calls.append(a[2].family) or real_run(*a, **k))
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
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("run", "timing")} for r in recs]  # noqa: E731
    assert strip(whole["records"]) == strip(fresh["records"])


def test_intervals_known_answers():
    """Wilson's interval for 8 of 10 is [0.490, 0.943]; for 10 of 10 it is [0.722, 1.0] (not zero width);
    a paired difference of identical scores is exactly zero."""
    m, lo, hi = evaluate.interval([1] * 8 + [0] * 2)
    assert (m, round(lo, 3), round(hi, 3)) == (0.8, 0.490, 0.943)
    m, lo, hi = evaluate.interval([1] * 10)
    assert (m, round(lo, 3), round(hi, 3)) == (1.0, 0.722, 1.0)
    for n in range(1, 101):  # never outside [0, 1], where rounding once printed "-0.00"
        low, high = evaluate.interval([0] * n)[1], evaluate.interval([1] * n)[2]
        assert 0.0 <= low < 1e-12 and 1.0 - 1e-12 < high <= 1.0 and f"{low:.2f}" == "0.00", n
    assert evaluate.paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)


def test_knockout_cuts_each_head_once_and_nothing_when_the_window_covers_the_context(shipped, monkeypatch):
    """knockout cuts exactly one head per row to sink + window (every head once per example); when sink +
    window covers the context nothing is cut and every head scores the full-cache accuracy."""
    enc = shipped[1]
    model, suite = random_model(shipped[0].cfg.vocab_size), TinySuite(enc)
    calls, real_compress = [], evaluate.compress

    def recording_compress(cache, scores, counts):
        calls.append(np.array(counts))
        return real_compress(cache, scores, counts)

    monkeypatch.setattr(evaluate, "compress", recording_compress)
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


def test_in_task_profiles_are_written_and_read_by_the_intask_allocator(tmp_path):
    """--intask writes one profile per family (its sidecar keyed intask_<family>_<scorer>); --eval's
    intask allocator reads it, and without it the run stops at once, naming the command that makes it."""
    cmd = [sys.executable, os.path.join(HERE, "evaluate.py"), "--families", "niah_single", "--scorers", "snapkv",
           "--length", "256", "--threads", "1", "--out-dir", str(tmp_path / "p")]
    run = subprocess.run(cmd + ["--eval", "--allocators", "intask", "--n", "1", "--json", str(tmp_path / "e.json")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "python evaluate.py --intask --families niah_single" in run.stderr, run.stderr
    run = subprocess.run(cmd + ["--intask", "--calib-contexts", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "p" / "profile_intask_niah_single_snapkv.npy"
    table, meta = lukv.load_profile(str(path), "snapkv", lukv.file_id(CHECKPOINT), (6, 4), LUKVConfig())
    assert table.shape == (99, 6, 4) and meta["key"] == "intask_niah_single_snapkv"
    assert "niah_single      calibration" in run.stdout  # the budget correlation with the shipped profile
    run = subprocess.run(cmd + ["--eval", "--allocators", "lukv,intask", "--n", "1", "--ratios", "0.8",
                                "--settings", "agnostic", "--json", str(tmp_path / "e.json")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.load(open(tmp_path / "e.json"))["records"][0]
    assert {"snapkv|lukv|0.8", "snapkv|intask|0.8"} <= set(record["methods"])


def test_a_bad_output_folder_is_refused_before_the_run():
    """--json into a folder that does not exist stops at once with the path, not after the run."""
    run = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--full-cache", "--n", "1",
                          "--json", "/nonexistent-folder/x.json"], capture_output=True, text=True, cwd=HERE)
    assert run.returncode != 0 and "does not exist" in run.stderr, run.stderr


def readme_commands():
    """Every `python FILE.py ...` line in README.md's code blocks, as (file, flags)."""
    readme = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        for m in re.finditer(r"python (?:-m )?(\w+\.py)([^#&|;]*)", line):
            commands.append((m.group(1), re.findall(r"(--[\w-]+)", m.group(2))))
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
            run = subprocess.run([sys.executable, os.path.join(HERE, file), "--help"], capture_output=True,
                                 text=True, cwd=HERE)
            assert run.returncode == 0, f"{file} --help failed: {run.stderr[-500:]}"
            helps[file] = run.stdout
        missing = [f for f in flags if f not in helps[file]]
        assert not missing, f"README: python {file} uses {missing}, which {file} --help does not list"


def test_a_saved_result_prints_its_table_again():
    """evaluate.py --from RESULT.json prints the table of a saved run with this code, without running it."""
    path = os.path.join(HERE, "results", "eval_tiny_n25.json")
    run = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--from", path], capture_output=True,
                         text=True)
    saved = json.load(open(path))
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.rstrip("\n") == evaluate.format_table(saved)
