"""
The experiments around LU-KV, for the shipped tiny model and for real ones (SmolLM2-135M-Instruct
from its GGUF file, any GGUF file or Hugging Face folder): profile a model, evaluate every family x
ratio x scorer x allocator with 95% intervals, the in-task diagnostic, the knockout of one head at a
time, and (ours, beyond the paper) the task-loss utility. lukv.py is the method; this file measures it.

    python -m experiments.evaluate --eval --n 25                                  # the tiny model's table
    python -m experiments.evaluate --demo --model smollm2                         # SmolLM2: heatmap + a small table
    python -m experiments.evaluate --profile --model smollm2 --scorers keydiff --out runs/smollm2_keydiff.npy
    python -m experiments.evaluate --eval --model smollm2 --scorers keydiff --table runs/smollm2_keydiff.npy
    python -m experiments.evaluate --full-cache --model smollm2 --length 4096      # the quality bar per family
    python -m experiments.evaluate --intask --model smollm2 --families niah_single # in-task profiles
    python -m experiments.evaluate --knockout --n 4                               # one head at a time cut
    python -m experiments.evaluate --from results/eval_tiny_n25.json --plot p.png # a saved result again

Speed: one prefill (and one oracle run) per example serves every method; the methods of a scorer are
the rows of one batched cache, decoded together (lukv.run_example). Long runs print an ETA and
append every finished example to a .partial.jsonl beside --json: the same command resumes from it,
and a record is reused only when everything that made it (model, weights' dtype and device, the
tables' contents, settings) is the same.

Shapes: B rows of a batched cache, L layers, H KV heads, T context tokens.
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch

import lukv
import solver
import tasks
from experiments import calibration, hf, peers, ruler
from lukv import LUKVConfig, Method

CHECKPOINTS = os.path.join(tasks.ROOT, "checkpoints")
INTASK_SEED = 7  # in-task profiles: neither a development (0, 1), an evaluation (2, 3) nor a calibration seed

# -----------------------------------------------------------------------------
# models, their suites and their tables


def load(name, dtype="float32", device="cpu", fmt=None):
    """(model, tokenizer, model id, suite) of "tiny" or a .pt checkpoint of this project (tasks.py's suite), or
    of a real model hf.py reads ("smollm2", a .gguf file, a Hugging Face folder; ruler.py's suite in fmt,
    by default the chat template where the tokenizer has one). dtype "int8": float32 weights whose linear
    layers torch's dynamic quantization turns into int8, one scale per output row (a CPU option: a quarter
    of the bytes per step, and other answers)."""
    weights = torch.float32 if dtype == "int8" else getattr(torch, dtype)
    if name == "tiny" or name.endswith(".pt"):
        path = lukv.DEFAULT_CHECKPOINT if name == "tiny" else name
        model, enc, _ = lukv.load_tiny(path)
        model, model_id, suite = model.to(device, weights), tasks.file_id(path), tasks.TinySuite(enc)
    else:
        model, enc, model_id = hf.load_model(name, dtype=weights)
        model, suite = model.to(device), ruler.RulerSuite(enc, fmt or ("chat" if getattr(enc, "chat_template", None)
                                                                         else "plain"))
    if dtype == "int8":
        with warnings.catch_warnings():  # torch marks its eager quantization as moving to torchao
            warnings.simplefilter("ignore")
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # a scale per output row: per-tensor
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    return model, enc, model_id, suite


def model_stem(name):
    """The short name tables of a model are saved under: tiny, smollm2, or the file or folder's name."""
    return os.path.basename(os.path.normpath(name)).removesuffix(".gguf").removesuffix(".pt")


def table_path(name, scorer, kind=""):
    """Where the shipped table of a model and scorer lives: checkpoints/<model>_<scorer>.npy; in-task and
    task-loss tables under a kind (checkpoints/intask/<model>_<family>_<scorer>.npy, <model>_taskloss_...)."""
    folder = os.path.dirname(os.path.abspath(name)) if name.endswith(".pt") else CHECKPOINTS  # beside a checkpoint
    if kind.startswith("intask_"):
        return os.path.join(folder, "intask", f"{model_stem(name)}_{kind[len('intask_'):]}_{scorer}.npy")
    return os.path.join(folder, f"{model_stem(name)}_{kind + '_' if kind else ''}{scorer}.npy")


def table_key(scorer, allocator, family):
    """The table an allocator reads: LU-KV's and the shuffled control's, the task-loss one (ours), or the
    in-task one (made on the evaluated family itself from another seed: a diagnostic)."""
    if allocator == "intask":
        return f"intask_{family}|{scorer}"
    return f"taskloss|{scorer}" if allocator == "taskloss" else f"|{scorer}"


def load_tables(paths, model_id, shape, cfg):
    """{table key: [(name, table, cfg)]} of .npy tables through lukv.load_profile; each sidecar names its scorer
    and kind. A table profiled with another protected window than the run's is kept with its own (cfg): it
    is evaluated as it was made; everything else (model, sink, the scorer's settings) must be the run's."""
    out = {}
    for path in paths:
        meta = solver.read_sidecar(path)
        own = dataclasses.replace(cfg, window=meta.get("window", cfg.window))
        table = lukv.load_profile(path, meta["scorer"], model_id, shape, own)[0]
        name = os.path.basename(path)[: -len(".npy")]
        out.setdefault(f"{meta.get('kind', '')}|{meta['scorer']}", []).append((name, table, own))
    return out


TABLE_ALLOCATORS = {"lukv": "", "shuffled": "", "taskloss": "taskloss", "intask": "intask"}  # -> table kind


