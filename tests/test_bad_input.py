"""
Tests that no command or library call gives a silent wrong answer: every bad argument is refused by
name before any work (exit code 2, one line), no record made otherwise is reused, no shipped file is
overwritten unasked, and damaged files are named with what to do. Each test is one probe of a careful
user; the last throws random argument vectors at every command line.

    python -m pytest -q tests/test_bad_input.py
"""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bench.decode
import bench.kernels
import bench.solver
import lukv
import solver
import tasks
import train_tiny
from experiments import calibration, evaluate, hf, peers, ruler
from lukv import LUKVConfig

ROOT = tasks.ROOT
SHIPPED_TABLE = os.path.join(ROOT, "checkpoints", "tiny_snapkv.npy")


def refusal(main, argv, cwd=None):
    """(exit code, stderr) of a command's main(argv), run in-process; stdout is swallowed."""
    err, here = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
    return code, err.getvalue()


def assert_refused(main, argv, message, cwd=None):
    code, err = refusal(main, argv, cwd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, code, err)


def ev(argv, message, cwd=None):
    assert_refused(evaluate.main, argv, message, cwd)


# -----------------------------------------------------------------------------
# silent wrong numbers


def test_a_resumed_run_recomputes_records_made_with_another_table(tmp_path):
    """The run key holds the tables' contents: a table profiled again (same path, other numbers) never
    resumes the records of the old one; the same table resumes them."""
    model, enc, _ = lukv.load_tiny()
    suite, cfg = tasks.TinySuite(enc), LUKVConfig()
    table = lukv.load_profile(SHIPPED_TABLE, "snapkv", tasks.file_id(lukv.DEFAULT_CHECKPOINT), (6, 4), cfg)[0]
    args = (["niah_single"], [0.8], [("snapkv", "lukv")], 1, 256, 5, cfg)
    def key(table, m=model):
        return evaluate.run_key(m, suite, "m", *args[1:3], 256, 5, cfg, {"|snapkv": [("t", table, cfg)]})
    assert key(table) == key(table.copy())
    assert key(table) != key(table * 0.99) and key(table) != key(table, model.to(torch.bfloat16))


@pytest.mark.parametrize("settings_arg", ["Agnostic,aware", "agnostic,nope", ""])
def test_settings_accept_only_the_two_settings(tmp_path, settings_arg):
    """--settings takes agnostic and aware only (any other word once ran the aware setting under its name)."""
    ev(["--eval", "--settings", settings_arg], "--settings", tmp_path)


def test_the_profile_cache_and_sidecar_name_the_weights_dtype_and_device(tmp_path):
    """A per-context cache made in bfloat16 is not read back in float32 (the key holds dtype and device), and
    the table's sidecar records both."""
    model, enc, _ = lukv.load_tiny()
    contexts = tasks.TinySuite(enc).calibration(1, 1, 128)
    quiet = dict(log=lambda *a: None)
    lukv.profile(model.to(torch.bfloat16), "m", contexts, ["keydiff"], LUKVConfig(), str(tmp_path), **quiet)
    _, counts = lukv.profile(model.to(torch.float32), "m", contexts, ["keydiff"], LUKVConfig(), str(tmp_path), **quiet)
    assert counts == {"computed": 1, "reused": 0}
    paths = evaluate.profile_and_save(model, "m", contexts, ["keydiff"], LUKVConfig(), str(tmp_path / "t.npy"), set())
    assert solver.read_sidecar(paths["keydiff"])["weights"] == "torch.float32/cpu"


@pytest.mark.parametrize("ratio, row", [(0.001, 0), (0.005, 0), (0.0051, 0), (0.125, 11), (0.995, 98), (0.999, 98)])
def test_every_ratio_reads_the_row_kvpress_reads(ratio, row):
    """Ratios near 0 and near 1 read row 0 and row 98, as kvpress clamps them (not row -1, the 99% one, and
    no IndexError); the label of a small ratio is not rounded to 0%."""
    assert solver.row_of(ratio) == row
    table = np.tile((np.arange(1, 100) / 100)[:, None, None], (1, 2, 2))
    counts = lukv.lukv_counts(ratio, 1000, LUKVConfig(sink=0, window=0, min_share=0.0), table)
    assert counts.sum() == solver.keep_count(4000, ratio)
    assert evaluate.percent(0.005) == "0.5%"


