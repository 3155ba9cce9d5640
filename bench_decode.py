"""
End-to-end decode benchmark: prefill + scoring + eviction, then per-token decode, ours against
Hugging Face transformers and kvpress, on models with random weights of real configs.

What one row measures, for one (model, context T, batch B, implementation):
  prefill    the prompt through the model, with scoring and eviction where the row evicts
  decode     per-token latency over --new generated tokens, greedy (median of per-step times)
  KV bytes   K and V the cache holds after the last token (allocated, spare rows included)

Implementations (--impls):
  ours-full        model.py's blocks, a packed cache holding every token; Triton decode + append
  ours-lukv        the same with LU-KV-style per-head budgets at --ratio (a skewed [99, L, H] table),
                   SnapKV scores (lukv.snapkv_scores), kernels.evict right after each layer's prefill
  hf-full          transformers LlamaForCausalLM, SDPA, DynamicCache (the same weights as ours)
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

    python bench_decode.py --quick                   # CPU smoke test at tiny sizes (seconds)
    python bench_decode.py                           # the whole table on a CUDA card (~9 minutes on an H200)
    python bench_decode.py --models llama3.1-8b --contexts 32768 --batch 1 --out runs/e2e.json

Shapes: B batch, L layers, H KV heads, G query heads per KV head, T tokens, D head dim, C width.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import types

import numpy as np
import torch

import kernels
import lukv
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
        rms_norm_eps=1e-5, tie_word_embeddings=True, contexts=[256]),
}
IMPLS = ["ours-full", "ours-lukv", "hf-full", "kvpress-adakv", "kvpress-lukv", "kvpress-snapkv"]


def gpt_config(spec, block_size):
    """Our GPTConfig of a MODELS entry (the fields hf.hf_config reads from a config.json)."""
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
    keep = np.clip((1 - lukv.RATIOS)[:, None, None] * share[None], 0.0, 1.0)  # (99, L, H)
    return (1 - keep).astype(np.float32)


def lukv_counts(table, ratio, T, cfg):
    """Per-head keep counts (L, H) at a ratio: the table's row rescaled to T tokens (lukv.lukv_counts)."""
    row = round(100 * ratio) - 1
    return lukv.counts_from_shares((1 - table[row]) * T, ratio, T, cfg)


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
                            k.contiguous(), v.contiguous(), self.position, impl=self.impl, check=False)
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
# one case: every implementation, OOM caught, memory needs stated


def kv_full_bytes(cfg, B, T, dtype):
    return 2 * cfg.n_layer * B * cfg.n_kv_head * T * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def predicted_need(impl, cfg, B, T, n_new, ratio, weights_bytes, dtype):
    """A lower bound on the bytes a row holds at its peak: the weights + the KV it keeps at once."""
    full = kv_full_bytes(cfg, B, T + n_new, dtype)
    if impl in ("ours-full", "hf-full", "kvpress-adakv", "kvpress-lukv"):  # every token stays in memory
        return weights_bytes + full
    one_layer = full // cfg.n_layer // (B if impl == "ours-lukv" else 1)  # ours prefills a row at a time
    return weights_bytes + int((1 - ratio) * full) + one_layer


def run_case(name, model, hf, kvpress_mod, kvpress_why, impls, B, T, args, device, log):
    cfg = model.cfg
    lcfg = lukv.LUKVConfig()
    table = skewed_table(cfg.n_layer, cfg.n_kv_head, seed=args.seed)
    counts = lukv_counts(table, args.ratio, T, lcfg)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    dtype = model.embed_tokens.weight.dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    rows, tokens = [], {}
    for impl in impls:
        row = dict(model=name, context=T, batch=B, impl=impl, ratio=0.0 if impl.endswith("full") else args.ratio,
                   dtype=str(dtype).removeprefix("torch."), kv_bytes_full=kv_full_bytes(cfg, B, T + args.new, dtype))
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
                if impl == "ours-full":
                    result, tok = run_ours(model, ids, None, lcfg, args.new, args.impl, args.graph)
                elif impl == "ours-lukv":
                    result, tok = run_ours(model, ids, counts, lcfg, args.new, args.impl, args.graph)
                elif impl == "hf-full":
                    result, tok = run_hf(hf, ids, args.new)
                else:
                    result, tok = run_hf(hf, ids, args.new, make_press(kvpress_mod, impl, args.ratio, table, lcfg))
                row.update(status="ok", **result)
                tokens[impl] = tok.cpu()
            except torch.OutOfMemoryError as e:
                row.update(status="OOM", why=f"caught: {str(e).splitlines()[0][:160]}")
            finally:
                for layer in (hf.model.layers if hf is not None else []):
                    layer.self_attn.masked_key_indices = None
                gc.collect()
            if device.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                torch.cuda.empty_cache()
        rows.append(row)
        log(row)
    # the same weights and prompt: the full-cache rows should decode the same tokens (bf16 rounding aside)
    if "ours-full" in tokens and "hf-full" in tokens:
        a, b = tokens["ours-full"], tokens["hf-full"]
        n = min(a.shape[1], b.shape[1])
        same = (a[:, :n] == b[:, :n]).float().mean().item()
        for row in rows:
            if row["impl"] in ("ours-full", "hf-full"):
                row["tokens_same_as_other_full"] = same
    return rows


