"""
CPU tests of bench/decode.py's measurement machinery: the --quick rows carry bytes per step and their share of
the copy roof, the StaticCache + torch.compile row decodes Hugging Face's own tokens, the command line refuses
bad arguments before any work, and the compile-free check and the kernel grouping decide as documented.

    python -m pytest -q tests/test_bench.py
"""

import contextlib
import io
import json
import os

import pytest
import torch

from bench import decode, kernels
from test_bad_input import refusal  # (exit code, stderr) of a parse in-process


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run in float32 (B = 1, four rows, the step profile): (rows, the JSON written)."""
    out = tmp_path_factory.mktemp("bench") / "e2e.json"
    _, args = decode.parse(["--quick", "--batch", "1", "--impls", "ours-full,ours-lukv,hf-full,hf-compiled",
                            "--no-check", "--profile-step", "--device", "cpu", "--impl", "v1", "--dtype", "fp32",
                            "--out", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        rows = decode.main(args)
    return rows, json.loads(out.read_text())


def test_quick_rows_carry_bytes_and_roof_share(quick):
    """Each row that ran: bytes per step = weights + KV read, roof ms = bytes / measured roof, share = roof / step."""
    rows, saved = quick
    roof = saved["env"]["roof_gbps"]
    assert roof > 0 and "copy" in saved["env"]["roof"]
    assert [r["impl"] for r in saved["rows"]] == ["ours-full", "ours-lukv", "hf-full", "hf-compiled"]
    assert saved["command"].startswith("python -m bench.decode --quick --batch 1 ")  # the arguments given, no path
    for r in saved["rows"]:
        if r["impl"].startswith("hf") and r["status"] == "skipped":
            continue  # transformers missing: said in the row
        assert r["status"] == "ok", r
        assert r["bytes_per_step"] == r["weight_bytes"] + r["kv_read_bytes"], r
        assert r["kv_read_bytes"] == r.get("kv_bytes_in_use", r["kv_bytes"]), r
        assert r["roof_ms"] == pytest.approx(r["bytes_per_step"] / roof / 1e6), r
        assert r["roof_share"] == pytest.approx(r["roof_ms"] / r["decode_ms_median"]), r
    lukv_row, full_row = saved["rows"][1], saved["rows"][0]
    assert lukv_row["kv_read_bytes"] < full_row["kv_read_bytes"], (lukv_row, full_row)


def test_quick_compile_free_and_profile_recorded(quick):
    """The run stores its compile-free verdict (first score + evict vs two more) and the step profile's groups."""
    _, saved = quick
    check = saved["env"]["compile_free"]["tiny"]
    assert isinstance(check["ok"], bool) and len(check["later_ms"]) == 2 and check["first_ms"] > 0, check
    profile = saved["env"]["profile"]["tiny"]
    assert set(profile) == {"ours-full", "ours-lukv"}
    for p in profile.values():
        assert p["eager_ms"] > 0 and p["steps"] == 4, p  # 20 on a GPU
        if "profiler" not in p:  # a profiler that cannot run is said, not fatal
            assert sum(g["share"] for g in p["groups"].values()) == pytest.approx(1.0)
            assert 0 < len(p["top"]) <= 25


def test_hf_compiled_row_says_why_kvpress_cannot_follow(quick):
    """hf-compiled records its compile, no compile inside the timed steps, and why kvpress has no such row."""
    pytest.importorskip("transformers")
    _, saved = quick
    row = saved["rows"][3]
    assert row["status"] == "ok" and row["compiles_in_timed_steps"] == 0 and row["compile_s"] > 0, row
    assert "kvpress" in row["note"] and "cache_position" in row["note"], row["note"]
    assert row["tokens_same_as_hf_full"] == 1.0, row


def test_quick_full_rows_decode_the_same_tokens(quick):
    """In float32 ours and Hugging Face compute one function, so their full-cache rows decode the same greedy tokens,
    compared position by position (Hugging Face's rows record after their 3 warm-up tokens, ours from the first)."""
    pytest.importorskip("transformers")
    _, saved = quick
    assert saved["rows"][0]["tokens_same_as_other_full"] == 1.0, saved["rows"][0]