@pytest.mark.parametrize("argv, message", [
    (["--eval", "--n", "0"], "--n must be at least 1"), (["--eval", "--n", "-1"], "--n must be at least 1"),
    (["--full-cache", "--n", "0"], "--n must be at least 1"), (["--eval", "--threads", "0"], "--threads"),
    (["--eval", "--ratios", "0"], "--ratios"), (["--eval", "--ratios", "1.2"], "--ratios"),
    (["--eval", "--ratios", "0.8,x"], "--ratios"), (["--eval", "--sink", "-1"], "--sink"),
    (["--eval", "--window", "-3"], "--window"), (["--eval", "--length", "8"], "--length")])
def test_counts_and_numbers_out_of_range_are_refused(tmp_path, argv, message):
    """--n 0 once ran 10 examples, --n -1 printed NaN tables, --threads 0 meant every core: all refused."""
    ev(argv, message, tmp_path)


@pytest.mark.parametrize("argv, message", [(["--demo", "--n", "0"], "--n"), (["--demo", "--threads", "0"], "--threads"),
                                           (["--demo", "--length", "5000"], "--length"),
                                           (["--demo", "--sink", "-2"], "--sink")])
def test_the_demo_refuses_what_it_cannot_answer(tmp_path, argv, message):
    """lukv.py --demo --n 0 once divided by zero: the tiny model's command refuses it and its kin up front."""
    assert_refused(lukv.main, argv, message, tmp_path)