# -----------------------------------------------------------------------------
# the self-check: the lean path decodes what model.py's own KVCache path decodes


@torch.no_grad()
def check_lean_path(model, T=200, n_new=6, ratio=0.8, impl="v1", seed=0):
    """Greedy tokens of the lean path == model.generate over a KVCache evicted with the same scores and counts.

    Both run B = 1 (the same matrix shapes, so the same rounding); the reference prefills with model.forward,
    scores with lukv.snapkv_scores on its probe and evicts with KVCache.evict. Returns a list of failures."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    lcfg = lukv.LUKVConfig()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)
    counts = lukv_counts(skewed_table(cfg.n_layer, cfg.n_kv_head, seed), ratio, T, lcfg)
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
        rest, _ = model.generate(nxt, n_new - 1, cache=cache)
        ref = torch.cat([nxt, rest], dim=1)
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
            f"{'decode ms':>9s} {'tok/s':>8s} {'KV GiB':>7s} {'KV/full':>7s} {'peak GiB':>8s}")
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
            + f"{_fmt_bytes(r.get('peak_bytes')):>8s}"
            + ("" if ok else f"  {r.get('why', '')}"))
    return lines


def environment(device):
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, host=platform.node())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        from importlib.metadata import version
        env["kvpress"] = version("kvpress")
    except Exception:
        env["kvpress"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, card_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
    else:
        env["card"] = "cpu"
    return env


def main(args):
    device = torch.device(args.device)
    if args.quick:
        args.models, args.contexts, args.batch, args.new = "tiny", None, "1,2", 8
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    if args.impl is None:
        args.impl = "v3" if device.type == "cuda" and kernels.HAVE_TRITON else "v1"
    args.graph = device.type == "cuda" and not args.no_graph
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; expected some of {IMPLS}")
    kvpress_mod, kvpress_why = import_kvpress() if any(i.startswith("kvpress") for i in impls) else (None, "")
    env = environment(device)
    env["kvpress_import"] = "ok" if kvpress_mod is not None else kvpress_why
    print(json.dumps(env), flush=True)
    rows = []

    def log(row):
        print(table_lines([row])[-1], flush=True)
        if args.out:
            save(args.out, env, args, rows)

    for name in args.models.split(","):
        spec = MODELS[name]
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else spec["contexts"]
        t0 = time.time()
        model = build_ours(spec, max(contexts) + args.new + 64, device, dtype, args.seed)
        try:
            hf = build_hf(spec, model) if any(i.startswith(("hf", "kvpress")) for i in impls) else None
        except ImportError as e:
            hf = None
            print(f"transformers unavailable: {e}")
        print(f"{name}: {model.num_params() / 1e6:.0f}M parameters, built in {time.time() - t0:.1f} s", flush=True)
        if not args.no_check:
            failures = check_lean_path(model, impl=args.impl)
            print(f"lean path vs model.generate: {'agree' if not failures else 'DIFFER: ' + '; '.join(failures)}",
                  flush=True)
            env.setdefault("lean_check", {})[name] = failures or "agree"
        # compile every kernel once before the timed rows: 2048 tokens, so the evict kernels see more than
        # one 1024-token slice (Triton specialises an integer argument equal to 1: a 1024-token warm-up
        # left a compile in the first timed row, results/E2E.md)
        warm_T, warm_cfg = min(min(contexts), 2048), lukv.LUKVConfig()
        warm_counts = lukv_counts(skewed_table(model.cfg.n_layer, model.cfg.n_kv_head), args.ratio, warm_T, warm_cfg)
        run_ours(model, torch.zeros(1, warm_T, dtype=torch.long, device=device), warm_counts, warm_cfg, 4, args.impl,
                 args.graph)
        if hf is not None:
            run_hf(hf, torch.zeros(1, warm_T, dtype=torch.long, device=device), 4)
        print(table_lines([])[0], flush=True)
        for T in contexts:
            for B in [int(b) for b in args.batch.split(",")]:
                rows += run_case(name, model, hf, kvpress_mod, kvpress_why, impls, B, T, args, device, log)
        del model, hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print("\n".join(table_lines(rows)))
    if args.out:
        save(args.out, env, args, rows)
        print(f"wrote {args.out}")
    return rows


def save(path, env, args, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(env=env, args=vars(args), command=" ".join(sys.argv), rows=rows), f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to run
    parser.add_argument("--models", default="smollm2-135m,llama3.1-8b", help=f"comma list of {list(MODELS)}")
    parser.add_argument("--contexts", default=None, help="comma list of context lengths (default: each model's)")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: the tiny config, T=256, B=1,2, 8 tokens")
    # ---- method and measurement
    parser.add_argument("--ratio", type=float, default=0.8, help="compression ratio of the evicting rows")
    parser.add_argument("--new", type=int, default=128, help="generated tokens per row (each one timed)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default=None, help="kernels.py version for ours (default v3 on CUDA, v1 on CPU)")
    parser.add_argument("--no-graph", action="store_true", help="ours: eager decode steps instead of a CUDA graph")
    parser.add_argument("--no-check", action="store_true", help="skip the lean path vs model.generate check")
    parser.add_argument("--no-predict-oom", action="store_true",
                        help="run rows even when weights + KV already exceed the card (they then OOM for real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write every row as JSON here (rewritten after each row)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args)