def test_lean_path_check_catches_a_cache_that_lost_its_keys(monkeypatch):
    """check_lean_path agrees on the lean path as written, and names both caches once the prefill's keys are lost
    (its twin's tokens depend on the cache: a tied random model would repeat its last token and agree anyway)."""
    spec, cpu = decode.MODELS["tiny"], torch.device("cpu")
    assert decode.check_lean_path(spec, cpu, torch.float32) == []
    prefill = decode.prefill_ours

    def keys_lost(*args, **kwargs):
        cache, first = prefill(*args, **kwargs)
        for k in cache.k:
            k.zero_()
        return cache, first

    monkeypatch.setattr(decode, "prefill_ours", keys_lost)
    failures = decode.check_lean_path(spec, cpu, torch.float32)
    assert [f.split(":")[0] for f in failures] == ["full cache", "evicted cache"], failures


def test_hf_compiled_decodes_the_tokens_of_hf_full():
    """StaticCache + the compiled step (Dynamo on the CPU) decode hf-full's greedy tokens (fp32, untied head, B = 2)."""
    pytest.importorskip("transformers")
    spec = decode.MODELS["tiny"]
    model = decode.build_ours(spec, 200, torch.device("cpu"), torch.float32)
    hf = decode.build_hf(spec, model)
    ids = torch.randint(0, spec["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    eager, eager_tokens = decode.run_hf(hf, ids, 6)
    compiled, compiled_tokens = decode.run_hf_compiled(hf, ids, 6)
    assert torch.equal(eager_tokens, compiled_tokens), (eager_tokens, compiled_tokens)
    assert compiled["kv_bytes"] == eager["kv_bytes"], (compiled["kv_bytes"], eager["kv_bytes"])  # T + 3 + 6 rows


def test_hf_compiled_without_fullgraph_says_so(monkeypatch):
    """If the fullgraph capture fails, the row compiles with graph breaks and its note says why (tokens unchanged)."""
    pytest.importorskip("transformers")
    real_compile = torch.compile

    def compile_that_cannot_fullgraph(fn, fullgraph=False, **options):
        if fullgraph:
            def broken(*args, **kwargs):
                raise RuntimeError("a graph break, for the test")
            return broken
        return real_compile(fn, fullgraph=False, **options)

    monkeypatch.setattr(torch, "compile", compile_that_cannot_fullgraph)
    spec = decode.MODELS["tiny"]
    model = decode.build_ours(spec, 200, torch.device("cpu"), torch.float32)
    hf = decode.build_hf(spec, model)
    ids = torch.randint(0, spec["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))
    result, tokens = decode.run_hf_compiled(hf, ids, 4)
    assert result["fullgraph"] is False and "fullgraph=True failed (RuntimeError" in result["note"], result
    assert torch.equal(tokens, decode.run_hf(hf, ids, 4)[1])


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt5"], "--models: unknown"),
    (["--impls", "ours-full,hf-fast"], "--impls: unknown"),
    (["--contexts", "0"], "--contexts must be at least 1"),
    (["--models", "tiny", "--contexts", "64"], "--ratio 0.8 at T=64 leaves a head fewer tokens"),
    (["--quick", "--contexts", "4096", "--ratio", "0.985"], "at T=2048 leaves"),  # the warm-up's length
    (["--contexts", "32k"], "--contexts: expected a comma list of integers"),
    (["--batch", "1,0"], "--batch must be at least 1"),
    (["--new", "0"], "--new must be at least 1"),
    (["--ratio", "1"], "--ratio must be between 0 and 1"),
    (["--ratio", "0"], "--ratio must be between 0 and 1"),
    (["--device", "tpu"], "--device tpu: expected cpu"),
    (["--impl", "v4"], "invalid choice"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--out", "e2e.txt"], "expected a .json file"),
])
def test_parse_refuses_bad_arguments(argv, message):
    """A bad argument is refused before any work: exit code 2 and one line that names it."""
    code, err = refusal(decode.parse, argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, code, err)


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "raw",
                       "2026-12-01-h200", "e2e_h200_kernels_bench.json")


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--profile"], "not allowed with argument"),
    (["--once", "--out", "k.json"], "--profile and --once print and write no rows"),
    (["--out", "k.txt"], "expected a .json file"),
    (["--out", SHIPPED], "a file the repository ships"),
])
def test_kernel_bench_refuses_bad_arguments(argv, message, tmp_path, monkeypatch):
    """bench.kernels checks its flags and its --out before any work (its rows take minutes of a card)."""
    monkeypatch.chdir(tmp_path)
    code, err = refusal(kernels.parse, argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, code, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_parse_refuses_cuda_without_a_card():
    """--device cuda on a machine without CUDA is refused at once, not after the model is built."""
    code, err = refusal(decode.parse, ["--device", "cuda"])
    assert code == 2 and "cuda" in err and len(err.strip().splitlines()) == 1, (code, err)
    code, err = refusal(kernels.parse, ["--quick"])
    assert code == 2 and "needs a CUDA card" in err and len(err.strip().splitlines()) == 1, (code, err)


def test_parse_quick_fills_only_what_is_not_given():
    """--quick sets the tiny model, B = 1,2 and 8 tokens, but flags given explicitly win."""
    _, args = decode.parse(["--quick"])
    assert (args.models, args.batch, args.new) == ("tiny", "1,2", 8)
    _, args = decode.parse(["--quick", "--batch", "1", "--new", "3"])
    assert (args.models, args.batch, args.new) == ("tiny", "1", 3)
    _, args = decode.parse([])
    assert (args.models, args.batch, args.new) == ("smollm2-135m,llama3.1-8b", "1,8", 128)


@pytest.mark.parametrize("first, later, free", [
    (19.3, [18.9, 19.1], True),  # the spread of one case
    (1563.0, [19.0, 20.0], False),  # the first row: a Triton compile inside the timed region
    (1.9, [0.5, 0.6], True),  # exactly max(later) * 1.5 + 1 ms: still within
    (2.0, [0.5, 0.6], False),  # just past it
])
def test_compile_free_decides_on_synthetic_timings(first, later, free):
    """compile-free holds when the first score + evict is at most max(later) * 1.5 + 1 ms."""
    assert decode.compile_free(first, later) is free


def test_kernel_groups_of_real_kernel_names():
    """CUDA kernel and aten op names land in the groups the step breakdown reports; the unknown ones in other."""
    names = {
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>": "GEMV/matmul",
        "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "GEMV/matmul",
        "aten::mm": "GEMV/matmul",
        "_decode_split_kernel": "attention decode",
        "_decode_combine_kernel": "attention decode",
        "_append_kernel": "append",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
        "float>, unsigned int, float, 4> >": "norms",
        "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda(at::TensorIterator&)": "norms",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<c10::BFloat16, unsigned int, 2, 128, 1>":
            "RoPE",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>":
            "elementwise/residual",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, "
        "unsigned int, long, 4> >": "other",
    }
    for name, group in names.items():
        assert decode.kernel_group(name) == group, (name, decode.kernel_group(name), group)


def test_summarize_kernels_per_step_shares():
    """Per-step sums divide by the steps; group shares add to 1; the top list is ordered by time and capped."""
    seen = [("_decode_split_kernel", 20, 600.0), ("gemv2T_kernel", 200, 3000.0), ("CUDAFunctor_add", 400, 400.0)]
    s = decode.summarize_kernels(seen, steps=20, top=2)
    assert s["kernel_ms_per_step"] == pytest.approx(4000.0 / 20 / 1e3)
    assert s["launches_per_step"] == pytest.approx(31.0)
    assert s["groups"]["GEMV/matmul"] == pytest.approx(dict(launches=10.0, us=150.0, share=0.75))
    assert sum(g["share"] for g in s["groups"].values()) == pytest.approx(1.0)
    assert [t["name"] for t in s["top"]] == ["gemv2T_kernel", "_decode_split_kernel"]


def test_roof_fields_of_a_row():
    """Ours reads the rows in use; a row without that field reads every byte it holds."""
    ours = dict(kv_bytes=1000, kv_bytes_in_use=800, decode_ms_median=2.0)
    f = decode.roof_fields(ours, weight_bytes=3_000_000, roof_gbps=1.0)
    assert f["bytes_per_step"] == 3_000_800 and f["roof_ms"] == pytest.approx(3.0008)
    assert f["roof_share"] == pytest.approx(3.0008 / 2.0)
    assert decode.roof_fields(dict(kv_bytes=1000, decode_ms_median=1.0), 0, 1.0)["kv_read_bytes"] == 1000