def methods_for(pairs, ratios, tables, family):
    """The Method rows of one family: every (scorer, allocator) at every ratio, with the table it reads.
    The task-loss and in-task rows are LU-KV's online step fed another table; several LU-KV tables of one
    scorer (--table A.npy,B.npy) are one row each, labelled lukv:A, lukv:B (the shuffled control reads A)."""
    rows = []
    for s, a in pairs:
        entries = tables.get(table_key(s, a, family), []) if a in TABLE_ALLOCATORS else [(None, None, None)]
        for name, table, own in entries[:1] if a == "shuffled" else entries:
            label = f"{a}:{name}" if len(entries) > 1 and a != "shuffled" else a
            rows += [Method(s, "lukv" if a in ("taskloss", "intask") else a, r, table, label, own) for r in ratios]
    return rows


# -----------------------------------------------------------------------------
# the grid, resumable: one record per (setting, family, example)


def sha(table):
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()[:16]


def run_key(model, suite, model_id, ratios, pairs, length, seed, cfg, tables):
    """What a record depends on besides its (setting, family, index), hashed: a partial file of another
    run is never mixed in. The tables enter by their contents, the weights by dtype and device. The
    families and n are left out, since example i of a family is the same in any run: a grid split over
    processes (one family each) merges by concatenating their partial files."""
    blob = json.dumps([type(suite).__name__, getattr(suite, "fmt", ""), model_id, model.weights_key(), ratios,
                       pairs, length, seed, asdict(cfg), {k: [(n, sha(t), asdict(c)) for n, t, c in v] for k, v in sorted(tables.items())}])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_partial(path, key):
    """Records already finished by an earlier run of the same command, or of any run (key None); a line cut by
    a kill is skipped."""
    done = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted write: recomputed
                    continue
                if isinstance(rec, dict) and "run" in rec and (key is None or rec["run"] == key):
                    done[(rec["setting"], rec["family"], rec["index"])] = rec
    return done


def append_record(path, record):
    """Append one JSON line; a torn last line left by a kill gets its newline first, so the two never glue."""
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


@torch.no_grad()
def evaluate(model, suite, tables, families, ratios, pairs, n, length, seed, cfg, settings=("agnostic",),
             partial=None, model_id="", log=tasks.progress):
    """Every record of the grid (pairs: (scorer, allocator)); finished ones are read back from `partial`
    (a .jsonl path) and new ones appended to it as they finish."""
    key = run_key(model, suite, model_id, ratios, pairs, length, seed, cfg, tables)
    done = read_partial(partial, key)
    total, records, t0, fresh = len(settings) * len(families) * n, [], time.time(), 0
    for setting in settings:
        for family in families:
            methods = methods_for(pairs, ratios, tables, family)
            for item in suite.items(family, n, length, seed):
                rec = done.get((setting, family, item.index))
                if rec is None:
                    rec = lukv.run_example(model, suite, item, methods, cfg, setting)
                    rec.update(run=key, length=length, seed=seed)
                    fresh += 1
                    if partial:
                        append_record(partial, rec)
                records.append(rec)
                eta = (time.time() - t0) / max(fresh, 1) * (total - len(records))
                log(len(records), total, f"eval {setting} {family:16s} {len(records)}/{total} examples "
                    f"({time.time() - t0:.0f} s, ETA {eta:.0f} s)")
    rows = methods_for(pairs, [0.0], tables, families[0]) if families else []
    return {"records": records, "families": families, "ratios": ratios,
            "methods": [list(m) for m in dict.fromkeys((m.scorer, m.label) for m in rows)], "settings": list(settings),
            "n": n, "length": length, "seed": seed, "config": asdict(cfg),
            "tables": {k: [(name, sha(t)) for name, t, _ in v] for k, v in tables.items()}}


# -----------------------------------------------------------------------------
# reading a result: averages with 95% intervals, paired differences


def paired_difference(a, b):
    """(mean, low, high) of a - b over the same examples: a normal 95% interval of the paired mean."""
    d = np.asarray(a, float) - np.asarray(b, float)
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def averaged_families(result, setting):
    """Families the model can do with the full cache (>= 50%): the only ones averaged."""
    recs = [r for r in result["records"] if r["setting"] == setting]
    return [f for f in result["families"] if np.mean([r["full"] for r in recs if r["family"] == f]) >= 0.5]


def method_scores(result, setting, families, method=None):
    """Per-example scores, in record order, of the full cache (method None) or of one method key."""
    recs = [r for r in result["records"] if r["setting"] == setting and r["family"] in families]
    return [r["full"] if method is None else r["methods"][method]["score"] for r in recs]


SHORT = {"niah_single": "single", "niah_multikey": "mkey", "niah_multivalue": "mval", "niah_multiquery": "mquery"}


def percent(ratio):
    return f"{100 * ratio:g}%"


