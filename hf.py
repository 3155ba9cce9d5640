"""
Real models around LU-KV: a Hugging Face folder's tokenizer, resumable profiling on plain text,
and budget tables in the layout kvpress's LUKVPress reads.

The model itself loads with `model.GPT.from_pretrained(folder)` (Llama, Mistral and Qwen2
safetensors folders, into this project's model, cache and kernels); this file adds what a real
model needs around it. Nothing is downloaded: the folder and the text are local files.

    pip install -r requirements-hf.txt
    python lukv.py --profile --model path/to/Llama-3.1-8B-Instruct --scorer snapkv --out snapkv.npy
    python lukv.py --eval --model path/to/Llama-3.1-8B-Instruct --table snapkv.npy --ratios 0.8

A table is a float32 array [99, n_layer, n_kv_head] of prune ratios: row round(100 * ratio) - 1
holds, per layer and KV head, the share of that head's tokens to evict at global compression
`ratio` (kvpress's LUKVPress convention). A .npy file has no room for metadata, so a sidecar
.json beside it records the scorer, sink, window and how the table was made. Profiling keeps one
small file per calibration context in a cache folder: stop it at any point and run the same
command again, and the finished contexts are read back instead of recomputed.

Scorers are lukv.py's (snapkv, keydiff, knorm, oracle); Expected Attention, the scorer of the
table kvpress ships for Llama-3.1-8B, is not implemented here. Everything runs on the CPU, where
lukv.py's probes and allocators build their tensors; an 8B model in bfloat16 needs about 16 GB
of memory and is slow there.

Shapes: L layers, H KV heads, T context tokens.
"""

import glob
import hashlib
import json
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch

import lukv
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


def load_model(folder, dtype=None, block_size=None):
    """(model, tokenizer, model id) of a local Hugging Face folder."""
    model = GPT.from_pretrained(folder, dtype=dtype, block_size=block_size)
    enc = load_tokenizer(folder)
    if enc.n_vocab > model.cfg.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json has {enc.n_vocab} tokens, more than the model's "
                         f"{model.cfg.vocab_size} embeddings; are they from the same model?")
    return model, enc, folder_id(folder)


# -----------------------------------------------------------------------------
# calibration text: the user's files, or this project's generated prose


def read_documents(path):
    """The text of a file, or of every file in a folder (sorted, recursive, hidden ones skipped)."""
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = sorted(os.path.join(root, name) for root, dirs, names in os.walk(path)
                       for name in names if not name.startswith("."))
        paths = [p for p in paths if not any(part.startswith(".") for part in os.path.relpath(p, path).split(os.sep))]
    else:
        raise FileNotFoundError(f"no text file or folder at {path!r}")
    if not paths:
        raise ValueError(f"the folder {path} holds no files; expected plain-text files")
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not UTF-8 text; give a folder of plain-text files") from None


def generated_prose(seed=0, n_words=400):
    """An endless stream of tasks.py's prose documents (the default calibration text)."""
    rng = random.Random(f"calibration-text-{seed}")
    while True:
        yield " ".join(tasks.prose_sentences(rng, n_words)[0])


def calibration_contexts(enc, documents, n_contexts, length, horizon):
    """Up to n_contexts (context ids, continuation ids) of length and horizon tokens, cut in order
    from the documents' token stream (documents joined by a blank line)."""
    if length < 1 or horizon < 1 or n_contexts < 1:
        raise ValueError(f"expected length, horizon and n_contexts >= 1, got {length}, {horizon}, {n_contexts}")
    need, stream, contexts, seen = length + horizon, [], [], 0
    for doc in documents:
        ids = enc.encode_ordinary(doc + "\n\n")
        stream += ids
        seen += len(ids)
        while len(stream) >= need and len(contexts) < n_contexts:
            contexts.append((stream[:length], stream[length:need]))
            stream = stream[need:]
        if len(contexts) == n_contexts:
            break
    if not contexts:
        raise ValueError(f"the text has {seen} tokens, but one calibration context needs {need} "
                         f"(--length {length} + horizon {horizon}); give more text or a smaller --length")
    return contexts


# -----------------------------------------------------------------------------
# profiling: one table per context, each kept on disk so an interrupted run resumes


def context_key(model_id, ctx_ids, future_ids, cfg):
    """What a context's table depends on, hashed: the model, the tokens and the method's settings."""
    blob = json.dumps({"model": model_id, "context": ctx_ids, "future": future_ids, "config": asdict(cfg)})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _save_npy(path, array):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half table behind


