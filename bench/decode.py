"""
End-to-end decode benchmark: prefill + scoring + eviction, then per-token decode, ours against
Hugging Face transformers (eager, and a StaticCache under torch.compile) and kvpress, on models with
random weights of real configs.

What one row measures, for one (model, context T, batch B, implementation):
  prefill    the prompt through the model, with scoring and eviction where the row evicts
  decode     per-token latency over --new generated tokens, greedy (median of per-step times)
  KV bytes   K and V the cache holds after the last token (allocated, spare rows included)
  roof       the bytes a step must read (every weight once + the KV it attends over) at the copy
             bandwidth measured at the start of the run; share = roof ms / decode ms

Implementations (--impls):
  ours-full        model.py's blocks, a packed cache holding every token; Triton decode + append
  ours-lukv        the same with LU-KV-style per-head budgets at --ratio (a skewed [99, L, H] table),
                   SnapKV scores (lukv.snapkv_scores), kernels.evict right after each layer's prefill
  hf-full          transformers LlamaForCausalLM, SDPA, DynamicCache (the same weights as ours)
  hf-compiled      the same with a StaticCache, the step under torch.compile(mode="reduce-overhead",
                   fullgraph=True): CUDA graphs (on the CPU Dynamo only: a check of the path, not a timing)
  kvpress-adakv    kvpress AdaKVPress(SnapKVPress) at --ratio: masks evicted keys, frees nothing
  kvpress-lukv     kvpress LUKVPress(SnapKVPress) with our table: masks, frees nothing
  kvpress-snapkv   kvpress SnapKVPress at --ratio: gathers the kept rows (uniform budgets, frees)

Ours runs a lean path written here on top of model.py and kernels.py (model.generate spends
its time in Python per step): the prefill goes through model.py's Block.forward one batch row at
a time and evicts each layer as soon as it is computed (the full cache of one layer of one row
is the most that is ever held), logits only for the last position; the decode step is one
static-shaped function (embedding, blocks, kernels.append_, kernels.decode_attention, argmax)
captured into a CUDA graph and replayed once per token. Hugging Face and kvpress run their own
eager loops (kvpress's pipeline does the same: one forward per token with position_ids).

Nothing compiles in a timed region (warm_up, each row's warm-up steps), which the run checks
("compile-free"); --profile-step shows where one decode step of ours spends its time.

    python -m bench.decode --quick                   # CPU smoke test at tiny sizes (seconds)
    python -m bench.decode                           # the whole table on a CUDA card (~9 minutes on an H200)
    python -m bench.decode --models llama3.1-8b --contexts 32768 --batch 1 --out runs/e2e.json
    python -m bench.decode --models llama3.1-8b --contexts 32768 --batch 1 --impls ours-full --profile-step

Shapes: B batch, L layers, H KV heads, G query heads per KV head, T tokens, D head dim, C width.
"""

import contextlib
import datetime
import gc
import json
import os
import platform
import re
import sys
import time
import types

import numpy as np
import torch

import kernels
import lukv  # the SnapKV scorer and its settings (LUKVConfig)
import solver
import tasks  # the house argument parser (one-line refusals, exit code 2)
from model import GPT, GPTConfig, Probe, apply_rope

# -----------------------------------------------------------------------------
# the models: Hugging Face config.json fields, from which both our GPTConfig and the LlamaConfig are made

