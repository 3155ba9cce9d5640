"""
Tests of the real-model path on small random-weight Llama, Qwen2 and Mistral models that
`transformers` builds from configs here (nothing is downloaded): GPT.from_pretrained against
transformers' own forward and the folder checks (test_real.py tests what real.py does with them).

    python -m pytest -q test_hf.py
"""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import hf
import tasks
from hf import hf_weight_files
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
    rng = random.Random("tokenizer-prose-5")
    tok.train_from_iterator([" ".join(tasks.prose_sentences(rng, 300)[0]) for _ in range(20)], trainer)
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
    model, _ = load_checkpoint()
    cfg = model.cfg
    assert (cfg.head_dim, cfg.rope_scaling, cfg.qkv_bias, cfg.o_bias) == (cfg.n_embd // cfg.n_head, None, False, False)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