def format_table(result, reference="lukv"):
    """One text table per setting and ratio: score per family, the average over the families the full
    cache gets >= 50% right with its 95% interval, % of full, KV kept, oracle loss, and the paired
    difference to the reference row of the same scorer (an allocator's label; {scorer} is filled in)."""
    lines = []
    for setting in result["settings"]:
        fams, keep = result["families"], averaged_families(result, setting)
        lines.append(f"== {setting}, {result['length']} tokens, n={result['n']} per family; avg over "
                     f"{', '.join(SHORT.get(f, f) for f in keep)} ({len(method_scores(result, setting, keep))} "
                     f"examples; [95% interval])")
        w = max([9] + [len(a) for _, a in result["methods"]])  # the allocator column fits its longest label
        lines.append(f"{'scorer':18s} {'allocator':{w}s} " + " ".join(f"{SHORT.get(f, f):>6s}" for f in fams) +
                     f" {'avg [95% interval]':>19s} {'%full':>6s} {'KV MB':>7s} {'oloss':>6s}  vs {reference} [95%]")
        recs = [r for r in result["records"] if r["setting"] == setting]
        full_avg, lo, hi = tasks.interval(method_scores(result, setting, keep))
        lines.append(f"{'full':18s} {'-':{w}s} " +
                     " ".join(f"{np.mean([r['full'] for r in recs if r['family'] == f]):6.2f}" for f in fams) +
                     f"  {full_avg:5.2f} [{lo:4.2f}, {hi:4.2f}] {100.0:6.1f} "
                     f"{np.mean([r['full_bytes'] for r in recs]) / 1e6:7.3f} {0.0:6.3f}")
        for ratio in result["ratios"]:
            lines.append(f"-- compression {percent(ratio)}")
            for scorer, allocator in result["methods"]:
                key = f"{scorer}|{allocator}|{ratio}"
                fam_means = [np.mean([r["methods"][key]["score"] for r in recs if r["family"] == f]) for f in fams]
                avg, lo, hi = tasks.interval(method_scores(result, setting, keep, key))
                mb = np.mean([r["methods"][key]["kv_bytes"] for r in recs]) / 1e6
                oloss = np.mean([r["methods"][key]["oracle_loss"] for r in recs])
                diff, ref = "", reference.format(scorer=scorer)
                if allocator != ref and [scorer, ref] in result["methods"] and keep:
                    d, dlo, dhi = paired_difference(method_scores(result, setting, keep, key),
                                                    method_scores(result, setting, keep, f"{scorer}|{ref}|{ratio}"))
                    diff = f"{d:+5.2f} [{dlo:+4.2f}, {dhi:+4.2f}]"
                pct = 100 * avg / full_avg if full_avg else float("nan")
                lines.append(f"{scorer:18s} {allocator:{w}s} " + " ".join(f"{m:6.2f}" for m in fam_means) +
                             f"  {avg:5.2f} [{lo:4.2f}, {hi:4.2f}] {pct:6.1f} {mb:7.3f} {oloss:6.3f}  {diff}")
        timed = [r["timing"] for r in recs if "timing" in r]
        if timed:
            total = lambda k: sum(t[k] for t in timed)  # noqa: E731
            lines.append(f"timed phases of its {len(timed)} examples (scoring, allocation and compression not "
                         f"included): prefill {total('prefill'):.0f} s, full-cache answer + oracle "
                         f"{total('full_decode'):.0f} s ({total('full_tokens')} tokens, "
                         f"{1e3 * total('full_decode') / max(total('full_tokens'), 1):.0f} ms each), compressed "
                         f"decode {total('compressed_decode'):.0f} s (batches of "
                         f"{total('compressed_rows') / len(timed):.0f} rows, about {total('compressed_tokens')} "
                         f"steps, {1e3 * total('compressed_decode') / max(total('compressed_tokens'), 1):.0f} ms each)")
    return "\n".join(lines)


def full_cache_table(result):
    """Full-cache score per family (and per kind, where items have one) with 95% intervals."""
    lines = []
    for setting in result["settings"]:
        recs = [r for r in result["records"] if r["setting"] == setting]
        lines.append(f"full cache, {setting}, {result['length']} tokens, n={result['n']} per family, "
                     f"seed {result['seed']}:")
        for f in result["families"]:
            m, lo, hi = tasks.interval([r["full"] for r in recs if r["family"] == f])
            lines.append(f"  {f:16s} {m:.2f} [{lo:.2f}, {hi:.2f}]")
            for kind in sorted({r["kind"] for r in recs if r["family"] == f and r["kind"]}):
                ks = [r["full"] for r in recs if r["family"] == f and r["kind"] == kind]
                lines.append(f"    {kind:14s} {int(sum(ks))}/{len(ks)}")
    return "\n".join(lines)


RESULT_KEYS = {"records", "families", "ratios", "methods", "settings", "n", "length", "seed"}


def read_results(paths, length=None, seed=None):
    """Saved --eval or --full-cache results (one per .json file), or one result assembled from .partial.jsonl
    files (a grid split over processes, one family each): every record of one run key, in file order,
    duplicates dropped. Records carry their length and seed (those of older runs: give --length and --seed).
    Refused by name when a file is not a result or the partial files hold several runs."""
    if all(p.endswith(".json") for p in paths):
        return [read_result(p) for p in paths]
    return [merge_partials(paths, length, seed)]


def read_result(path):
    """One saved --eval or --full-cache result, refused by name when the file is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable result ({type(e).__name__}); expected the --json of --eval or "
                         f"--full-cache, or its .partial.jsonl files") from None
    if not isinstance(result, dict) or not RESULT_KEYS <= set(result):
        raise ValueError(f"{path} is not a result of --eval or --full-cache (expected the keys {sorted(RESULT_KEYS)})")
    return result


def merge_partials(paths, length=None, seed=None):
    """The result of one run whose records lie in .partial.jsonl files (see read_results)."""
    records = {}
    for path in paths:
        if not path.endswith(".partial.jsonl"):
            raise ValueError(f"{path}: --from takes one result .json, or .partial.jsonl files")
        for key, rec in read_partial(path, None).items():
            records.setdefault(key, rec)
    runs = {r["run"] for r in records.values()}
    if len(runs) != 1:
        raise ValueError(f"the partial files hold {len(runs)} runs ({sorted(runs)}); give the files of one run")
    recs = list(records.values())
    length, seed = recs[0].get("length", length), recs[0].get("seed", seed)
    if length is None or seed is None:
        raise ValueError("these records do not say their length and seed: give the run's --length and --seed")
    keys = list(dict.fromkeys(k for r in recs for k in r["methods"]))
    counts = [sum(r["family"] == f for r in recs) for f in dict.fromkeys(r["family"] for r in recs)]
    return {"records": recs, "families": list(dict.fromkeys(r["family"] for r in recs)),
            "ratios": sorted({float(k.split("|")[2]) for k in keys}),
            "methods": [list(m) for m in dict.fromkeys(tuple(k.split("|")[:2]) for k in keys)],
            "settings": list(dict.fromkeys(r["setting"] for r in recs)), "length": length, "seed": seed,
            "n": counts[0] if len(set(counts)) == 1 else "/".join(map(str, counts))}


# -----------------------------------------------------------------------------
# calibration: protocols -> token ids, profiles on them, in-task profiles and correlations


def calibration_ids(enc, contexts, protocol):
    """[(context ids, [question ids])] of a calibration set's texts, as its protocol appends questions:
    raw text (a BOS first where the tokenizer wants one), each question after its answer cue."""
    bos = [enc.bos_token_id] if getattr(enc, "add_bos", False) else []
    return [(bos + enc.encode_ordinary(context), [enc.encode_ordinary(protocol.question_format.format(q=q))
                                                   for q in questions]) for context, questions in contexts]


def scorer_outputs(out, scorers):
    """{scorer: the path its table is written to}: out itself for one scorer, else out_<scorer>.npy beside it."""
    return {s: out if len(scorers) == 1 else out[: -len(".npy")] + f"_{s}.npy" for s in scorers}


def intask_output(out, family):
    """The --out of one family's in-task profile: out_intask_<family>.npy beside out (scorer_outputs splits it)."""
    return out[: -len(".npy")] + f"_intask_{family}.npy"