MODELS = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=True, contexts=[8192]),
    "llama3.1-8b": dict(  # meta-llama/Llama-3.1-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, tie_word_embeddings=False, contexts=[32768, 131072]),
    "tiny": dict(  # --quick: a CPU smoke test of every code path
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        rms_norm_eps=1e-5, tie_word_embeddings=False, contexts=[256]),  # untied: greedy tokens depend on the cache
}
IMPLS = ["ours-full", "ours-lukv", "hf-full", "hf-compiled", "kvpress-adakv", "kvpress-lukv", "kvpress-snapkv"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpt_config(spec, block_size):
    """Our GPTConfig of a MODELS entry (the fields experiments/hf.py's hf_config reads from a config.json)."""
    return GPTConfig(vocab_size=spec["vocab_size"], block_size=block_size, n_layer=spec["num_hidden_layers"],
                     n_head=spec["num_attention_heads"], n_kv_head=spec["num_key_value_heads"],
                     n_embd=spec["hidden_size"], mlp_hidden=spec["intermediate_size"], rope_theta=spec["rope_theta"],
                     norm_eps=spec["rms_norm_eps"], tie_embeddings=spec["tie_word_embeddings"],
                     head_dim=spec["head_dim"], rope_scaling=spec["rope_scaling"])


@contextlib.contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_ours(spec, block_size, device, dtype, seed=0):
    """GPT with random weights, made on the device in dtype (nothing is downloaded)."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = GPT(gpt_config(spec, block_size))
    return model.requires_grad_(False).eval()


def build_hf(spec, ours):
    """transformers' LlamaForCausalLM (SDPA) holding our model's very tensors: no second copy of the weights.

    Our parameter names are Hugging Face's without "model.", so the state dict maps one to one; the
    model is made on the meta device, its tensors assigned, its rotary tables made on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = dict(rope_type="default") if spec["rope_scaling"] is None else dict(spec["rope_scaling"])
    config = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"], rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_word_embeddings"], max_position_embeddings=ours.cfg.block_size,
        rope_parameters=dict(rope_theta=spec["rope_theta"], **rope), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected, f"HF and our names differ: missing {missing}, unexpected {unexpected}"
    with torch.device(ours.embed_tokens.weight.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    if spec["tie_word_embeddings"]:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.requires_grad_(False).eval()


def import_kvpress():
    """kvpress 0.5.5, or the reason it cannot be imported.

    kvpress imports every press at import time; three of them (DuoAttention, the Expected Attention
    statistics, LU-KV's table download) need datasets, fire and cachetools, which this benchmark never
    calls. Where those are missing, empty stand-ins are put in their place (the presses used here
    never touch them)."""
    for name in ("datasets", "fire", "cachetools"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.load_dataset = stub.Fire = None
            stub.LRUCache = lambda maxsize: {}
            stub.cached = lambda cache, key=None: (lambda fn: fn)
            sys.modules[name] = stub
    try:
        import kvpress
    except Exception as e:  # an import error, or a transformers version kvpress does not support
        return None, f"{type(e).__name__}: {e}"
    return kvpress, ""


# -----------------------------------------------------------------------------
# per-head budgets: a LU-KV-style table with random skew, shared by ours and kvpress's LUKVPress


def skewed_table(L, H, seed=0, sigma=0.6):
    """A [99, L, H] table of prune ratios (kvpress LUKVPress layout): head (l, h) keeps share[l, h] times
    the average, share lognormal(0, sigma) with mean 1, so budgets are as uneven as real profiles."""
    rng = np.random.default_rng(seed)
    share = rng.lognormal(0.0, sigma, (L, H))
    share /= share.mean()
    keep = np.clip((1 - solver.RATIOS)[:, None, None] * share[None], 0.0, 1.0)  # (99, L, H)
    return (1 - keep).astype(np.float32)


# -----------------------------------------------------------------------------
# ours: the lean prefill (model.py's blocks, one row at a time, evict each layer at once)


class _Collect:
    """Stands in for a KVCache during the lean prefill: Attention.forward hands it each layer's K and V."""
    seen = 0

    def prefill(self, layer, k, v):
        self.k, self.v = k, v  # (1, H, T, D) each


class PackedCache:
    """The packed per-head layout of model.KVCache, one (N_l, D) tensor pair per layer (kernels.PackedKV).

    Rows of batch row b, head h of layer l live at start[l, b, h] ... start + capacity - 1; the first
    length[l, b, h] hold kept tokens in ascending order, the rest are spare rows for the decode's appends.
    Every batch row has the same counts, so row b's block is row 0's shifted by b * rows_per_row[l]."""

    def __init__(self, counts, B, D, slack, device, dtype):
        L, H = counts.shape
        counts = torch.tensor(counts, dtype=torch.long)  # a copy: appends grow length in place
        capacity = counts + slack  # (L, H)
        start_row = torch.cumsum(capacity, 1) - capacity  # (L, H) exclusive prefix sum within a row
        self.rows_per_row = capacity.sum(1)  # (L,)
        offsets = torch.arange(B)[None, :, None] * self.rows_per_row[:, None, None]  # (L, B, 1)
        self.start = (start_row[:, None, :] + offsets).to(device)  # (L, B, H)
        self.length = counts[:, None, :].expand(L, B, H).clone().to(device)  # (L, B, H)
        self.capacity = capacity[:, None, :].expand(L, B, H).clone().to(device)
        n_rows = [int(B * r) for r in self.rows_per_row]
        self.k = [torch.empty(n, D, dtype=dtype, device=device) for n in n_rows]  # (N_l, D)
        self.v = [torch.empty(n, D, dtype=dtype, device=device) for n in n_rows]
        self.pos = [torch.full((n,), -1, dtype=torch.long, device=device) for n in n_rows]  # (N_l,)

    def row_block(self, layer, b):
        n = int(self.rows_per_row[layer])
        return slice(b * n, (b + 1) * n)

    def nbytes(self, allocated=True):
        """K and V bytes: every row allocated (spare rows included), or only the rows in use."""
        if allocated:
            return sum(t.numel() * t.element_size() for t in self.k + self.v)
        D, size = self.k[0].shape[1], self.k[0].element_size()
        return int(self.length.sum()) * D * size * 2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_ours(model, ids, counts, lcfg, slack, impl, timer):
    """Prefill ids (B, T) row by row into a PackedCache with counts (L, H) (None = keep every token).

    Returns (cache, first generated tokens (B, 1)). timer() brackets the scoring + eviction."""
    B, T = ids.shape
    cfg, device = model.cfg, ids.device
    H, D = cfg.n_kv_head, cfg.head_dim
    full = counts is None
    counts = np.full((cfg.n_layer, H), T) if full else counts
    cache = PackedCache(counts, B, D, slack, device, model.embed_tokens.weight.dtype)
    w = min(lcfg.snap_window, T)
    query_pos = torch.arange(T - w, T, device=device)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, D)
    first = torch.empty(B, 1, dtype=torch.long, device=device)
    collect = _Collect()
    for b in range(B):
        x = model.embed_tokens(ids[b:b + 1])  # (1, T, C)
        for l, block in enumerate(model.layers):
            probe = None if full else Probe(query_pos=query_pos)
            x = block(x, cos, sin, collect, probe)
            k, v = collect.k, collect.v  # (1, H, T, D)
            block_rows = cache.row_block(l, b)
            if full:
                rows = cache.start[l, 0][:, None] + torch.arange(T, device=device)  # (H, T) row b=0 layout
                cache.k[l][block_rows][rows.flatten()] = k[0].reshape(H * T, D)
                cache.v[l][block_rows][rows.flatten()] = v[0].reshape(H * T, D)
                cache.pos[l][block_rows][rows.flatten()] = torch.arange(T, device=device).repeat(H)
            else:
                with timer():
                    scores = lukv.snapkv_scores(probe, lcfg)  # (1, H, T) row 0 of the probe = this row
                    packed = kernels.evict(k.contiguous(), v.contiguous(), scores.contiguous(),
                                           torch.as_tensor(counts[l][None]), lcfg.sink, lcfg.window, slack, impl)
                    cache.k[l][block_rows], cache.v[l][block_rows] = packed.k, packed.v
                    cache.pos[l][block_rows] = packed.pos
            collect.k = collect.v = probe = None
        logits = model.lm_head(model.norm(x[:, -1:]))  # (1, 1, V): the last position only
        first[b] = logits[0, -1].argmax(-1)
    return cache, first


# -----------------------------------------------------------------------------
# ours: the lean decode step (static shapes, no host sync: graph-capturable)


class DecodeStep:
    """One greedy decode step of every batch row over a PackedCache, in place on static buffers.

    tok (B, 1) is the token to feed, pos (1,) its position; step() appends its K/V to every head,
    attends, writes the next token into tok and advances pos. The same math as model.GPT.forward with
    a KVCache (Attention.forward's decode branch), without its per-step host work."""

    def __init__(self, model, cache, first, position, impl):
        self.model, self.cache, self.impl = model, cache, impl
        self.tok = first.clone()  # (B, 1)
        self.pos = torch.tensor([position], device=first.device)  # (1,)
        self.position = position  # append_ takes the position as a number; a graph replays the captured one

    def step(self):
        model, cache, cfg = self.model, self.cache, self.model.cfg
        B = self.tok.shape[0]
        H, G, D = cfg.n_kv_head, cfg.group, cfg.head_dim
        cos, sin = model.rope_cos.index_select(0, self.pos), model.rope_sin.index_select(0, self.pos)  # (1, D)
        x = model.embed_tokens(self.tok)  # (B, 1, C)
        for l, block in enumerate(model.layers):
            attn = block.self_attn
            h = block.input_layernorm(x)
            q = apply_rope(attn.q_proj(h).view(B, H * G, D), cos, sin)  # (B, H*G, D)
            k = apply_rope(attn.k_proj(h).view(B, H, D), cos, sin)  # (B, H, D)
            v = attn.v_proj(h).view(B, H, D)  # (B, H, D)
            kernels.append_(cache.k[l], cache.v[l], cache.pos[l], cache.start[l], cache.length[l], cache.capacity[l],
                            k.view(B, H, 1, D), v.view(B, H, 1, D), self.position, impl=self.impl, check=False)
            y = kernels.decode_attention(q.view(B, H, G, D).contiguous(), cache.k[l], cache.v[l], cache.start[l],
                                         cache.length[l], impl=self.impl)  # (B, H, G, D)
            x = x + attn.o_proj(y.reshape(B, 1, H * G * D))
            x = x + block.mlp(block.post_attention_layernorm(x))
        logits = model.lm_head(model.norm(x))  # (B, 1, V)
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos += 1
        self.position += 1


@torch.no_grad()
def decode_ours(step, n_new, use_graph, warmup=3):
    """Greedy tokens (B, n_new) and per-step milliseconds, replaying a CUDA graph of the step if asked."""
    device = step.tok.device
    cache = step.cache
    saved = [t.clone() for t in cache.length], step.tok.clone(), step.pos.clone(), step.position
    run = step.step
    if use_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles the kernels and settles the allocator before capture
                step.step()
        torch.cuda.current_stream(device).wait_stream(stream)
        # warm-up tokens are forgotten: lengths back, so the spare rows they used are free again
        for t, s in zip(cache.length, saved[0]):
            t.copy_(s)
        step.tok.copy_(saved[1])
        step.pos.copy_(saved[2])
        step.position = saved[3]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.step()
        run = graph.replay
    tokens, times = [], []
    for _ in range(n_new):
        tokens.append(step.tok.clone())
        times.append(_timed(run, device))
    tokens = torch.cat(tokens, dim=1)  # (B, n_new): the fed tokens, first = the prefill's
    return tokens, times


def _timed(fn, device):
    """Milliseconds of fn(): CUDA events on a GPU (no sync inside the step), the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


class _EventTimer:
    """Sums the time of bracketed regions with CUDA events (no sync until total())."""

    def __init__(self, device):
        self.device, self.pairs, self.cpu_ms = device, [], 0.0

    @contextlib.contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.cpu_ms += 1e3 * (time.perf_counter() - t0)

    def total_ms(self):
        _sync(self.device)
        return self.cpu_ms + sum(s.elapsed_time(e) for s, e in self.pairs)


def run_ours(model, ids, counts, lcfg, n_new, impl, use_graph):
    """One row of ours: (timings and bytes, tokens)."""
    device = ids.device
    timer = _EventTimer(device)
    _sync(device)
    t0 = time.perf_counter()
    cache, first = prefill_ours(model, ids, counts, lcfg, n_new, impl, timer)
    _sync(device)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    step = DecodeStep(model, cache, first, ids.shape[1], impl)
    tokens, times = decode_ours(step, n_new, use_graph)
    out = dict(prefill_ms=prefill_ms, score_evict_ms=None if counts is None else timer.total_ms(),
               kv_bytes=cache.nbytes(allocated=True), kv_bytes_in_use=cache.nbytes(allocated=False),
               graph=use_graph, **_latency(times))
    return out, tokens


def _latency(times):
    times = np.asarray(times)
    return dict(decode_ms_median=float(np.median(times)), decode_ms_mean=float(times.mean()),
                decode_ms_p90=float(np.percentile(times, 90)), decode_steps=len(times))


# -----------------------------------------------------------------------------
# Hugging Face and kvpress: their own eager loops, as kvpress's pipeline runs them


def _hf_kv_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def run_hf(hf, ids, n_new, press=None, warmup=3):
    """Prefill ids (B, T) (inside the press's context when given), then n_new greedy steps of one token."""
    from transformers import DynamicCache

    device = ids.device
    B, T = ids.shape
    cache = DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    with press(hf) if press is not None else contextlib.nullcontext():
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    kv_after_prefill = _hf_kv_bytes(cache)
    position = T
    tokens, times = [], []

    def step():
        nonlocal tok, position
        out = hf(input_ids=tok, past_key_values=cache, use_cache=True,
                 position_ids=torch.full((B, 1), position, device=device))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        position += 1

    for i in range(warmup + n_new):
        if i >= warmup:
            tokens.append(tok)
            times.append(_timed(step, device))
        else:
            step()
    for layer in hf.model.layers:  # kvpress's masks live on the modules: drop them for the next row
        layer.self_attn.masked_key_indices = None
    result = dict(prefill_ms=prefill_ms, score_evict_ms=None, kv_bytes=_hf_kv_bytes(cache),
                  kv_bytes_after_prefill=kv_after_prefill, graph=False, warmup_tokens=warmup, **_latency(times))
    return result, torch.cat(tokens, dim=1)


# why the hf-compiled row has no kvpress twin (read in kvpress 0.5.5: presses/base_press.py, attention_patch.py)
KVPRESS_UNDER_COMPILE = (
    "kvpress presses cannot run under it: SnapKVPress's prefill hook replaces each layer's K/V with shorter tensors, "
    "which a StaticCache (fixed tensors at static addresses, written at position T + i) cannot hold; the masking "
    "presses (AdaKV, LU-KV) rewrite the evicted keys at every decode step in kvpress's attention patch, whose fake-key "
    "search loops in Python on mask.any() (a host sync: a graph break, so neither fullgraph nor a CUDA graph); and "
    "kvpress's hook reads cache_position, which transformers >= 5.3 no longer passes")


@torch.no_grad()
def prefill_hf_static(hf, ids, max_len):
    """Prefill ids (B, T) a row at a time with a DynamicCache (hf-full's SDPA prefill, one row's transients at a
    time), then hand each layer to a StaticCache of max_len tokens. Returns (cache, first tokens (B, 1)).

    Only public calls: a layer's first StaticCache.update of T tokens writes positions 0 .. T-1 (transformers 5.2
    by its default cache positions, later 5.x by the cache's own length), so one code serves both."""
    from transformers import DynamicCache, StaticCache

    rows, first = [], []
    for b in range(ids.shape[0]):
        rows.append(DynamicCache())
        out = hf(input_ids=ids[b:b + 1], past_key_values=rows[-1], use_cache=True, logits_to_keep=1)
        first.append(out.logits[:, -1].argmax(-1, keepdim=True))  # (1, 1)
    cache = StaticCache(config=hf.config, max_cache_len=max_len)
    for l in range(len(rows[0].layers)):
        k, v = (torch.cat([getattr(r.layers[l], name) for r in rows]) for name in ("keys", "values"))  # (B, H, T, D)
        for r in rows:  # the rows' layer goes as its static copy comes: one layer is held twice at most
            r.layers[l].keys = r.layers[l].values = None
        cache.update(k, v, l)  # allocates the layer's (B, H, max_len, D) tensors
    return cache, torch.cat(first)


@torch.no_grad()
def run_hf_compiled(hf, ids, n_new, warmup=3):
    """transformers' static-cache recipe (decode_one_tokens of its LLM-optimization guide): a StaticCache, one greedy
    step of one token under torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False).

    The warm-up steps compile (1), record the CUDA graph (2) and replay it, before the timed steps; Dynamo's graph
    count around the timed steps shows any recompile. On the CPU: backend="eager" (Dynamo's capture only)."""
    import inspect

    from torch._dynamo.utils import counters

    device, (B, T) = ids.device, ids.shape
    cuda = device.type == "cuda"
    _sync(device)
    t0 = time.perf_counter()
    cache, tok = prefill_hf_static(hf, ids, T + warmup + n_new)
    _sync(device)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    # transformers 5.2 takes cache_position (where a step writes, what its mask admits); later 5.x dropped the
    # argument and the StaticCache counts its own length
    takes_cache_position = "cache_position" in inspect.signature(type(hf.model).forward).parameters

    def decode_one(tok, position_ids):  # (B, 1) token and position -> the next tokens (B, 1)
        extra = dict(cache_position=position_ids[0]) if takes_cache_position else {}
        logits = hf(input_ids=tok, position_ids=position_ids, past_key_values=cache, use_cache=True, **extra).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def step():
        nonlocal tok
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten from here
        tok = compiled(tok, torch.full((B, 1), T + len(steps_done), device=device)).clone()  # out of the graph's pool
        steps_done.append(1)

    steps_done, note, skips = [], KVPRESS_UNDER_COMPILE, counters["inductor"]["cudagraph_skips"]
    try:
        t0 = time.perf_counter()
        for fullgraph in (True, False):  # a graph break: said in the note, and compiled with breaks
            compiled = torch.compile(decode_one, fullgraph=fullgraph, dynamic=False,
                                     **(dict(mode="reduce-overhead") if cuda else dict(backend="eager")))
            try:
                step()
                break
            except Exception as e:
                if not fullgraph or isinstance(e, torch.OutOfMemoryError):
                    raise
                note = f"fullgraph=True failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); " + note
                torch.compiler.reset()
        for _ in range(warmup - 1):
            step()
        _sync(device)
        compile_s, graphs = time.perf_counter() - t0, counters["stats"]["unique_graphs"]
        tokens, times = [], []
        for _ in range(n_new):
            tokens.append(tok)
            times.append(_timed(step, device))
        return dict(prefill_ms=prefill_ms, score_evict_ms=None, kv_bytes=_hf_kv_bytes(cache), graph=cuda,
                    warmup_tokens=warmup, compile_s=compile_s, fullgraph=fullgraph,
                    backend="inductor + CUDA graphs" if cuda else "eager (Dynamo only; CPU)",
                    compiles_in_timed_steps=counters["stats"]["unique_graphs"] - graphs,
                    cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips, note=note,
                    **_latency(times)), torch.cat(tokens, dim=1)
    finally:  # the compiled graph, its memory pool and its hold on this row's cache go
        compiled = decode_one = cache = None
        torch.compiler.reset()


def make_press(kvpress, name, ratio, table, lcfg):
    if name == "kvpress-adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    if name == "kvpress-snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "kvpress-lukv":
        press = kvpress.LUKVPress(press=kvpress.SnapKVPress(), compression_ratio=ratio, sink=lcfg.sink,
                                  window=lcfg.window)
        press._budget_curves = table  # our table instead of the download LUKVPress would make
        return press
    raise ValueError(f"unknown kvpress row {name!r}")


# -----------------------------------------------------------------------------
# the memory roof, compiles kept out of the timed regions, where one decode step of ours spends its time


@torch.no_grad()
def copy_roof(device, reps=10):
    """(GB/s, what was measured): one large copy, read + write bytes, median of reps (a host copy on the CPU)."""
    n = 2 ** 30 if device.type == "cuda" else 2 ** 26  # 1 GiB on a card (far past its L2), 64 MiB on a host
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src).copy_(src)  # first touch
    ms = float(np.median([_timed(lambda: dst.copy_(src), device) for _ in range(reps)]))
    where = "device-to-device" if device.type == "cuda" else "host (CPU)"
    return 2 * n / ms / 1e6, f"{where} copy of {n >> 20} MiB, read + write bytes, median of {reps}"


def roof_fields(row, weight_bytes, roof_gbps):
    """What one decode step reads (every weight once + the KV it attends over, as held after the last step: ours'
    rows in use; the whole cache of Hugging Face and kvpress, masked rows included), the least time that takes at
    the measured copy bandwidth, and that as a share of the measured step."""
    kv = row.get("kv_bytes_in_use", row["kv_bytes"])
    roof_ms = (weight_bytes + kv) / roof_gbps / 1e6
    return dict(weight_bytes=weight_bytes, kv_read_bytes=kv, bytes_per_step=weight_bytes + kv, roof_ms=roof_ms,
                roof_share=roof_ms / row["decode_ms_median"])


@torch.no_grad()
def warm_evict(model, T, counts, lcfg, slack, impl):
    """kernels.evict for each layer's counts at the prefill's own shapes, so Triton compiles every specialisation the
    rows of context T use before they are timed. (Triton specialises integer arguments on divisibility by 16: after
    a 2048-token warm-up, 2 slices, the 32-slice compile of 32k fell in the first timed score + evict: 1,563 ms.)"""
    cfg, w = model.cfg, model.embed_tokens.weight
    k = torch.randn(1, cfg.n_kv_head, T, cfg.head_dim, device=w.device, dtype=w.dtype)  # (1, H, T, D), K and V
    scores = torch.rand(1, cfg.n_kv_head, T, device=w.device)  # (1, H, T) float32, as lukv.snapkv_scores's
    for l in range(cfg.n_layer):
        kernels.evict(k, k, scores, torch.as_tensor(counts[l][None]), lcfg.sink, lcfg.window, slack, impl)
    _sync(w.device)


def compile_free(first_ms, later_ms, factor=1.5, slack_ms=1.0):
    """Whether a case's first timed score + evict lies within the spread of later timings of the same case (one over
    max(later) * factor + slack_ms paid a compile, or another one-time cost, inside its timed region)."""
    return first_ms <= max(later_ms) * factor + slack_ms


# (group, lower-case pieces of CUDA kernel or aten op names), the first match wins. A name does not say which module
# launched it: the adds, muls and casts of the norms and RoPE count as elementwise, the embedding lookup as RoPE
KERNEL_GROUPS = [
    ("attention decode", ("decode_split", "decode_combine", "flash", "fmha", "attention", "softmax")),
    ("append", ("append", "index_put", "nonzero")),
    ("GEMV/matmul", ("gemv", "gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk", "aten::mm", "aten::addmm",
                     "aten::bmm", "aten::matmul", "aten::linear")),
    ("norms", ("meanops", "rsqrt", "pow_tensor", "aten::mean", "aten::pow")),
    ("RoPE", ("catarray", "aten::cat", "neg_kernel", "aten::neg", "index_select", "indexselect")),
    ("elementwise/residual", ("elementwise", "functor", "silu", "copy", "aten::add", "aten::mul", "aten::to")),
]


def kernel_group(name):
    return next((g for g, pieces in KERNEL_GROUPS if any(p in name.lower() for p in pieces)), "other")


def summarize_kernels(seen, steps, top=25):
    """Per-step totals of profiled kernels [(name, calls, us)]: the `top` ones by time, and the KERNEL_GROUPS sums."""
    total = sum(us for _, _, us in seen) or 1.0
    groups = {}
    for name, calls, us in sorted(seen, key=lambda k: -k[2]):
        g = groups.setdefault(kernel_group(name), dict(launches=0.0, us=0.0, share=0.0))
        g.update(launches=g["launches"] + calls / steps, us=g["us"] + us / steps, share=g["share"] + us / total)
    return dict(kernel_ms_per_step=total / steps / 1e3, launches_per_step=sum(c for _, c, _ in seen) / steps,
                groups=dict(sorted(groups.items(), key=lambda g: -g[1]["us"])),
                top=[dict(name=n, group=kernel_group(n), calls_per_step=c / steps, us_per_step=us / steps,
                          share=us / total) for n, c, us in sorted(seen, key=lambda k: -k[2])[:top]])


@torch.no_grad()
def profile_step(model, ids, counts, lcfg, impl, use_graph, steps=None):
    """torch.profiler over `steps` eager decode steps of ours (every kernel visible; on the CPU, a smoke test, aten
    ops by self time), summed per name and group, beside the median eager step and the replay of its CUDA graph."""
    device = ids.device
    cuda = device.type == "cuda"
    steps = steps or (20 if cuda else 4)
    cache, first = prefill_ours(model, ids, counts, lcfg, 3 * steps + 16, impl, _EventTimer(device))
    step = DecodeStep(model, cache, first, ids.shape[1], impl)
    for _ in range(3):  # any compile happens here, not in the profiled steps
        step.step()
    out = dict(steps=steps, eager_ms=float(np.median([_timed(step.step, device) for _ in range(5)])))
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step.step()
            _sync(device)
        seen = [(e.key, e.count, getattr(e, "device_time_total", 0) if cuda else e.self_cpu_time_total)
                for e in prof.key_averages() if (e.device_type != DeviceType.CPU) == cuda]
        seen = [s for s in seen if s[2] > 0]
        out.update(summarize_kernels(seen, steps) if seen else dict(profiler="unavailable: no kernels recorded"))
    except Exception as e:  # no profiler, or no CUPTI: said, and the timings kept
        out["profiler"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if use_graph:
        out["graph_ms"] = float(np.median(decode_ours(step, steps, use_graph=True)[1]))
    return out


def profile_lines(title, p):
    lines = [f"-- {title}: eager step {p['eager_ms']:.3f} ms"
             + (f", CUDA-graph replay {p['graph_ms']:.3f} ms" if "graph_ms" in p else "")]
    if "profiler" in p:
        return lines + [f"   profiler {p['profiler']}"]
    lines.append(f"   {p['launches_per_step']:.0f} kernels, {p['kernel_ms_per_step']:.3f} ms of kernel time per step"
                 + (f" ({p['kernel_ms_per_step'] / p['graph_ms']:.0%} of the replay)" if "graph_ms" in p else ""))
    lines += [f"   {g:22s} {v['launches']:6.0f} launches {v['us']:9.1f} us {v['share']:6.1%}"
              for g, v in p["groups"].items()]
    return lines + [f"   {t['us_per_step']:9.1f} us {t['calls_per_step']:4.0f}x {t['share']:6.1%}  {t['group']:20s} "
                    f"{t['name'][:100]}" for t in p["top"]]


# -----------------------------------------------------------------------------
# one case: every implementation, OOM caught, memory needs stated


def kv_full_bytes(cfg, B, T, dtype):
    return 2 * cfg.n_layer * B * cfg.n_kv_head * T * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def predicted_need(impl, cfg, B, T, n_new, ratio, weights_bytes, dtype):
    """A lower bound on the bytes a row holds at its peak: the weights + the KV it keeps at once."""
    full = kv_full_bytes(cfg, B, T + n_new, dtype)
    if impl in ("ours-full", "hf-full", "hf-compiled", "kvpress-adakv", "kvpress-lukv"):  # every token stays
        return weights_bytes + full
    one_layer = full // cfg.n_layer // (B if impl == "ours-lukv" else 1)  # ours prefills a row at a time
    return weights_bytes + int((1 - ratio) * full) + one_layer


def case_inputs(cfg, B, T, args, device):
    """(prompt ids (B, T), per-head keep counts (L, H), LUKVConfig, budget table) of one case: the same every call."""
    lcfg = lukv.LUKVConfig()
    table = skewed_table(cfg.n_layer, cfg.n_kv_head, seed=args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    return ids, lukv.lukv_counts(args.ratio, T, lcfg, table), lcfg, table


def run_row(impl, model, hf, kvpress_mod, ids, counts, lcfg, table, args):
    if impl in ("ours-full", "ours-lukv"):
        return run_ours(model, ids, counts if impl == "ours-lukv" else None, lcfg, args.new, args.impl, args.graph)
    if impl == "hf-full":
        return run_hf(hf, ids, args.new)
    if impl == "hf-compiled":
        return run_hf_compiled(hf, ids, args.new)
    return run_hf(hf, ids, args.new, make_press(kvpress_mod, impl, args.ratio, table, lcfg))


def run_case(name, model, hf, kvpress_mod, kvpress_why, impls, B, T, args, device, log):
    cfg = model.cfg
    ids, counts, lcfg, table = case_inputs(cfg, B, T, args, device)
    dtype = model.embed_tokens.weight.dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors once
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    rows, tokens = [], {}
    for impl in impls:
        row = dict(model=name, context=T, batch=B, impl=impl, ratio=0.0 if impl.startswith(("ours-full", "hf"))
                   else args.ratio, dtype=str(dtype).removeprefix("torch."),
                   kv_bytes_full=kv_full_bytes(cfg, B, T + args.new, dtype))
        need = predicted_need(impl, cfg, B, T, args.new, args.ratio, weights, dtype)
        row["need_bytes_lower_bound"] = need
        if impl.startswith("kvpress") and kvpress_mod is None:
            row.update(status="skipped", why=f"kvpress unavailable: {kvpress_why}")
        elif impl.startswith(("hf", "kvpress")) and hf is None:
            row.update(status="skipped", why="transformers unavailable")
        elif total_mem is not None and need > total_mem and not args.no_predict_oom:
            row.update(status="OOM", why=f"predicted: weights + KV held need >= {need / 2**30:.1f} GiB, "
                                         f"the card has {total_mem / 2**30:.1f} GiB")
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                result, tok = run_row(impl, model, hf, kvpress_mod, ids, counts, lcfg, table, args)
                row.update(status="ok", **result)
                row.update(roof_fields(row, weights, args.roof_gbps))
                tokens[impl] = (result.get("warmup_tokens", 0), tok.cpu())  # HF rows record after their warm-up
            except torch.OutOfMemoryError as e:
                row.update(status="OOM", why=f"caught: {str(e).splitlines()[0][:160]}")
            except Exception as e:  # one failing row (a compile, say) must not end a device run: said in its row
                row.update(status="error", why=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            finally:
                for layer in (hf.model.layers if hf is not None else []):
                    layer.self_attn.masked_key_indices = None
                gc.collect()
            if device.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                torch.cuda.empty_cache()
        rows.append(row)
        log(row)
    # the same weights and prompt: the full-cache rows should decode the same tokens (bf16 rounding aside), compared
    # at the same positions: ours records from the first generated token, Hugging Face's rows after their warm-up
    for a, b, field in (("ours-full", "hf-full", "tokens_same_as_other_full"),
                        ("hf-compiled", "hf-full", "tokens_same_as_hf_full")):
        if a in tokens and b in tokens:
            (skip_a, x), (skip_b, y) = tokens[a], tokens[b]
            start = max(skip_a, skip_b)
            x, y = x[:, start - skip_a:], y[:, start - skip_b:]  # both from generated token `start` on
            n = min(x.shape[1], y.shape[1])
            same = (x[:, :n] == y[:, :n]).float().mean().item()
            for row in rows:
                if row["impl"] in ((a, b) if field == "tokens_same_as_other_full" else (a,)):
                    row[field] = same
    return rows


# -----------------------------------------------------------------------------
# the self-check: the lean path decodes what model.py's own KVCache path decodes


@torch.no_grad()
def check_lean_path(spec, device, dtype, T=200, n_new=6, ratio=0.8, impl="v1", seed=0):
    """Greedy tokens of the lean path == model.generate over a KVCache evicted with the same scores and counts.

    Both run B = 1 (the same matrix shapes, so the same rounding); the reference prefills with model.forward,
    scores with lukv.snapkv_scores on its probe and evicts with KVCache.evict. They run on a twin of the spec's
    model whose tokens depend on the cache: an untied output head (a tied random model repeats its last token,
    whatever the cache holds) and weight matrices 4x the init's (at std 0.02 attention barely moves the logits;
    4 is exact in every float format). Returns a list of failures."""
    model = build_ours(dict(spec, tie_word_embeddings=False), T + n_new + 8, device, dtype, seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(4)
    cfg, device = model.cfg, model.embed_tokens.weight.device
    lcfg = lukv.LUKVConfig()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)
    counts = lukv.lukv_counts(ratio, T, lcfg, skewed_table(cfg.n_layer, cfg.n_kv_head, seed))
    failures = []
    for evict in (False, True):
        lean_cache, first = prefill_ours(model, ids, counts if evict else None, lcfg, n_new, impl,
                                         _EventTimer(device))
        lean, _ = decode_ours(DecodeStep(model, lean_cache, first, T, impl), n_new, use_graph=False)
        cache = model.new_cache(1, impl=impl)
        w = min(lcfg.snap_window, T)
        probe = Probe(query_pos=torch.arange(T - w, T, device=device))
        logits = model(ids, cache=cache, probe=probe)
        if evict:
            for l in range(cfg.n_layer):
                one = Probe(query_pos=probe.query_pos)
                one.prefill_attn = {l: probe.prefill_attn[l]}
                cache.evict(l, lukv.snapkv_scores(one, lcfg), torch.as_tensor(counts[l][None]), lcfg.sink,
                            lcfg.window)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        rest = model.generate(nxt, n_new - 1, cache=cache)  # 1 list of n_new - 1 ids
        ref = torch.cat([nxt, torch.tensor(rest, device=device)], dim=1)
        if not torch.equal(lean.cpu(), ref.cpu()):
            failures.append(f"{'evicted' if evict else 'full'} cache: lean {lean.tolist()} vs model.generate "
                            f"{ref.tolist()}")
        if evict and lean_cache.length[:, 0].cpu().tolist() != (torch.as_tensor(counts) + n_new).tolist():
            failures.append("lean cache lengths are not counts + the appended tokens")
    return failures


# -----------------------------------------------------------------------------
# report


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def table_lines(rows):
    head = (f"{'model':13s} {'T':>7s} {'B':>2s} {'impl':15s} {'status':7s} {'prefill s':>9s} {'score+ev ms':>11s} "
            f"{'decode ms':>9s} {'tok/s':>8s} {'KV GiB':>7s} {'KV/full':>7s} {'peak GiB':>8s} {'GB/step':>7s} "
            f"{'roof ms':>7s} {'share':>5s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append(
            f"{r['model']:13s} {r['context']:7d} {r['batch']:2d} {r['impl']:15s} {r['status']:7s} "
            + (f"{r['prefill_ms'] / 1e3:9.2f} " if ok else f"{'-':>9s} ")
            + (f"{r['score_evict_ms']:11.1f} " if ok and r.get("score_evict_ms") is not None else f"{'-':>11s} ")
            + (f"{r['decode_ms_median']:9.3f} {r['batch'] * 1e3 / r['decode_ms_median']:8.0f} " if ok
               else f"{'-':>9s} {'-':>8s} ")
            + (f"{_fmt_bytes(r['kv_bytes']):>7s} {r['kv_bytes'] / r['kv_bytes_full']:7.3f} " if ok
               else f"{'-':>7s} {'-':>7s} ")
            + f"{_fmt_bytes(r.get('peak_bytes')):>8s} "
            + (f"{r['bytes_per_step'] / 1e9:7.2f} {r['roof_ms']:7.2f} {r['roof_share']:5.0%}" if ok
               else f"{'-':>7s} {'-':>7s} {'-':>5s}")
            + (f"  {r.get('why', '')}" if not ok else "" if "compile_s" not in r else
               f"  compiled in {r['compile_s']:.0f} s ({r['backend']}, fullgraph={r['fullgraph']}; in the timed "
               f"steps {r['compiles_in_timed_steps']} compiles, {r['cudagraph_skips']} cudagraph skips)"))
    return lines


def environment(device):
    from importlib.metadata import version

    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, host=platform.node())
    for package in ("triton", "transformers", "kvpress"):
        try:
            env[package] = version(package)
        except Exception:
            env[package] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, card_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
    else:
        env["card"] = "cpu"
    return env


def warm_up(model, hf, contexts, impls, args, device):
    """Every compile before the first timed row: ours' whole path on a short prompt (prefill, evict, the decode
    kernels and graph), the evict kernels at each context's own shapes, Hugging Face's eager path."""
    warm_T, lcfg = min(min(contexts), 2048), lukv.LUKVConfig()
    warm_counts = lukv.lukv_counts(args.ratio, warm_T, lcfg, skewed_table(model.cfg.n_layer, model.cfg.n_kv_head))
    warm_ids = torch.zeros(1, warm_T, dtype=torch.long, device=device)
    run_ours(model, warm_ids, warm_counts, lcfg, 4, args.impl, args.graph)
    for T in contexts if "ours-lukv" in impls else []:
        warm_evict(model, T, case_inputs(model.cfg, 1, T, args, device)[1], lcfg, args.new, args.impl)
    if hf is not None:
        run_hf(hf, warm_ids, 4)


def check_compile_free(model, name, rows, args, device):
    """(printed line, record or None): the first ours-lukv row's score + evict against the same case run twice more
    now, after the rows that followed it, and the compiles inside hf-compiled's timed steps (none expected)."""
    first = next((r for r in rows if r["model"] == name and r["impl"] == "ours-lukv" and r["status"] == "ok"), None)
    if first is None:
        return "compile-free: n/a (no ours-lukv row ran)", None
    ids, counts, lcfg, _ = case_inputs(model.cfg, first["batch"], first["context"], args, device)
    later = []
    for _ in range(2):
        timer = _EventTimer(device)
        prefill_ours(model, ids, counts, lcfg, args.new, args.impl, timer)
        later.append(timer.total_ms())
    hf_compiles = [r["compiles_in_timed_steps"] for r in rows if r["model"] == name and "compile_s" in r]
    ok = compile_free(first["score_evict_ms"], later) and not any(hf_compiles)
    line = (f"compile-free: {'yes' if ok else 'no'} (score + evict at T={first['context']}, B={first['batch']}: "
            f"first row {first['score_evict_ms']:.1f} ms, again {', '.join(f'{t:.1f}' for t in later)} ms"
            + (f"; compiles in hf-compiled's timed steps: {hf_compiles}" if hf_compiles else "") + ")")
    return line, dict(context=first["context"], batch=first["batch"], first_ms=first["score_evict_ms"],
                      later_ms=later, hf_compiled_compiles_in_timed_steps=hf_compiles, ok=ok)


def main(args):
    """The table of every (model, context, batch, implementation) that args name (parse's); returns its rows."""
    device = torch.device(args.device)
    args.impl = args.impl or ("v3" if device.type == "cuda" and kernels.HAVE_TRITON else "v1")
    args.graph = device.type == "cuda" and not args.no_graph
    impls = args.impls.split(",")
    kvpress_mod, kvpress_why = import_kvpress() if any(i.startswith("kvpress") for i in impls) else (None, "")
    env = environment(device)
    env["kvpress_import"] = "ok" if kvpress_mod is not None else kvpress_why
    args.roof_gbps, env["roof"] = copy_roof(device)
    env["roof_gbps"] = args.roof_gbps
    print(json.dumps(env), flush=True)
    rows = []

    def log(row):
        print(table_lines([row])[-1], flush=True)
        if args.out:
            save(args.out, env, args, rows)

    for name in args.models.split(","):
        spec = MODELS[name]
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else spec["contexts"]
        batches = [int(b) for b in args.batch.split(",")]
        t0 = time.time()
        block_size = max(contexts) + args.new + 64
        model = build_ours(spec, block_size, device, DTYPES[args.dtype], args.seed)
        try:
            hf = build_hf(spec, model) if any(i.startswith(("hf", "kvpress")) for i in impls) else None
        except ImportError as e:
            hf = None
            print(f"transformers unavailable: {e}")
        print(f"{name}: {model.num_params() / 1e6:.0f}M parameters, built in {time.time() - t0:.1f} s", flush=True)
        if not args.no_check:
            failures = check_lean_path(spec, device, DTYPES[args.dtype], impl=args.impl, seed=args.seed)
            print(f"lean path vs model.generate: {'agree' if not failures else 'DIFFER: ' + '; '.join(failures)}",
                  flush=True)
            env.setdefault("lean_check", {})[name] = failures or "agree"
        warm_up(model, hf, contexts, impls, args, device)
        if args.profile_step:  # at the first context and batch, each ours row named
            ids, counts, lcfg, _ = case_inputs(model.cfg, batches[0], contexts[0], args, device)
            for impl in [i for i in ("ours-full", "ours-lukv") if i in impls]:
                p = env.setdefault("profile", {}).setdefault(name, {})[impl] = dict(
                    context=contexts[0], batch=batches[0],
                    **profile_step(model, ids, counts if impl == "ours-lukv" else None, lcfg, args.impl, args.graph))
                print("\n".join(profile_lines(f"one decode step of {impl}, T={contexts[0]}, B={batches[0]}", p)))
        print(table_lines([])[0], flush=True)
        checked = None
        for T in contexts:
            for B in batches:
                rows += run_case(name, model, hf, kvpress_mod, kvpress_why, impls, B, T, args, device, log)
                if checked is None:  # right after the first evicting case: a run cut short still has it
                    line, checked = check_compile_free(model, name, rows, args, device)
                    if checked is not None:
                        env.setdefault("compile_free", {})[name] = dict(checked, line=line)
                        print(line, flush=True)
        if checked is None:
            print(line, flush=True)
        del model, hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ncopy roof {args.roof_gbps:,.0f} GB/s: {env['roof']}")
    print("\n".join(table_lines(rows) + [c["line"] for c in env.get("compile_free", {}).values()]))
    if args.out:
        save(args.out, env, args, rows)
        print(f"wrote {args.out}")
    return rows


def save(path, env, args, rows):
    record = dict(env=env, args=vars(args), command=args.command, rows=rows)
    solver.write_atomic(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def _int_list(parser, flag, text, low):
    """The comma list of integers a flag gives, each at least `low`, else refused in one line."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected a comma list of integers, got {text!r}")
    for v in values:
        tasks.check_range(parser, flag, v, low)
    return values


def parse(argv=None):
    """(parser, args), every argument checked before any work (--quick fills in the flags not given)."""
    parser = tasks.ArgumentParser(description=__doc__)
    # ---- what to run
    parser.add_argument("--models", help=f"comma list of {list(MODELS)} (default smollm2-135m,llama3.1-8b)")
    parser.add_argument("--contexts", help="comma list of context lengths (default: each model's)")
    parser.add_argument("--batch", help="comma list of batch sizes (default 1,8)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: the tiny config, T=256, B=1,2, 8 tokens")
    parser.add_argument("--profile-step", action="store_true",
                        help="first: torch.profiler over 20 eager decode steps of each ours row (first T, B)")
    # ---- method and measurement
    parser.add_argument("--ratio", type=float, default=0.8, help="compression ratio of the evicting rows, in (0, 1)")
    parser.add_argument("--new", type=int, help="generated tokens per row, each one timed (default 128)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--impl", choices=["v1", "v2", "v3"], help="kernels.py version (default v3 on CUDA, v1 on CPU)")
    parser.add_argument("--no-graph", action="store_true", help="ours: eager decode steps instead of a CUDA graph")
    parser.add_argument("--no-check", action="store_true", help="skip the lean path vs model.generate check")
    parser.add_argument("--no-predict-oom", action="store_true",
                        help="run rows even when weights + KV already exceed the card (they then OOM for real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="write every row here (a .json file, rewritten after each row)")
    args = parser.parse_args(argv)
    args.command = "python -m bench.decode " + " ".join(sys.argv[1:] if argv is None else argv)  # as given
    defaults = dict(models="tiny", batch="1,2", new=8) if args.quick else \
        dict(models="smollm2-135m,llama3.1-8b", batch="1,8", new=128)
    for flag, value in defaults.items():
        setattr(args, flag, value if getattr(args, flag) is None else getattr(args, flag))
    tasks.check_names(parser, "--models", args.models.split(","), list(MODELS))
    tasks.check_names(parser, "--impls", args.impls.split(","), IMPLS)
    contexts = _int_list(parser, "--contexts", args.contexts, 1) if args.contexts is not None else None
    _int_list(parser, "--batch", args.batch, 1)
    tasks.check_range(parser, "--new", args.new, 1)
    if not 0 < args.ratio < 1:
        parser.error(f"--ratio must be between 0 and 1 (both excluded), got {args.ratio}")
    for name in args.models.split(","):  # every case makes LU-KV counts: each head keeps at least lukv's floor
        heads, floor = MODELS[name]["num_hidden_layers"] * MODELS[name]["num_key_value_heads"], lukv.LUKVConfig().floor
        cases = contexts or MODELS[name]["contexts"]
        for T in sorted({*cases, min(min(cases), 2048)}):  # the cases and the warm-up (check_lean_path: 0.8 at 200)
            if solver.keep_count(heads * T, args.ratio) < heads * floor(T):
                parser.error(f"--ratio {args.ratio} at T={T} leaves a head fewer tokens than the {floor(T)} it keeps "
                             f"at least (sink + window + 1%); lower --ratio (the cases run at --contexts, the warm-up at the "
                             f"shortest of them up to 2048)")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or (args.device != "cpu" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: expected cpu, or cuda / cuda:N on a machine with CUDA")
    if args.impl == "v3" and args.device == "cpu" and not kernels.INTERPRET:
        parser.error("--impl v3 runs on CUDA (or on the CPU under TRITON_INTERPRET=1); use --impl v1 on the CPU")
    if args.threads is not None:
        tasks.check_range(parser, "--threads", args.threads, 1)
    if args.out:
        tasks.check_output(parser, args.out, ".json")
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args)