def test_library_calls_refuse_what_they_cannot_answer(tmp_path):
    """A profile of another model's shape, a fractional eviction count, a negative ratio, negative
    importances, an empty context, negative protected tokens and a damaged table are refused; a numpy
    float32 ratio is accepted."""
    cfg, scores = LUKVConfig(), torch.rand(6, 4, 300)
    with pytest.raises(ValueError, match="another model"):
        lukv.allocate("lukv", 0.8, scores, cfg, np.full((99, 2, 2), 0.5))
    with pytest.raises(ValueError, match="integer total_evict"):
        solver.greedy_evictions([np.arange(6.0)], np.zeros(1, dtype=np.int64), 5.5)
    with pytest.raises(ValueError, match=r"ratio in \[0, 1\)"):
        solver.keep_count(100, -0.5)
    with pytest.raises(ValueError, match="utility >= 0"):
        solver.loss_curve(np.arange(3.0), np.array([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="T >= 1"):
        lukv.context_table(torch.zeros(1, 1, 0), torch.zeros(1, 1, 0), cfg)
    with pytest.raises(ValueError, match="sink"):
        LUKVConfig(sink=-1)
    assert lukv.allocate("uniform", np.float32(0.8), scores, cfg).sum() == solver.keep_count(6 * 4 * 300, 0.8)
    for bad in (np.full((99, 2, 2), np.nan), np.full((99, 2, 2), 1.5)):
        path = str(tmp_path / "bad.npy")
        np.save(path, bad)
        with open(solver.sidecar(path), "w") as f:
            json.dump(lukv.profile_meta("snapkv", "m", cfg), f)
        with pytest.raises(ValueError, match=r"prune ratios in \[0, 1\]"):
            lukv.load_profile(path, "snapkv", "m", (2, 2), cfg)
        with pytest.raises(ValueError, match=r"prune ratios in \[0, 1\]"):
            solver.save_table(path, bad, {})


@pytest.mark.parametrize("args", [["nope.npy"], ["README.md"], ["wrong_shape"]])
def test_peers_refuses_a_missing_or_wrong_table_before_printing(tmp_path, args):
    """experiments.peers once printed a usage line for a missing, non-.npy or wrong-shape file, exit 0."""
    if args == ["wrong_shape"]:
        np.save(tmp_path / "w.npy", np.zeros((5, 2)))
        args = [str(tmp_path / "w.npy")]
    assert_refused(lambda argv: peers.parse(argv), args + ["--scorer", "keydiff"], "expected", tmp_path)


# -----------------------------------------------------------------------------
# data lost


@pytest.mark.parametrize("flag, path, message", [
    ("--json", "checkpoints/tiny.pt", "expected a .json file"),
    ("--json", "checkpoints/tiny_snapkv.json", "ships"),
    ("--plot", "results/lukv.png", "ships")])
def test_no_result_is_written_over_a_shipped_file(flag, path, message):
    """--json and --plot refuse another kind of file and any file the repository ships (unless --overwrite)."""
    ev(["--full-cache", "--n", "1", flag, path] + (["--json", "runs/x.json"] if flag == "--plot" else []), message,
       ROOT)


def test_no_table_is_written_over_a_shipped_one():
    """--profile --out checkpoints/tiny_snapkv.npy and lukv.py --profile --out-dir checkpoints refuse to replace
    the shipped tables unless --overwrite names it."""
    ev(["--profile", "--scorers", "snapkv", "--out", "checkpoints/tiny_snapkv.npy"], "ships", ROOT)
    assert_refused(lukv.main, ["--profile", "--out-dir", "checkpoints", "--scorers", "snapkv"], "ships", ROOT)
    assert lukv.parse(["--profile", "--out-dir", "checkpoints", "--scorers", "snapkv", "--overwrite"])[1].overwrite


def test_the_paths_a_run_writes_are_the_paths_it_checks(tmp_path):
    """--intask checks the table of each family and scorer it will write (here one is a folder), --profile and
    --taskloss are refused together (both write --out), and a flag is read by its full name only."""
    os.makedirs(tmp_path / "p_intask_niah_single_keydiff.npy")
    ev(["--intask", "--scorers", "snapkv,keydiff", "--families", "niah_single", "--out", "p.npy"], "is a folder",
       tmp_path)
    ev(["--profile", "--taskloss", "--scorers", "snapkv"], "both write --out", tmp_path)
    assert_refused(train_tiny.main, ["--smo"], "unrecognized arguments: --smo", tmp_path)


# -----------------------------------------------------------------------------
# late crashes and raw errors


def test_lengths_are_checked_against_the_models_context_before_any_work(tmp_path):
    """A prompt that cannot hold its question and answer in the model's context, or is too short for a
    family's template, is refused after loading the model and before the first example."""
    ev(["--full-cache", "--length", "4090", "--families", "niah_single"], "more than the model's context", tmp_path)
    ev(["--full-cache", "--model", "smollm2", "--length", "8192", "--families", "niah_single"], "context of 8192",
       tmp_path)
    ev(["--full-cache", "--model", "smollm2", "--length", "100", "--families", "niah_multiquery"], "too small",
       tmp_path)


def test_damaged_files_are_named_with_what_to_do(tmp_path):
    """A truncated GGUF, a random .npy, a cut sidecar, a corrupt per-context cache file and a result file that
    is not a result are each named, with what to do."""
    gguf = tmp_path / "cut.gguf"
    with open(hf.smollm2_path(), "rb") as f:
        gguf.write_bytes(f.read(20 << 20))
    with pytest.raises(ValueError, match="truncated"):
        hf.open_gguf(str(gguf))
    ev(["--full-cache", "--model", str(gguf)], "truncated", tmp_path)
    table = tmp_path / "t.npy"
    table.write_bytes(os.urandom(500))
    shutil.copy(solver.sidecar(SHIPPED_TABLE), solver.sidecar(str(table)))
    with pytest.raises(ValueError, match="t.npy is not a readable"):
        solver.read_npy(str(table), "budget table", "profile again")
    ev(["--eval", "--allocators", "lukv", "--scorers", "snapkv", "--table", str(table)], "not a readable", tmp_path)
    with open(solver.sidecar(str(table)), "w") as f:
        f.write('{"scorer": ')
    ev(["--eval", "--allocators", "lukv", "--scorers", "snapkv", "--table", str(table)], "t.json is not JSON",
       tmp_path)
    model, enc, _ = lukv.load_tiny()
    contexts, cache = tasks.TinySuite(enc).calibration(1, 1, 128), tmp_path / "cache"
    lukv.profile(model, "m", contexts, ["keydiff"], LUKVConfig(), str(cache), log=lambda *a: None)
    (cache / os.listdir(cache)[0]).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="delete it to recompute"):
        lukv.profile(model, "m", contexts, ["keydiff"], LUKVConfig(), str(cache), log=lambda *a: None)
    (tmp_path / "k.json").write_text('{"knockout": []}')
    ev(["--from", str(tmp_path / "k.json")], "is not a result", tmp_path)


def test_an_output_path_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path):
    """An output under a file (no folder can be made there) is refused up front, not after the run."""
    (tmp_path / "afile").write_text("x")
    ev(["--full-cache", "--json", str(tmp_path / "afile" / "x.json")], "cannot write", tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--eval", "--scorers", "snapkvv"], "--scorers: unknown ['snapkvv']"),
    (["--eval", "--allocators", "lukv,best"], "--allocators: unknown ['best']"),
    (["--eval", "--families", "niah_single,nope"], "--families: unknown ['nope']"),
    (["--eval", "--model", "smollm3"], "expected tiny, smollm2"),
    (["--eval", "--device", "cuda"] if not torch.cuda.is_available() else ["--eval", "--n", "0"], "--")])