def profile_and_save(model, model_id, contexts, scorers, cfg, out, stop_ids, temperature=0.0, answer_only=False,
                     kind="", **extra):
    """Profile the contexts and write one table (+ sidecar, its kvpress line included) per scorer: {scorer: path}."""
    cache_dir = out[: -len(".npy")] + ".cache"
    print(f"profiling {len(contexts)} contexts; per-context results in {cache_dir}/ (the same command resumes)")
    tables, counts = lukv.profile(model, model_id, contexts, scorers, cfg, cache_dir, stop_ids, temperature,
                                  answer_only)
    paths = scorer_outputs(out, scorers)
    for s, table in tables.items():
        path = paths[s]
        meta = lukv.profile_meta(s, model_id, cfg, kind=kind, weights=model.weights_key(), temperature=temperature,
                                 answer_only=answer_only, **counts, **extra)
        solver.save_table(path, table, meta)
        meta["kvpress"] = peers.kvpress_usage(s, path, cfg)  # the line that hands this table to kvpress
        solver.save_table(path, table, meta)
        print(f"wrote {path} {table.shape} and {solver.sidecar(path)}")
    return paths


def budget_correlation(tables, ratio=0.8):
    """Pearson correlation of per-head keep shares at one ratio between every two profiles: {(a, b): r}."""
    names, row = list(tables), solver.row_of(ratio)
    keep = {n: (1 - tables[n][row]).ravel() for n in names}
    return {(a, b): float(np.corrcoef(keep[a], keep[b])[0, 1]) for i, a in enumerate(names) for b in names[i + 1:]}


def correlation_report(tables, scorer, ratio=0.8):
    """budget_correlation as the lines --intask prints (tables: {name: (99, L, H)})."""
    lines = [f"correlation of per-head keep shares at {percent(ratio)} ({scorer}):"]
    return "\n".join(lines + [f"  {a:16s} {b:16s} {r:+.2f}" for (a, b), r in budget_correlation(tables, ratio).items()])


# -----------------------------------------------------------------------------
# knockout: which heads matter


@torch.no_grad()
def knockout(model, suite, families, n, length, seed, cfg, log=tasks.progress):
    """Score (L, H, F) when one head at a time keeps only sink + window; the L * H variants of an example
    are the rows of one batched cache."""
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    acc, t0 = np.zeros((L * H, len(families))), time.time()
    for fi, family in enumerate(families):
        for item in suite.items(family, n, length, seed):
            cache, _ = lukv.prefill(model, item.context, cfg)
            T = len(item.context)
            counts = np.full((L * H, L, H), T)
            for hd in range(L * H):
                counts[hd].flat[hd] = min(T, cfg.sink + cfg.window)  # head hd = (l, h) cut, the rest full
            batch = cache.repeat(L * H)
            lukv.compress(batch, lukv.protect(lukv.streaming_scores(L, H, T), cfg), counts)
            answers = model.generate(torch.tensor([item.question] * (L * H), device=batch.device), item.max_new,
                                     cache=batch, stop_ids=suite.stop_ids, done=suite.done(item))
            acc[:, fi] += [suite.score(item, suite.answer(a)) / n for a in answers]
        log(fi + 1, len(families), f"knockout: {fi + 1}/{len(families)} families ({time.time() - t0:.0f} s)")
    return acc.reshape(L, H, len(families))


