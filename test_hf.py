"""
Tests of the real-model path on small random-weight Llama, Qwen2 and Mistral models that
`transformers` builds from configs here (nothing is downloaded): GPT.from_pretrained against
transformers' own forward, the folder checks, the kvpress table and resumable profiling.

    python -m pytest -q test_hf.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf
import lukv
from hf import hf_weight_files
from lukv import LUKVConfig
from model import GPT, rope_tables

transformers = pytest.importorskip("transformers", reason="pip install -r requirements-hf.txt")
tokenizers = pytest.importorskip("tokenizers", reason="pip install -r requirements-hf.txt")

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 1024

# three small models, each with what sets its family apart: GQA everywhere; llama3 rope scaling and
# untied embeddings (Llama 3.1); yarn, tied embeddings and q/k/v biases (Qwen2); an explicit head_dim,
# linear scaling and a sliding window (Mistral)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              initializer_range=0.2)  # larger than the default 0.02 so attention is sharp and RoPE matters
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                               "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(head_dim=16, sliding_window=384, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                         "factor": 2.0})),
}


def make_tokenizer(path):
    """A byte-level BPE of at most VOCAB tokens trained on tasks.py prose, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    prose = hf.generated_prose(seed=5, n_words=300)
    tok.train_from_iterator([next(prose) for _ in range(20)], trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(path)


def make_folder(root, family, dtype=torch.float32, **save_kwargs):
    """Save a random-weight model of one family (norm weights and biases randomised too) with a tokenizer."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:  # RMSNorm weights start at 1 and biases at 0: make them matter
                p.normal_(0.0, 0.5)
    folder = os.path.join(root, family)
    ref.to(dtype).save_pretrained(folder, **save_kwargs)
    make_tokenizer(os.path.join(folder, "tokenizer.json"))
    return folder, ref


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_folder(str(root), family) for family in FAMILIES}


def max_diff(a, b):
    return f"max |diff| {(a - b).abs().max().item():.3g}, mean {(a - b).abs().mean().item():.3g}"


# -----------------------------------------------------------------------------
# loading: the same logits as transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(folders, family):
    """A saved folder loaded into our model gives transformers' float32 logits, uncached and through our cache."""
    folder, ref = folders[family]
    ours = GPT.from_pretrained(folder)
    assert ours.cfg.n_kv_head < ours.cfg.n_head  # GQA
    ids = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"{family} uncached: {max_diff(got, expected)}"
        cache = ours.new_cache(2)
        decoded = torch.cat([ours(ids[:, :100], cache=cache), ours(ids[:, 100:], cache=cache)], dim=1)
    assert torch.allclose(decoded, expected, atol=1e-4, rtol=1e-4), f"{family} cached: {max_diff(decoded, expected)}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rope_scaling_changes_the_logits(folders, family):
    """The scaled RoPE is what makes the logits agree: the same weights with plain RoPE give others."""
    folder, ref = folders[family]
    ours = GPT.from_pretrained(folder)
    ours.cfg.rope_scaling = None
    ours.rope_cos, ours.rope_sin = rope_tables(ours.cfg)
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff > 1e-3, f"{family}: plain RoPE matched the scaled model (diff {diff}); the test cannot tell them apart"


def test_old_style_config_json_loads_the_same(folders, tmp_path):
    """A config.json written by transformers 4 (rope_theta and rope_scaling at the top, as Llama-3.1's) loads
    to the same model as transformers 5's rope_parameters."""
    folder, ref = folders["llama"]
    old = tmp_path / "llama_v4"
    old.mkdir()
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), old / name)
    config = json.load(open(os.path.join(folder, "config.json")))
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    os.remove(old / "config.json")
    json.dump(config, open(old / "config.json", "w"))
    a, b = GPT.from_pretrained(folder), GPT.from_pretrained(str(old))
    assert a.cfg == b.cfg
    ids = torch.arange(50)[None] % VOCAB
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_sharded_bfloat16_checkpoint_loads_in_its_dtype(tmp_path):
    """A bfloat16 checkpoint split into shards loads every shard, stays bfloat16, and holds the file's exact weights."""
    folder, ref = make_folder(str(tmp_path), "llama", dtype=torch.bfloat16, max_shard_size="40KB")
    shards = hf_weight_files(folder)
    assert len(shards) > 1 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    ours = GPT.from_pretrained(folder)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    theirs = {k.removeprefix("model."): v for k, v in ref.to(torch.bfloat16).state_dict().items()}
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs[name]), name
    assert ours.new_cache(1).dtype == torch.bfloat16  # the cache stores K/V in the checkpoint's dtype