def test_names_are_checked_before_the_first_example(tmp_path, argv, message):
    """Unknown scorer, allocator or family names, an unknown model and CUDA without CUDA are refused by name,
    up front (they once surfaced at the first example as tracebacks, or named no model that exists)."""
    ev(argv, message, tmp_path)


def test_an_allocator_that_reads_no_table_loads_none_and_another_scorers_table_is_refused(tmp_path):
    """--allocators uniform with another --sink runs (no profile is loaded that no allocator asked for); a
    --table of a scorer not in --scorers is refused, not skipped."""
    code, err = refusal(evaluate.main, ["--eval", "--allocators", "uniform", "--sink", "8", "--n", "1", "--families",
                                        "niah_single", "--scorers", "keydiff", "--length", "128", "--ratios", "0.5",
                                        "--json", str(tmp_path / "e.json")], tmp_path)
    assert code == 0, err
    ev(["--eval", "--scorers", "keydiff", "--table", SHIPPED_TABLE], "belong to scorers not in --scorers", tmp_path)


def test_a_default_table_of_another_protocol_is_refused_by_name(tmp_path):
    """With --protocol paper, the shipped tables (this project's documents protocol) are refused by name, not
    evaluated as if they were the paper's; a table the user names with --table is taken as given."""
    ev(["--eval", "--model", "smollm2", "--protocol", "paper", "--scorers", "keydiff", "--allocators", "lukv"],
       "profiled with protocol 'documents', not 'paper'", tmp_path)


def test_a_torn_last_line_is_dropped_and_the_next_record_kept(tmp_path):
    """A record cut mid-line by a kill is skipped on reading, and the record appended after it lands on its
    own line (not glued to the cut one)."""
    path = str(tmp_path / "p.jsonl")
    record = {"run": "k", "setting": "agnostic", "family": "vt", "index": 0}
    evaluate.append_record(path, record)
    with open(path, "a") as f:
        f.write(json.dumps({**record, "index": 1})[:25])  # a kill in the middle of the second record
    evaluate.append_record(path, {**record, "index": 2})
    assert sorted(i for _, _, i in evaluate.read_partial(path, "k")) == [0, 2]
    assert len(open(path).read().splitlines()) == 3


# -----------------------------------------------------------------------------
# every command line, thrown random argument vectors


PARSERS = {"lukv": lukv.parse, "evaluate": evaluate.parse, "peers": peers.parse, "hf": hf.parse,
           "ruler": ruler.parse, "calibration": calibration.parse, "tasks": tasks.parse, "train_tiny": train_tiny.parse,
           "bench.solver": bench.solver.parse, "bench.kernels": bench.kernels.parse, "bench.decode": bench.decode.parse}
VALUES = ["0", "1", "-1", "3", "64", "1024", "100000", "0.5", "0.005", "1.5", "nan", "", "x", "a,b", "snapkv",
          "keydiff,oracle", "lukv", "uniform,intask", "niah_single", "agnostic", "aware", "paper", "mixed", "tiny",
          "smollm2", "cuda", "bfloat16", "runs/x.json", "runs/x.npy", "runs/x.png", "README.md", "/nonexistent/y",
          SHIPPED_TABLE, os.path.join(ROOT, "checkpoints", "tiny.pt"), "checkpoints"]


def flags_of(parse):
    """The option strings of the parser a parse function builds (caught as it parses --help)."""
    seen = []
    original = tasks.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    tasks.ArgumentParser.parse_args = spy
    try:
        assert refusal(parse, ["--help"])[0] == 0  # --help prints and exits 0
    finally:
        tasks.ArgumentParser.parse_args = original
    return sorted({s for a in seen[0]._actions for s in a.option_strings if s not in ("-h", "--help")})


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(PARSERS)))
def test_every_command_line_refuses_cleanly_or_parses(tmp_path_factory, data, name):
    """Any argument vector thrown at any command line is either parsed (every check passed: a valid run
    would start) or refused with exit code 2 and one line on stderr; never a traceback."""
    parse = PARSERS[name]
    argv = data.draw(st.lists(st.sampled_from(flags_of(parse) + VALUES), max_size=6), label="argv")
    code, err = refusal(parse, argv, str(tmp_path_factory.mktemp("cli")))
    assert code in (0, 2), (name, argv, code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, argv, err)