@torch.no_grad()
def profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir, log=lukv.progress):
    """Average the per-context budget tables of every scorer; tables already in cache_dir are reused.

    For each context the oracle's future is the text's own continuation (teacher-forced through
    the cache) followed by the model's next cfg.horizon tokens, the plain-text counterpart of
    the question plus answer that build_profile uses. Returns ({scorer: (99, L, H)}, counts of
    contexts computed and reused).
    """
    os.makedirs(cache_dir, exist_ok=True)
    tables, computed, reused, t0 = {s: [] for s in scorers}, 0, 0, time.time()
    for i, (ctx_ids, future_ids) in enumerate(contexts):
        key = context_key(model_id, ctx_ids, future_ids, cfg)
        paths = {s: os.path.join(cache_dir, f"{key}_{s}.npy") for s in scorers}
        todo = [s for s in scorers if not os.path.exists(paths[s])]
        if todo:
            cache, probe, _, imp = lukv.run_full(model, ctx_ids, future_ids, cfg, cfg.horizon, None)
            for s in todo:
                _save_npy(paths[s], lukv.context_table(imp, lukv.scores_for(s, cache, probe, imp, cfg), cfg))
            computed += 1
        else:
            reused += 1
        for s in scorers:
            tables[s].append(np.load(paths[s]))  # (99, L, H)
        log(i + 1, len(contexts), f"profile {','.join(scorers)}: context {i + 1}/{len(contexts)} "
            f"({computed} computed, {reused} read from {cache_dir}, {time.time() - t0:.0f} s)")
    return {s: np.mean(t, axis=0) for s, t in tables.items()}, {"computed": computed, "reused": reused}


# -----------------------------------------------------------------------------
# kvpress tables: .npy [99, n_layer, n_kv_head] and a sidecar .json


def sidecar(path):
    return path[: -len(".npy")] + ".json"


def save_table(path, table, meta):
    """Write the table as float32 .npy (what LUKVPress np.loads) and its metadata beside it."""
    if not path.endswith(".npy"):
        raise ValueError(f"a kvpress budget table is a .npy file; got --out {path!r}")
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 3 or table.shape[0] != len(lukv.RATIOS):
        raise ValueError(f"expected a table of shape (99, n_layer, n_kv_head), got {table.shape}")
    _save_npy(path, table)
    with open(sidecar(path), "w") as f:
        json.dump(meta, f, indent=1)


def load_table(path, model_id, n_layer, n_kv_head):
    """(table, meta) of a saved table; refuse one made for another model or shape, by name."""
    if not os.path.exists(path) or not os.path.exists(sidecar(path)):
        raise FileNotFoundError(f"expected {path} and its metadata {sidecar(path)}; make them with "
                                f"python lukv.py --profile --model FOLDER --out {path}")
    table = np.load(path)
    with open(sidecar(path)) as f:
        meta = json.load(f)
    if meta.get("model") != model_id:
        raise ValueError(f"{path} was made for model {meta.get('model')}, not {model_id}; profile this model")
    if table.shape != (len(lukv.RATIOS), n_layer, n_kv_head):
        raise ValueError(f"{path} has shape {table.shape}, expected (99, {n_layer}, {n_kv_head})")
    return table, meta


# -----------------------------------------------------------------------------
# evaluation: lukv's task suite, plus decode time per token with each cache


@torch.no_grad()
def decode_ms_per_token(model, enc, methods, ratio, profiles, length, cfg, n_tokens=16, seed=0):
    """Milliseconds per greedy decode step with the full cache and with each (scorer, allocator)'s
    compressed cache, on one niah_single context (one untimed warm-up run first)."""
    ex = tasks.example_set("niah_single", 1, length, seed)[0]
    ctx, q_ids = enc.encode_ordinary(ex.context), enc.encode_ordinary(ex.qa[0][0])
    cache, probe, _, imp = lukv.run_full(model, ctx, q_ids, cfg, 1, None)
    start = torch.tensor([q_ids[:1]])

    def timed(c):
        model.generate(start, 2, cache=c.clone())  # warm-up
        t0 = time.perf_counter()
        model.generate(start, n_tokens, cache=c)  # n_tokens forward steps of one token each
        return 1000 * (time.perf_counter() - t0) / n_tokens

    out = {"full": timed(cache.clone())}
    for scorer, allocator in methods:
        scores = lukv.scores_for(scorer, cache, probe, imp, cfg)
        c = cache.clone()
        lukv.compress(c, scores, lukv.allocate(allocator, ratio, scores, cfg, profiles.get(scorer), imp))
        out[f"{scorer}+{allocator}"] = timed(c)
    return out


# -----------------------------------------------------------------------------
# command line: lukv.py --profile / --eval with --model FOLDER land here