def write_config(folder, **changes):
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **changes}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def touch(folder, name):
    open(os.path.join(folder, name), "w").close()
    return folder


@pytest.mark.parametrize("make, error, message", [
    (lambda d: d + "/absent", FileNotFoundError, "no model folder"),
    (lambda d: d, FileNotFoundError, "no config.json in .*found"),
    (lambda d: write_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2"), ValueError,
     "'GPT2LMHeadModel' .*gpt2.* supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    (lambda d: write_config(d, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
     "rope scaling 'dynamic' is not supported; supported: default, linear, llama3, yarn"),
    (lambda d: write_config(d, hidden_act="gelu"), ValueError, "hidden_act 'gelu'"),
    (lambda d: touch(write_config(d), "pytorch_model.bin"), FileNotFoundError,
     "no model.*safetensors.*pytorch .bin weights are not read"),
])
def test_bad_folders_say_what_they_found(tmp_path, make, error, message):
    """A missing folder, a missing config, an unsupported architecture, rope or MLP, and .bin-only weights each
    raise an error naming what was found and what is supported."""
    with pytest.raises(error, match=message):
        GPT.from_pretrained(make(str(tmp_path)))


def test_missing_tokenizers_package_says_how_to_install(folders, monkeypatch):
    """Without the tokenizers package the tokenizer refuses with the install command."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install -r requirements-hf.txt"):
        hf.load_tokenizer(folders["llama"][0])


def test_tiny_model_is_unchanged_by_the_new_config_fields():
    """The shipped checkpoint still loads, and its config takes the defaults (no biases, plain RoPE, D = C / heads)."""
    from model import load_checkpoint
    model, enc, _ = load_checkpoint()
    cfg = model.cfg
    assert (cfg.head_dim, cfg.rope_scaling, cfg.qkv_bias, cfg.o_bias) == (cfg.n_embd // cfg.n_head, None, False, False)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


# -----------------------------------------------------------------------------
# profiling and the kvpress table

CFG = LUKVConfig(sink=4, window=4, horizon=4, snap_window=8)


def contexts_of(folder, n=4, length=64):
    model, enc, model_id = hf.load_model(folder)
    return model, model_id, hf.calibration_contexts(enc, hf.generated_prose(), n, length, CFG.horizon)


def test_exported_table_has_the_kvpress_layout(folders, tmp_path):
    """The table is float32 [99, n_layer, n_kv_head] prune ratios in [0, 1], nested across rows; row
    round(100 r) - 1 evicts a share r of all tokens wherever the floors allow, also when read the way
    LUKVPress reads it (per layer, keep (1 - p) * T rounded); the sidecar names scorer, sink and window."""
    model, model_id, contexts = contexts_of(folders["qwen2"][0])
    tables, _ = hf.profile_contexts(model, model_id, contexts, ["snapkv", "keydiff"], CFG, str(tmp_path / "cache"),
                                    log=lambda *a: None)
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    T = len(contexts[0][0])
    reachable = 1 - CFG.floor(T) / T  # the largest ratio the per-head floor allows
    for scorer, table in tables.items():
        path = str(tmp_path / f"{scorer}.npy")
        hf.save_table(path, table, lukv.profile_meta(scorer, model_id, CFG))
        saved = np.load(path, allow_pickle=False)
        meta = json.load(open(hf.sidecar(path)))
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
    real_run_full = lukv.run_full
    monkeypatch.setattr(lukv, "run_full", lambda *a, **k: calls.append(1) or real_run_full(*a, **k))

    def interrupt_after_two(done, total, text):
        if done == 2:
            raise KeyboardInterrupt

    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        hf.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, cache, log=interrupt_after_two)
    assert len(calls) == 2
    resumed, counts = hf.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, cache, log=lambda *a: None)
    assert len(calls) == 4 and counts == {"computed": 2, "reused": 2}
    fresh, _ = hf.profile_contexts(model, model_id, contexts, ["snapkv"], CFG, str(tmp_path / "fresh"),
                                   log=lambda *a: None)
    assert np.array_equal(resumed["snapkv"], fresh["snapkv"])
    # a changed setting is a different context: nothing is reused
    _, counts = hf.profile_contexts(model, model_id, contexts[:1], ["snapkv"], LUKVConfig(sink=2, window=4, horizon=4),
                                    cache, log=lambda *a: None)
    assert counts == {"computed": 1, "reused": 0}


def test_calibration_text_from_a_folder(tmp_path, folders):
    """A folder of text files is read in name order as one token stream and cut into (context, continuation)
    pairs; too little text says how much one context needs."""
    enc = hf.load_tokenizer(folders["llama"][0])
    (tmp_path / "b.txt").write_text("The river flows past the hill. " * 40)
    (tmp_path / "a.txt").write_text("Alice lives in Paris. " * 40)
    contexts = hf.calibration_contexts(enc, hf.read_documents(str(tmp_path)), 3, 50, 5)
    text = "Alice lives in Paris. " * 40 + "\n\n" + "The river flows past the hill. " * 40 + "\n\n"
    stream = enc.encode_ordinary(text)
    assert [c + f for c, f in contexts] == [stream[i * 55:(i + 1) * 55] for i in range(3)]
    with pytest.raises(ValueError, match="one calibration context needs 100005"):
        hf.calibration_contexts(enc, hf.read_documents(str(tmp_path)), 1, 100000, 5)


def test_cli_profiles_and_evaluates_a_folder(folders, tmp_path):
    """lukv.py --profile --model writes the table and its sidecar; --eval --model reads it and reports accuracy,
    kept KV bytes and decode time per token."""
    folder = folders["mistral"][0]
    out = str(tmp_path / "curve.npy")
    common = [sys.executable, os.path.join(HERE, "lukv.py"), "--model", folder, "--length", "96", "--sink", "4",
              "--window", "4", "--horizon", "4"]
    run = subprocess.run(common + ["--profile", "--scorer", "snapkv", "--calib-contexts", "2", "--out", out],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert np.load(out).shape == (99, 2, 2) and os.path.exists(str(tmp_path / "curve.json"))
    assert len(os.listdir(str(tmp_path / "curve.cache"))) == 2
    run = subprocess.run(common + ["--eval", "--scorer", "snapkv", "--allocators", "uniform,lukv", "--table", out,
                                   "--families", "niah_single",
                                   "--n", "1", "--ratios", "0.5", "--settings", "agnostic",
                                   "--json", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    result = json.load(open(tmp_path / "eval.json"))
    assert {r["allocator"] for r in result["rows"]} == {"uniform", "lukv"}
    full = result["full_kv_bytes"]["agnostic"]["niah_single"]
    assert all(abs(r["kv_bytes"] / full - 0.5) < 0.02 for r in result["rows"]), result["rows"]
    timings = result["decode_ms_per_token"]["0.5"]
    assert set(timings) == {"full", "snapkv+uniform", "snapkv+lukv"}
    assert all(v > 0 for v in timings.values()) and "ms" in run.stdout
