"""
Reading real checkpoints into model.py: a Hugging Face folder (config.json + *.safetensors +
tokenizer.json), mapped to a GPTConfig and a stream of tensors for GPT.from_pretrained.

Llama, Mistral and Qwen2 folders load into this project's model, cache and kernels. Nothing is
downloaded: the folder is a local one. real.py profiles and evaluates what this file loads.

    pip install -r requirements-hf.txt
    python -c "import hf; model, enc, model_id = hf.load_model('path/to/folder')"
"""

import glob
import hashlib
import json
import os

import torch

from model import GPT, GPTConfig, rope_frequencies

# -----------------------------------------------------------------------------
# the folder: config.json -> GPTConfig, and where the weights lie (GPT.from_pretrained reads them)

HF_ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def hf_config(folder, block_size=None):
    """GPTConfig of a local folder's config.json; refuse what this model cannot run, saying why."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no model folder at {folder!r}; expected a local Hugging Face folder with "
                                f"config.json and *.safetensors (nothing is downloaded)")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {folder} (found {sorted(os.listdir(folder))[:10]}); "
                                f"expected a Hugging Face model folder")
    with open(path) as f:
        config = json.load(f)
    arch = (config.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} (model_type {config.get('model_type')!r}) is not supported; "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise ValueError(f"{path}: only a SwiGLU MLP without bias (hidden_act silu) is supported, got hidden_act "
                         f"{config.get('hidden_act')!r}, mlp_bias {config.get('mlp_bias')}")
    # transformers 5 writes rope_parameters (theta inside); older files write rope_theta + rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor")) not in (None, 1, 1.0):
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    context = config["max_position_embeddings"]
    # our attention is full causal: a sliding window becomes the longest sequence we accept
    window = config.get("sliding_window") if arch == "MistralForCausalLM" or config.get("use_sliding_window") else None
    context = min(context, window or context, block_size or context)
    attention_bias = bool(config.get("attention_bias", False))
    cfg = GPTConfig(vocab_size=config["vocab_size"], block_size=context, n_layer=config["num_hidden_layers"],
                    n_head=config["num_attention_heads"],
                    n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
                    n_embd=config["hidden_size"], mlp_hidden=config["intermediate_size"], rope_theta=float(theta),
                    norm_eps=config.get("rms_norm_eps", 1e-6),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                    head_dim=config.get("head_dim"), rope_scaling=rope if kind != "default" else None,
                    qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias, o_bias=attention_bias)
    rope_frequencies(cfg)  # an unsupported rope scaling is refused now, not at the first forward
    return cfg


def hf_weight_files(folder):
    """The safetensors shards of a folder, in the order its index lists them (or by name)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, n) for n in names]
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in the folder: {absent[:3]}")
        return files
    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors")))
    if not files:
        found = sorted(os.listdir(folder))[:10]
        hint = " (pytorch .bin weights are not read: save the model with safe_serialization)" \
            if any(n.endswith(".bin") for n in found) else ""
        raise FileNotFoundError(f"no model*.safetensors in {folder}; found {found}{hint}")
    return files


# -----------------------------------------------------------------------------
# the folder's tokenizer (tokenizer.json through the `tokenizers` package)


class HFTokenizer:
    """A tokenizer.json served with the two calls this project makes of tiktoken's Encoding."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("a Hugging Face tokenizer needs the tokenizers package: "
                              "pip install -r requirements-hf.txt") from None
        self.tokenizer = Tokenizer.from_file(path)
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()

    @property
    def n_vocab(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_ordinary(self, text):
        """Token ids of text, without BOS or any other special token."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_tokenizer(folder):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        found = sorted(os.listdir(folder))[:10] if os.path.isdir(folder) else "no such folder"
        raise FileNotFoundError(f"no tokenizer.json in {folder} (found {found}); write one with transformers: "
                                f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    return HFTokenizer(path)


def folder_id(folder):
    """A short id of a model folder: config.json's bytes and every weight file's name and size (fast)."""
    digest = hashlib.sha256(open(os.path.join(folder, "config.json"), "rb").read())
    for path in hf_weight_files(folder):
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()[:16]


def folder_tensors(folder, device="cpu"):
    """(name, tensor) of every tensor in the folder's safetensors shards, one shard open at a time."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading a Hugging Face folder needs the safetensors package: "
                          "pip install -r requirements-hf.txt") from None
    for shard in hf_weight_files(folder):
        with safe_open(shard, framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_model(folder, dtype=None, block_size=None):
    """(model, tokenizer, model id) of a local Hugging Face folder."""
    cfg = hf_config(folder, block_size)
    model = GPT.from_pretrained(cfg, folder_tensors(folder), dtype=dtype)
    enc = load_tokenizer(folder)
    if enc.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json has {enc.n_vocab} tokens, more than the model's "
                         f"{model.cfg.vocab_size} embeddings; are they from the same model?")
    return model, enc, folder_id(folder)