def format_knockout(acc, families, full):
    lines = ["score with one KV head cut to sink + window (rows: layer, head); full cache first"]
    lines.append(f"{'head':8s} " + " ".join(f"{SHORT.get(f, f):>6s}" for f in families))
    lines.append(f"{'full':8s} " + " ".join(f"{full[f]:6.2f}" for f in families))
    for l in range(acc.shape[0]):
        for h in range(acc.shape[1]):
            lines.append(f"L{l}H{h:<5d} " + " ".join(f"{x:6.2f}" for x in acc[l, h]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# beyond the paper (ours): a task-loss utility, solved with the same hull and greedy
#
# Instead of the oracle's attention-times-value proxy, measure what the task loses: the calibration
# answer's loss when only head h is cut to budget b (all other heads full), on a grid of budgets,
# linearly interpolated to every eviction count. The averaged curves go through the same convex hull
# and greedy sweep as the paper's.

TASKLOSS_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)  # fractions of a head's evictable tokens cut


@torch.no_grad()
def answer_nll(model, cache, follow_ids, answer_ids):
    """Mean negative log-likelihood (per row of the cache) of answer_ids after follow_ids: (B,)."""
    ids = torch.tensor([follow_ids + answer_ids[:-1]] * cache.B, device=cache.device)
    logits = model(ids, cache=cache)[:, len(follow_ids) - 1:]  # (B, A, V)
    target = torch.tensor(answer_ids, device=cache.device).expand(cache.B, -1)
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").mean(1).cpu()


@torch.no_grad()
def build_taskloss_profile(model, contexts, scorer, cfg, stop_ids, log=tasks.progress):
    """(99, L, H) prune ratios from task-loss curves averaged over calibration (context, question) pairs."""
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    sums, t0, pairs = None, time.time(), 0
    for i, (ctx, questions) in enumerate(contexts):
        T = len(ctx)
        n_evictable = max(cfg.sink, T - cfg.window) - cfg.sink
        if sums is None:
            sums, T0 = np.zeros((L * H, n_evictable + 1)), T
        cache, probe = lukv.prefill(model, ctx, cfg)
        for q_ids in questions:
            answer, imp = lukv.oracle_importance(model, cache, probe, q_ids, cfg.horizon, stop_ids)
            if not answer:
                continue  # an empty answer has no loss to measure
            scores = lukv.scores_for(scorer, model, cache, probe, imp, cfg)
            base = float(answer_nll(model, cache.clone(), q_ids, answer)[0])
            counts = np.full((L * H, len(TASKLOSS_GRID), L, H), T)  # every (head, grid point): that head cut
            for hd in range(L * H):
                for g, frac in enumerate(TASKLOSS_GRID):
                    counts[hd, g].flat[hd] = T - round(frac * n_evictable)
            batch = cache.repeat(L * H * len(TASKLOSS_GRID))
            lukv.compress(batch, scores, counts.reshape(-1, L, H))
            points = (answer_nll(model, batch, q_ids, answer) - base).reshape(L * H, -1).numpy()
            x = np.array(TASKLOSS_GRID) * (sums.shape[1] - 1)  # every context on the first one's eviction axis
            for hd in range(L * H):
                sums[hd] += np.interp(np.arange(sums.shape[1]), x, points[hd])
            pairs += 1
        log(i + 1, len(contexts), f"task-loss profile {scorer}: context {i + 1}/{len(contexts)} ({pairs} pairs, "
            f"{time.time() - t0:.0f} s)")
    # measured losses are noisy: clip at zero and make them non-decreasing before the hull
    curves = [np.maximum.accumulate(np.maximum(c / max(pairs, 1), 0.0)) for c in sums]
    n_protected = T0 - (sums.shape[1] - 1)
    floor = max(0, cfg.floor(T0) - n_protected)
    evicted = solver.greedy_budget_table(curves, np.full(L * H, floor), len(solver.RATIOS),
                                         n_protected_total=L * H * n_protected)
    return evicted.reshape(len(solver.RATIOS), L, H) / T0


# -----------------------------------------------------------------------------
# the picture


def plot(results, path, table=None, title="", reference="lukv"):
    """Accuracy against compression for every allocator of every scorer of every result (one panel each, 95%
    intervals; of several LU-KV tables, the reference's row), after a heatmap of a table's per-head budgets at
    80% when one is given (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(r, s) for r in results for s in dict.fromkeys(m[0] for m in r["methods"])]
    n = len(panels) + (table is not None)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.2 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    axes = list(axes.flat)
    if table is not None:
        ax = axes.pop(0)
        im = ax.imshow(100 * (1 - table[solver.row_of(0.8)]), cmap="viridis", aspect="auto")
        ax.set(xlabel="KV head", ylabel="layer", xticks=range(table.shape[2]), title=title or "budgets at 80%: % kept")
        fig.colorbar(im, ax=ax)
    for ax, (result, scorer) in zip(axes, panels):
        setting = result["settings"][0]
        keep = averaged_families(result, setting)
        for s, allocator in result["methods"]:
            if s == scorer and (not allocator.startswith("lukv:") or allocator == reference.format(scorer=s)):
                stats = [tasks.interval(method_scores(result, setting, keep, f"{s}|{allocator}|{r}"))
                         for r in result["ratios"]]
                mean = np.array([m for m, _, _ in stats])
                err = np.array([[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]])
                ax.errorbar([100 * r for r in result["ratios"]], mean, yerr=err, marker="o", capsize=3, label=allocator)
        ax.axhline(np.mean(method_scores(result, setting, keep)), color="k", ls="--", label="full cache")
        ax.set(xlabel="KV cache compression (%)", ylabel=f"score, avg of {len(method_scores(result, setting, keep))} "
               f"examples", title=f"{scorer}, {setting}, {result['length']} tokens")
        ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# the command line: every argument checked before any work


SETTINGS = ["agnostic", "aware"]
ALLOCATORS = list(lukv.ALLOCATORS) + ["taskloss", "intask"]
SCORERS = [s for s in lukv.SCORERS if s != "streaming"]


def make_parser():
    parser = tasks.ArgumentParser(description=__doc__)
    # ---- what to do
    for flag, text in [("--eval", "the evaluation table"), ("--full-cache", "only the full-cache score per family"),
                       ("--demo", "the budget heatmap and a small 80%% table"),
                       ("--profile", "calibrate: write the budget table of each scorer (--out)"),
                       ("--intask", "diagnostic: one profile per evaluated family (seed %d) and the budget "
                                    "correlations" % INTASK_SEED),
                       ("--knockout", "score with one head at a time cut to sink + window"),
                       ("--taskloss", "(ours) the task-loss profile of each scorer")]:
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--from", dest="from_json", default=None, metavar="RESULT.json|A.partial.jsonl,...",
                        help="print the table of a saved --eval / --full-cache result (with --plot: draw it)")
    # ---- model and method
    parser.add_argument("--model", default="tiny", metavar="NAME|PATH",
                        help="tiny (the shipped checkpoint), smollm2, a .gguf file or a Hugging Face folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"], help="weights and KV "
                        "cache; int8: float32 with int8 linear layers (CPU only)")
    parser.add_argument("--format", default=None, choices=ruler.FORMATS, help="real models' prompt format (default: "
                        "the chat template with the answer primed where the tokenizer has one: chosen on dev seed 0)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scorers", default=None, help="comma list (default: tiny: " + ",".join(SCORERS) +
                        "; real models: expected_attention)")
    parser.add_argument("--allocators", default=",".join(lukv.ALLOCATORS), help="comma list of " + ",".join(ALLOCATORS))
    parser.add_argument("--sink", type=int, default=None, help="protected first tokens (default: the protocol's)")
    parser.add_argument("--window", type=int, default=None, help="protected last tokens (default: the protocol's)")
    parser.add_argument("--horizon", type=int, default=None, help="oracle: answer tokens (default: the protocol's)")
    parser.add_argument("--snap-window", type=int, default=None, help="SnapKV: the last context positions that observe "
                        "(default: the protocol's)")
    parser.add_argument("--table", default=None, metavar="TABLE.npy[,...]", help="tables for lukv / shuffled / "
                        "intask / taskloss (default: the shipped ones of the model, where they exist)")
    # ---- data
    parser.add_argument("--protocol", default="documents", choices=sorted(calibration.PROTOCOLS),
                        help="calibration protocol (experiments/calibration.py): its texts and future for --profile, "
                        "and the protected tokens and SnapKV settings of every command")
    parser.add_argument("--text", default=None, metavar="PATH", help="--profile: calibrate on the continuation of "
                        "this text file or folder instead of the protocol's texts")
    parser.add_argument("--calib-file", default=None, metavar="FILE.jsonl", help="--profile: contexts and questions "
                        "from this file (one {\"context\": ..., \"questions\": [...]} per line) instead of the protocol's")
    parser.add_argument("--calib-contexts", type=int, default=None, help="calibration contexts (default: the protocol's)")
    parser.add_argument("--calib-questions", type=int, default=None, help="questions per context (default: the "
                        "protocol's)")
    parser.add_argument("--calib-seed", type=int, default=0, help="calibration seed (calibration-N)")
    parser.add_argument("--length", type=int, default=None, help="prompt tokens (default 1024)")
    parser.add_argument("--families", default=None, help="comma list (default: every family of the model's suite)")
    parser.add_argument("--n", type=int, default=None, help="examples per family (default: 10 tiny, 25 real)")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--settings", default="agnostic", help="comma list of " + ",".join(SETTINGS))
    parser.add_argument("--seed", type=int, default=None, help="evaluation seed (default 2; 0, 1: development; 2, 3: "
                        "tables)")
    # ---- output
    parser.add_argument("--json", default=None, help="--eval, --full-cache, --knockout: the result (default "
                        "runs/eval.json); --from: the assembled result")
    parser.add_argument("--out", default=None, metavar="TABLE.npy", help="--profile, --intask, --taskloss: the "
                        "table to write (several scorers: TABLE_<scorer>.npy; default runs/<model>_<scorer>.npy)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="--eval or --from: accuracy vs compression")
    parser.add_argument("--reference", default="lukv", metavar="LABEL", help="the row the paired differences are "
                        "taken against ({scorer} is filled in: lukv:smollm2_documents_4096_{scorer})")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing files the repository ships")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def parse(argv=None):
    """The parsed arguments, every one checked before any work; a bad one exits with code 2 and one line."""
    parser = make_parser()
    args = parser.parse_args(argv)
    args.given = {k for k in ("json", "length", "seed", "families") if getattr(args, k) is not None}  # not defaults
    args.json = "runs/eval.json" if args.json is None else args.json
    args.length = 1024 if args.length is None else args.length
    args.seed = 2 if args.seed is None else args.seed
    actions = [a for a in ("eval", "full_cache", "demo", "profile", "intask", "knockout", "taskloss") if getattr(args, a)]
    if not actions and not args.from_json:
        parser.error("say what to do: --eval, --full-cache, --demo, --profile, --intask, --knockout, --taskloss "
                     "or --from RESULT.json")
    for name in ("n", "calib_contexts", "calib_questions", "horizon", "snap_window", "threads"):
        if getattr(args, name) is not None:
            tasks.check_range(parser, "--" + name.replace("_", "-"), getattr(args, name), 1)
    for name in ("sink", "window"):
        if getattr(args, name) is not None:
            tasks.check_range(parser, "--" + name, getattr(args, name), 0)
    tasks.check_range(parser, "--length", args.length, 64)
    if args.from_json:
        if actions:
            parser.error("--from prints saved results: give it alone (with --plot to draw them, --json to save "
                         "partial files as one result)")
        args.from_json = args.from_json.split(",")
        missing = [p for p in args.from_json if not os.path.isfile(p)]
        if missing:
            parser.error(f"--from {missing}: no such file")
    tiny = args.model == "tiny" or args.model.endswith(".pt")
    if args.model not in ("tiny", "smollm2") and not os.path.exists(args.model):
        parser.error(f"--model {args.model}: expected tiny, smollm2, a .pt checkpoint of this project, a .gguf file "
                     f"or a Hugging Face folder; there is no such file or folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; run on the CPU (--device cpu)")
    if args.device == "cuda" and args.dtype == "int8":
        parser.error("--dtype int8 quantizes linear layers for the CPU; on CUDA use float32 or bfloat16")
    args.scorers = tasks.check_names(parser, "--scorers", args.scorers.split(",") if args.scorers else
                                    (SCORERS if tiny else ["expected_attention"]), SCORERS)
    args.allocators = tasks.check_names(parser, "--allocators", args.allocators.split(","), ALLOCATORS)
    args.settings = tasks.check_names(parser, "--settings", args.settings.split(","), SETTINGS)
    known = tasks.TinySuite.families if tiny else ruler.FAMILIES
    args.families = tasks.check_names(parser, "--families", args.families.split(",") if args.families else known, known)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        ratios = []
    if not ratios or not all(0 < r < 1 for r in ratios):  # NaN fails the comparison too
        parser.error(f"--ratios: expected a comma list of numbers in (0, 1) such as 0.5,0.8, got {args.ratios!r}")
    args.ratios = ratios
    protocol = calibration.PROTOCOLS[args.protocol]
    protected = {protocol.protected.get(s, (4, 16)) for s in args.scorers}
    if (args.sink is None or args.window is None) and len(protected) > 1:
        parser.error(f"--protocol {args.protocol} protects (sink, window) {protocol.protected} per scorer: give the "
                     f"scorers of one setting per run, or --sink and --window")
    sink, window = protected.pop()
    args.sink = sink if args.sink is None else args.sink
    args.window = window if args.window is None else args.window
    args.horizon = args.horizon or protocol.horizon
    args.snap_window = args.snap_window or protocol.snap_window
    if args.protocol == "paper" and (args.calib_contexts or args.calib_questions) and (args.profile or args.taskloss) \
            and not (args.text or args.calib_file):
        parser.error("--protocol paper profiles one story and its questions: --calib-contexts and --calib-questions "
                     "do not apply")
    if args.text and args.calib_file:
        parser.error("--text and --calib-file are two sources of calibration text: give one")
    if args.calib_file:
        try:
            args.calib_file = calibration.read_calibration_file(args.calib_file)
        except (OSError, ValueError) as e:
            parser.error(f"--calib-file: {e}")
    args.n = args.n or (10 if tiny else 25)
    args.out = args.out or os.path.join("runs", f"{model_stem(args.model)}_" +
                                        (args.scorers[0] if len(args.scorers) == 1 else "profile") + ".npy")
    if args.profile and args.taskloss:
        parser.error("--profile and --taskloss both write --out: give one per run, each with its own --out")
    if (args.profile or args.intask or args.taskloss) and not args.out.endswith(".npy"):
        parser.error(f"--out {args.out}: expected a .npy file (several scorers: TABLE_<scorer>.npy beside it)")
    bases = ([args.out] if args.profile or args.taskloss else []) + \
        ([intask_output(args.out, f) for f in args.families] if args.intask else [])
    for path in (p for base in bases for p in scorer_outputs(base, args.scorers).values()):  # what the run writes
        tasks.check_output(parser, path, ".npy", args.overwrite)
    if args.eval or args.full_cache or args.knockout or (args.from_json and "json" in args.given):
        tasks.check_output(parser, args.json, ".json", args.overwrite)
    if args.plot:
        tasks.check_output(parser, args.plot, ".png", args.overwrite)
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot draws with matplotlib, which is not installed: pip install matplotlib")
    if args.text and not os.path.exists(args.text):
        parser.error(f"--text {args.text}: no such file or folder")
    for path in args.table.split(",") if args.table else []:
        if not path.endswith(".npy") or not os.path.isfile(path):
            parser.error(f"--table {path}: no such .npy table; make it with --profile --out {path}")
    return parser, args


def check_length(parser, suite, families, length, block_size):
    """Refuse a length the model's context cannot hold with the question and the answer, or too short for
    a family's template, by building one item of each family (cheap) before any work."""
    for family in families:
        try:
            item = suite.items(family, 1, length, 0)[0]
        except ValueError as e:
            parser.error(f"--length {length}: {e}")
        need = len(item.context) + len(item.question) + item.max_new
        if need > block_size:
            parser.error(f"--length {length}: a {family} prompt and its answer take {need} tokens, more than the "
                         f"model's context of {block_size}; give at most {block_size - (need - length)}")


def main(argv=None):
    parser, args = parse(argv)
    if args.from_json:
        try:
            given = {k: getattr(args, k) for k in ("length", "seed") if k in args.given}
            results = read_results(args.from_json, **given)
            table = solver.read_npy(args.table, "table", "give a .npy table") if args.table else None
        except ValueError as e:
            parser.error(str(e))
        for result in results:
            print(format_table(result, args.reference) if result["ratios"] else full_cache_table(result))
        if "json" in args.given and len(results) == 1:  # the assembled result, as one file
            solver.write_atomic(args.json, lambda f: f.write(json.dumps(results[0], indent=1).encode()))
            print(f"wrote {args.json}")
        if args.plot:
            plot(results, args.plot, table, f"LU-KV budgets at 80%, {os.path.basename(args.table or '')}",
                 args.reference)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = calibration.PROTOCOLS[args.protocol]
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, snap_window=args.snap_window,
                     snap_kernel=protocol.snap_kernel, snap_pool=protocol.snap_pool)
    t0 = time.time()
    try:
        model, enc, model_id, suite = load(args.model, args.dtype, args.device, args.format)
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # a damaged or unsupported file, named
        parser.error(f"--model {args.model}: {e}")
    m, shape = model.cfg, (model.cfg.n_layer, model.cfg.n_kv_head)
    print(f"model: {args.model} (id {model_id}, {model.num_params() / 1e6:.1f}M parameters, {m.n_layer} layers x "
          f"{m.n_kv_head} KV heads, {args.dtype} on {args.device}, context {m.block_size}; loaded in "
          f"{time.time() - t0:.0f} s)")
    if args.eval or args.full_cache or args.demo or args.knockout or args.intask:
        check_length(parser, suite, args.families, args.length, m.block_size)
    if (args.profile or args.taskloss) and args.length + args.horizon + 64 > m.block_size:
        parser.error(f"--length {args.length}: a calibration context, its question and a {args.horizon}-token answer "
                     f"need more than the model's context of {m.block_size}; give at most "
                     f"{m.block_size - args.horizon - 64}")

    def calibration_contexts():
        """(contexts as ids, a line saying what they are) of --text, --calib-file or the protocol's maker."""
        if args.text:
            n = args.calib_contexts or 8
            return calibration.text_contexts(enc, calibration.read_documents(args.text), n, args.length,
                                             cfg.horizon), f"text {args.text}: {n} contexts, future = its continuation"
        if args.calib_file:
            return calibration_ids(enc, args.calib_file.contexts, protocol), f"file {args.calib_file.name}"
        sizes = {k: v for k, v in [("n_contexts", args.calib_contexts), ("n_questions", args.calib_questions)] if v}
        made = protocol.maker(args.calib_seed, args.length, enc, **sizes)
        return calibration_ids(enc, made.contexts, protocol), \
            f"protocol {args.protocol}, seed {args.calib_seed}, {len(made.contexts)} contexts, " \
            f"{sum(len(q) for _, q in made.contexts)} questions"

    # every table the run reads, loaded and checked before any work
    tables = {}
    if args.eval or args.demo or args.intask:
        wanted = {TABLE_ALLOCATORS[a] for a in args.allocators if a in TABLE_ALLOCATORS} if args.eval else {""}
        paths = args.table.split(",") if args.table else [
            table_path(args.model, s, kind) for s in args.scorers for kind in wanted if kind != "intask"] + [
            table_path(args.model, s, f"intask_{f}") for s in args.scorers for f in args.families if "intask" in wanted]
        paths = [p for p in paths if args.table or os.path.exists(p)]
        try:
            for path in [] if args.table else paths:  # a default table is the --protocol's (a --table is the user's)
                made = solver.read_sidecar(path).get("protocol")  # (the tiny model's tables name none)
                if made not in (None, args.protocol):
                    parser.error(f"the table {path} was profiled with protocol {made!r}, not {args.protocol!r}: "
                                 f"pass --protocol {made}, or a table of this protocol with --table")
            tables = load_tables(paths, model_id, shape, cfg)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        foreign = [k for k in tables if k.split("|")[1] not in args.scorers]
        if foreign:
            parser.error(f"--table: {foreign} belong to scorers not in --scorers {args.scorers}")
    pairs = [(s, a) for s in args.scorers for a in args.allocators]
    missing = [(s, a, f) for s, a in pairs if a in TABLE_ALLOCATORS for f in args.families
               if table_key(s, a, f) not in tables] if args.eval else []
    if missing:
        parser.error(f"no table for {missing[:3]}{' ...' if len(missing) > 3 else ''}: make it with --profile "
                     f"(--intask for intask, --taskloss for taskloss) and pass it with --table")

    if args.profile:
        contexts, source = calibration_contexts()
        profile_and_save(model, model_id, contexts, args.scorers, cfg, args.out, suite.stop_ids, protocol.temperature,
                         protocol.answer_only and not args.text, protocol=args.protocol, calibration=source,
                         length=args.length)
    if args.taskloss:
        contexts, source = calibration_contexts()
        for s, path in scorer_outputs(args.out, args.scorers).items():
            table = build_taskloss_profile(model, contexts, s, cfg, suite.stop_ids)
            solver.save_table(path, table, lukv.profile_meta(s, model_id, cfg, kind="taskloss", calibration=source,
                              utility=f"task loss (ours): calibration answer NLL with one head cut, grid {TASKLOSS_GRID}"))
            print(f"wrote {path}")
    if args.intask:  # one profile per family, from INTASK_SEED
        report = {"calibration": tables[f"|{args.scorers[0]}"][0][1]} if f"|{args.scorers[0]}" in tables else {}
        for family in args.families:
            contexts = [(item.context, [item.question]) for item in suite.items(family, args.calib_contexts or 8,
                                                                              args.length, INTASK_SEED)]
            got = profile_and_save(model, model_id, contexts, args.scorers, cfg, intask_output(args.out, family),
                                   suite.stop_ids, kind=f"intask_{family}",
                                   calibration=f"in-task: {family}, seed {INTASK_SEED}, {len(contexts)} examples")
            report[family] = np.load(got[args.scorers[0]])
        print(correlation_report(report, args.scorers[0]))
    if args.knockout:
        acc = knockout(model, suite, args.families, args.n, args.length, args.seed, cfg)
        full_run = evaluate(model, suite, {}, args.families, [], [], args.n, args.length, args.seed, cfg)
        full = {f: float(np.mean([r["full"] for r in full_run["records"] if r["family"] == f])) for f in args.families}
        print(format_knockout(acc, args.families, full))
        solver.write_atomic(args.json, lambda f: f.write(json.dumps({"knockout": acc.tolist(), "families": args.families,
                                                                   "full": full, "n": args.n}).encode()))
    if args.eval or args.full_cache or args.demo:
        demo_families = args.families if "families" in args.given else \
            [f for f in args.families if f.startswith("niah")]  # the four SmolLM2 gets at least half right
        families, n = (demo_families, 2) if args.demo else (args.families, args.n)
        ratios, use = ([0.8], [(args.scorers[0], a) for a in ("uniform", "pyramid", "adakv", "lukv")]) if args.demo \
            else (args.ratios if args.eval else [], pairs if args.eval else [])
        if args.demo:
            print(tasks.heatmap(1 - tables[f"|{args.scorers[0]}"][0][1][solver.row_of(0.8)],
                               f"LU-KV budgets at 80% compression ({args.scorers[0]}): share of the context each head keeps"))
        result = evaluate(model, suite, tables, families, ratios, use, n, args.length, args.seed, cfg, args.settings,
                          None if args.demo else args.json + ".partial.jsonl", model_id)
        result["model"] = {"name": args.model, "id": model_id, "format": getattr(suite, "fmt", ""),
                           "dtype": args.dtype, "device": args.device}
        print(full_cache_table(result) if args.full_cache and not args.eval else format_table(result, args.reference))
        if not args.demo:
            solver.write_atomic(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
            print(f"wrote {args.json}")
            if args.plot:
                plot([result], args.plot, tables.get(f"|{args.scorers[0]}", [(0, None)])[0][1])
        print(f"took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