KVPRESS_PRESSES = {"snapkv": "SnapKVPress()", "keydiff": "KeyDiffPress()", "knorm": "KnormPress()"}  # kvpress's names


def kvpress_usage(scorer, path, cfg):
    """How a kvpress user drops the table in (checked by hand with kvpress 0.5.5, which reads curves
    only from its own list of URLs: setting the loaded curve directly is the way in)."""
    press = f"LUKVPress({KVPRESS_PRESSES.get(scorer, f'<a {scorer} press>')}, sink={cfg.sink}, window={cfg.window})"
    return f"press = {press}; press._budget_curves = np.load('{path}')"


def table_path(out, scorer, n_scorers):
    """--out as given for one scorer; name_<scorer>.npy for each of several."""
    return out if n_scorers == 1 else out[: -len(".npy")] + f"_{scorer}.npy"


def run_cli(args, cfg):
    other = [name for name in ("demo", "full_cache", "knockout", "taskloss") if getattr(args, name)]
    if other or not (args.profile or args.eval):
        raise SystemExit("--model works with --profile and --eval" +
                         (f", not with --{other[0].replace('_', '-')}" if other else ""))
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, enc, model_id = load_model(args.model, dtype=dtype)
    m = model.cfg
    print(f"model: {args.model} (id {model_id}, {model.num_params() / 1e6:.1f}M parameters, {m.n_layer} layers x "
          f"{m.n_kv_head} KV heads, {model.embed_tokens.weight.dtype}, context {m.block_size})")
    scorers = args.scorers.split(",") if args.scorers else ["snapkv"]

    if args.profile:
        out = args.out or f"{os.path.basename(os.path.normpath(args.model))}_lukv.npy"
        if not out.endswith(".npy"):
            raise SystemExit(f"--out must name a .npy file (kvpress reads .npy), got {out!r}")
        documents = read_documents(args.text) if args.text else generated_prose()
        contexts = calibration_contexts(enc, documents, args.calib_contexts, args.length, cfg.horizon)
        source = f"text {args.text}" if args.text else "tasks.py generated prose (seed calibration-text-0)"
        if len(contexts) < args.calib_contexts:
            print(f"the text holds {len(contexts)} contexts of {args.length} + {cfg.horizon} tokens, "
                  f"not {args.calib_contexts}: profiling those")
        cache_dir = out[: -len(".npy")] + ".cache"
        print(f"profiling {len(contexts)} contexts of {args.length} tokens; per-context results in {cache_dir}/ "
              f"(stop at any time; the same command resumes)")
        tables, counts = profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir)
        for s, table in tables.items():
            path = table_path(out, s, len(scorers))
            meta = lukv.profile_meta(s, model_id, cfg, horizon=cfg.horizon, model_folder=os.path.abspath(args.model),
                                     calibration=f"{source}: {len(contexts)} contexts of {args.length} tokens, "
                                                 f"future = the next {cfg.horizon} text tokens + {cfg.horizon} "
                                                 f"generated", contexts_computed=counts["computed"],
                                     snap_kernel=cfg.snap_kernel,
                                     kvpress=kvpress_usage(s, os.path.abspath(path), cfg))
            save_table(path, table, meta)
            print(f"wrote {path} {table.shape} and {sidecar(path)}")

    if args.eval:
        profiles = {}
        if args.table:
            table, meta = load_table(args.table, model_id, m.n_layer, m.n_kv_head)
            profiles[meta["scorer"]] = table
        allocators = args.allocators.split(",") if args.allocators else ["uniform", "pyramid", "adakv", "lukv"]
        methods = [(s, a) for s in scorers for a in allocators if a not in ("lukv", "shuffled") or s in profiles]
        skipped = [(s, a) for s in scorers for a in allocators if (s, a) not in methods]
        if skipped:
            print(f"skipping {skipped}: the lukv allocator needs --table made with that scorer")
        families = args.families.split(",") if args.families else tasks.EVAL_FAMILIES
        ratios = [float(r) for r in args.ratios.split(",")]
        result = lukv.evaluate(model, enc, profiles, families, ratios, methods, args.n or 10, args.length, args.seed,
                               cfg, tuple(args.settings.split(",")))
        print(lukv.format_table(result))
        result["decode_ms_per_token"] = {r: decode_ms_per_token(model, enc, methods, r, profiles, args.length, cfg)
                                         for r in ratios if r > 0}
        for r, timings in result["decode_ms_per_token"].items():
            print(f"decode time per token at {r:.0%} compression (CPU threads {torch.get_num_threads()}): " +
                  ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items()))
        result["model"] = {"folder": os.path.abspath(args.model), "id": model_id}
        lukv.write_json(args.json, result)
