"""
The experiments around LU-KV: every family x ratio x scorer x allocator, query-agnostic and
query-aware, with 95% intervals; the knockout of one head at a time; and (ours, beyond the
paper) the task-loss utility. lukv.py is the method; this file measures it.

    python evaluate.py --full-cache --n 50          # full-cache accuracy per family (the quality bar)
    python evaluate.py --eval --n 25                # the full table on the shipped tiny model
    python evaluate.py --eval --n 25 --plot p.png   # ... and accuracy vs compression as a picture
    python evaluate.py --knockout --n 4             # accuracy with one KV head cut to sink + window
    python evaluate.py --taskloss                   # (ours) the task-loss profile

Speed: one prefill (and one oracle run) per example is shared by every method; the methods of a
scorer are compressed into the rows of one batched cache and decoded together, so the Python
cost of a decode step is paid once for all of them. Long runs print an ETA and append every
finished example to a .partial.jsonl file beside --json: the same command resumes from it.

Shapes: B rows of a batched cache, L layers, H KV heads, T context tokens.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import lukv
import tasks
from lukv import LUKVConfig, allocate, compress, progress, run_full, scores_for

# -----------------------------------------------------------------------------
# a suite: examples as token ids, and how an answer is read and scored


@dataclass
class Item:
    family: str
    index: int
    context: list  # token ids compressed in the query-agnostic setting
    question: list  # token ids fed after it (the question, and any answer prefix)
    references: list  # the strings a right answer contains
    max_new: int  # answer tokens generated at most
    kind: str = ""  # a finer label (qa's question kind), for the full-cache breakdown


class TinySuite:
    """tasks.py's families for the shipped tiny model: answers end at the first newline, exact match."""

    families = tasks.EVAL_FAMILIES + ["qa"]

    def __init__(self, enc):
        self.enc = enc
        self.stop_ids = {enc.encode_ordinary("\n")[0]}

    def items(self, family, n, length, seed):
        out = []
        for i, ex in enumerate(tasks.example_set(family, n, length, seed)):
            q, a = ex.qa[0]
            out.append(Item(family, i, self.enc.encode_ordinary(ex.context), self.enc.encode_ordinary(q), [a],
                            len(self.enc.encode_ordinary(a)) + 2, tasks.question_kind(q) if family == "qa" else ""))
        return out

    def answer(self, ids):
        return self.enc.decode(ids).split("\n")[0]

    def done(self, item):
        return None  # the newline is a stop token

    def score(self, item, answer):
        return float(tasks.exact_match(item.family, answer, item.references[0]))


# -----------------------------------------------------------------------------
# one example: a shared prefill, every method in one batched decode


def cut_at_stop(ids, stop_ids):
    """ids up to (not including) the first stop token."""
    return ids[:next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))]


@torch.no_grad()
def decode_rows(model, cache, follow_ids, max_new, stop_ids, done=None):
    """Greedy answers of every row of a batched cache to the same follow_ids: B lists of token ids,
    each cut before its first stop token. done(ids) -> bool may end a row early (a newline rule)."""
    B, device = cache.B, cache.device
    logits = model(torch.tensor([follow_ids] * B, device=device), cache=cache, last_only=True)[:, -1]  # (B, V)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    rows, finished = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
    for step in range(max_new):
        nxt = logits.argmax(-1)  # (B,)
        for row, token in zip(rows, nxt.tolist()):
            row.append(token)
        finished |= torch.isin(nxt, stops).cpu()
        if done is not None:  # rows already finished need no second look
            finished |= torch.tensor([bool(f) or done(row) for f, row in zip(finished.tolist(), rows)])
        if bool(finished.all()) or step == max_new - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return [cut_at_stop(row, stop_ids) for row in rows]


def clock(model):
    """Seconds for timing a phase; on a GPU after its queued work is done, so a phase gets its own time."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def run_example(model, suite, item, setting, methods, ratios, profiles, cfg):
    """Score of the full cache and of every (scorer, allocator, ratio) on one item, with the bytes
    each keeps and the share of oracle importance it drops."""
    prefix, follow = (item.context, item.question) if setting == "agnostic" else \
        (item.context + item.question[:-1], item.question[-1:])
    if not methods:  # full cache alone: no oracle run, the answer stops by the suite's own rules
        cache, _ = lukv.prefill(model, prefix, cfg)
        full_ids = decode_rows(model, cache.clone(), follow, item.max_new, suite.stop_ids, suite.done(item))[0]
        return {"setting": setting, "family": item.family, "index": item.index, "kind": item.kind,
                "full": suite.score(item, suite.answer(full_ids)), "full_bytes": cache.nbytes(), "methods": {}}
    t0 = clock(model)
    cache, probe = lukv.prefill(model, prefix, cfg)
    t1 = clock(model)
    full_ids, imp = lukv.oracle_importance(model, cache, probe, follow, cfg, item.max_new, suite.stop_ids)
    timing = {"prefill": t1 - t0, "full_decode": clock(model) - t1, "full_tokens": len(full_ids),
              "compressed_decode": 0.0, "compressed_tokens": 0, "compressed_rows": 0}  # where the time went
    full_ids = cut_at_stop(full_ids, suite.stop_ids)
    record = {"setting": setting, "family": item.family, "index": item.index, "kind": item.kind,
              "full": suite.score(item, suite.answer(full_ids)), "full_bytes": cache.nbytes(), "methods": {},
              "timing": timing}
    for scorer in dict.fromkeys(s for s, _ in methods):
        scores = scores_for(scorer, cache, probe, imp, cfg)
        rows = [(a, r) for s, a in methods if s == scorer for r in ratios]
        # the task-loss (ours) and in-task allocators are LU-KV's online step fed another profile
        counts = np.stack([allocate("lukv" if a in ("taskloss", "intask") else a, r, scores, cfg,
                                    profiles.get(profile_key(scorer, a, item.family)), imp) for a, r in rows])
        batch = cache.repeat(len(rows))  # (B = len(rows)) copies of the prefilled cache
        keep = compress(batch, scores, counts)  # (B, L, H, T)
        kv_bytes = (batch.length.sum(dim=(0, 2)) * batch.nbytes() / batch.length.sum()).tolist()  # (B,) per row
        lost = ((imp * ~keep).flatten(1).sum(1) / imp.sum().clamp(min=1e-30)).tolist()  # (B,)
        t0 = clock(model)
        answers = decode_rows(model, batch, follow, item.max_new, suite.stop_ids, suite.done(item))
        timing["compressed_decode"] += clock(model) - t0
        timing["compressed_tokens"] += max(len(a) for a in answers)  # the batch ran at least this many steps
        timing["compressed_rows"] += len(rows)
        for b, (allocator, ratio) in enumerate(rows):
            record["methods"][f"{scorer}|{allocator}|{ratio}"] = {
                "score": suite.score(item, suite.answer(answers[b])), "kv_bytes": kv_bytes[b], "oracle_loss": lost[b]}
    return record


def profile_key(scorer, allocator, family=None):
    """The profile an allocator reads: LU-KV's (and the shuffled control's), the task-loss one (ours), or
    the in-task one (profiled on the evaluation family itself, other seeds: a diagnostic)."""
    if allocator == "intask":
        return f"intask_{family}_{scorer}"
    return ("taskloss_" if allocator == "taskloss" else "") + scorer


# -----------------------------------------------------------------------------
# the grid, resumable: one record per (setting, family, example)


def run_key(suite_name, model_id, ratios, methods, length, seed, cfg):
    """What a record depends on besides its (setting, family, index), hashed: a partial file of another
    run is never mixed in (suite_name carries the prompt format and the weights' dtype). The families
    and n are left out, since example i of a family is the same in any run: a run over one family (or
    fewer examples) resumes into a larger one, so a grid can be split over processes and its partial
    files concatenated."""
    blob = json.dumps([suite_name, model_id, ratios, methods, length, seed, asdict(cfg)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_partial(path, key):
    """Records already finished by an earlier run of the same command."""
    if not path or not os.path.exists(path):
        return {}
    done = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted write
                continue
            if rec.get("run") == key:
                done[(rec["setting"], rec["family"], rec["index"])] = rec
    return done


@torch.no_grad()
def evaluate(model, suite, profiles, families, ratios, methods, n, length, seed, cfg, settings=("agnostic",),
             partial=None, model_id="", log=progress):
    """Every record of the grid; finished ones are read back from `partial` (a .jsonl path) and new
    ones appended to it as they finish."""
    dtype = str(next(model.parameters()).dtype)  # the weights' dtype and the prompt format change the answers
    key = run_key(f"{type(suite).__name__}/{getattr(suite, 'fmt', '')}/{dtype}", model_id, ratios, methods, length,
                  seed, cfg)
    done = read_partial(partial, key)
    todo = [(s, f) for s in settings for f in families]
    total, records, t0, fresh = len(todo) * n, [], time.time(), 0
    for setting, family in todo:
        for item in suite.items(family, n, length, seed):
            rec = done.get((setting, family, item.index))
            if rec is None:
                rec = run_example(model, suite, item, setting, methods, ratios, profiles, cfg)
                rec["run"] = key
                fresh += 1
                if partial:
                    with open(partial, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            records.append(rec)
            left = total - len(records)
            eta = (time.time() - t0) / max(fresh, 1) * left
            log(len(records), total, f"eval {setting} {family:16s} {len(records)}/{total} examples "
                f"({time.time() - t0:.0f} s, ETA {eta:.0f} s)")
    return {"records": records, "families": families, "ratios": ratios, "methods": [list(m) for m in methods],
            "settings": list(settings), "n": n, "length": length, "seed": seed, "config": asdict(cfg)}


# -----------------------------------------------------------------------------
# reading a result: averages with 95% intervals, paired differences


def interval(scores):
    """(mean, low, high): a 95% interval of a mean of scores in [0, 1]; Wilson's for 0/1 scores."""
    x = np.asarray(scores, float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if np.isin(x, (0.0, 1.0)).all():  # Wilson: stays inside [0, 1] and is not zero-width at 0 or 1
        z = 1.96
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return m, max(0.0, centre - half), min(1.0, centre + half)  # at 0 or 1 rounding could print -0.00
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return m, max(0.0, m - half), min(1.0, m + half)  # normal, clipped to the scores' range


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


SHORT = {"niah_single": "single", "niah_multikey": "mkey", "niah_multivalue": "mval", "niah_multiquery": "mquery",
         "vt": "vt", "cwe": "cwe", "fwe": "fwe", "qa": "qa"}


def format_table(result, reference="lukv"):
    """One text table per setting and ratio: score per family, the average over the families the full
    cache gets >= 50% right with its 95% interval, % of full, KV kept, oracle loss, and the paired
    difference to the reference allocator of the same scorer."""
    lines = []
    for setting in result["settings"]:
        fams, keep = result["families"], averaged_families(result, setting)
        n_avg = len(method_scores(result, setting, keep))
        lines.append(f"== {setting}, {result['length']} tokens, n={result['n']} per family; avg over "
                     f"{', '.join(SHORT.get(f, f) for f in keep)} ({n_avg} examples; [95% interval])")
        lines.append(f"{'scorer':18s} {'allocator':9s} " + " ".join(f"{SHORT.get(f, f):>6s}" for f in fams) +
                     f" {'avg [95% interval]':>19s} {'%full':>6s} {'KV MB':>7s} {'oloss':>6s}  vs {reference} [95%]")
        recs = [r for r in result["records"] if r["setting"] == setting]
        full_avg, lo, hi = interval(method_scores(result, setting, keep))
        full_mb = np.mean([r["full_bytes"] for r in recs]) / 1e6
        lines.append(f"{'full':18s} {'-':9s} " +
                     " ".join(f"{np.mean([r['full'] for r in recs if r['family'] == f]):6.2f}" for f in fams) +
                     f"  {full_avg:5.2f} [{lo:4.2f}, {hi:4.2f}] {100.0:6.1f} {full_mb:7.3f} {0.0:6.3f}")
        for ratio in result["ratios"]:
            lines.append(f"-- compression {ratio:.0%}")
            for scorer, allocator in result["methods"]:
                key = f"{scorer}|{allocator}|{ratio}"
                fam_means = [np.mean([r["methods"][key]["score"] for r in recs if r["family"] == f]) for f in fams]
                avg, lo, hi = interval(method_scores(result, setting, keep, key))
                mb = np.mean([r["methods"][key]["kv_bytes"] for r in recs]) / 1e6
                oloss = np.mean([r["methods"][key]["oracle_loss"] for r in recs])
                ref = f"{scorer}|{reference}|{ratio}"
                diff = ""
                if allocator != reference and [scorer, reference] in result["methods"] and keep:
                    d, dlo, dhi = paired_difference(method_scores(result, setting, keep, key),
                                                    method_scores(result, setting, keep, ref))
                    diff = f"{d:+5.2f} [{dlo:+4.2f}, {dhi:+4.2f}]"
                pct = 100 * avg / full_avg if full_avg else float("nan")
                lines.append(f"{scorer:18s} {allocator:9s} " + " ".join(f"{m:6.2f}" for m in fam_means) +
                             f"  {avg:5.2f} [{lo:4.2f}, {hi:4.2f}] {pct:6.1f} {mb:7.3f} {oloss:6.3f}  {diff}")
        timed = [r["timing"] for r in recs if "timing" in r]  # records of this code; older ones have none
        if timed:
            total = lambda k: sum(t[k] for t in timed)  # noqa: E731
            lines.append(f"timed phases of its {len(timed)} examples (scoring, allocation and compression not "
                         f"included): prefill {total('prefill'):.0f} s, full-cache "
                         f"answer + oracle {total('full_decode'):.0f} s ({total('full_tokens')} tokens, "
                         f"{1e3 * total('full_decode') / max(total('full_tokens'), 1):.0f} ms each), compressed "
                         f"decode {total('compressed_decode'):.0f} s (batches of "
                         f"{total('compressed_rows') / len(timed):.0f} rows, about {total('compressed_tokens')} steps, "
                         f"{1e3 * total('compressed_decode') / max(total('compressed_tokens'), 1):.0f} "
                         f"ms each)")
    return "\n".join(lines)


def full_cache_table(result):
    """Full-cache score per family (and per kind, where items have one) with 95% intervals."""
    lines = []
    for setting in result["settings"]:
        recs = [r for r in result["records"] if r["setting"] == setting]
        lines.append(f"full cache, {setting}, {result['length']} tokens, n={result['n']} per family, "
                     f"seed {result['seed']}:")
        for f in result["families"]:
            m, lo, hi = interval([r["full"] for r in recs if r["family"] == f])
            lines.append(f"  {f:16s} {m:.2f} [{lo:.2f}, {hi:.2f}]")
            for kind in sorted({r["kind"] for r in recs if r["family"] == f and r["kind"]}):
                ks = [r["full"] for r in recs if r["family"] == f and r["kind"] == kind]
                lines.append(f"    {kind:14s} {int(sum(ks))}/{len(ks)}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# profiling: one calibration context at a time, each kept on disk so an interrupted run resumes


def context_key(model_id, ctx_ids, questions, cfg):
    """What a context's tables depend on, hashed: the model, the tokens and the method's settings."""
    blob = json.dumps({"model": model_id, "context": ctx_ids, "questions": questions, "config": asdict(cfg)})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def profile_contexts(model, model_id, contexts, scorers, cfg, cache_dir, stop_token=None, log=progress):
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
                lukv.write_atomic(paths[s], lambda f: np.save(f, np.stack(got[s])))  # (questions, 99, L, H)
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


INTASK_SEED = 7  # in-task profiles: neither a development (0, 1), an evaluation (2) nor a calibration seed


def family_calibration_contexts(suite, family, n, length, seed=INTASK_SEED):
    """(context ids, [question ids]) of one evaluation family from another seed (the in-task profile)."""
    return [(item.context, [item.question]) for item in suite.items(family, n, length, seed)]


def budget_correlation(tables, row=79):
    """Pearson correlation of per-head keep shares at one ratio between every two profiles: {(a, b): r}."""
    names = list(tables)
    keep = {n: (1 - tables[n][row]).ravel() for n in names}
    return {(a, b): float(np.corrcoef(keep[a], keep[b])[0, 1]) for i, a in enumerate(names) for b in names[i + 1:]}


def correlation_report(tables, scorer, row=79):
    """budget_correlation as the lines --intask prints (tables: {name: (99, L, H)})."""
    lines = [f"correlation of per-head keep shares at {row + 1}% ({scorer}):"]
    return "\n".join(lines + [f"  {a:16s} {b:16s} {r:+.2f}" for (a, b), r in budget_correlation(tables, row).items()])


# -----------------------------------------------------------------------------
# knockout: which heads matter


@torch.no_grad()
def knockout(model, suite, families, n, length, seed, cfg, log=progress):
    """Accuracy (L, H, F) when one head at a time keeps only sink + window; the L * H variants of an
    example are the rows of one batched cache."""
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    acc, t0 = np.zeros((L, H, len(families))), time.time()
    for fi, family in enumerate(families):
        for item in suite.items(family, n, length, seed):
            cache, probe, _, imp = run_full(model, item.context, item.question, cfg, item.max_new, suite.stop_ids)
            T = len(item.context)
            scores = lukv.protect(lukv.streaming_scores(L, H, T), cfg)
            counts = np.full((L * H, L, H), T)
            for hd in range(L * H):
                counts[hd].flat[hd] = min(T, cfg.sink + cfg.window)  # head hd = (l, h) cut, the rest full
            batch = cache.repeat(L * H)
            compress(batch, scores, counts)
            for hd, ids in enumerate(decode_rows(model, batch, item.question, item.max_new, suite.stop_ids,
                                                 suite.done(item))):
                acc.reshape(L * H, -1)[hd, fi] += suite.score(item, suite.answer(ids)) / n
        log(fi + 1, len(families), f"knockout: {fi + 1}/{len(families)} families ({time.time() - t0:.0f} s)")
    return acc


def format_knockout(acc, families, full):
    lines = ["accuracy with one KV head cut to sink + window (rows: layer, head); full cache first"]
    lines.append(f"{'head':8s} " + " ".join(f"{SHORT.get(f, f):>6s}" for f in families))
    lines.append(f"{'full':8s} " + " ".join(f"{full[f]:6.2f}" for f in families))
    for l in range(acc.shape[0]):
        for h in range(acc.shape[1]):
            lines.append(f"L{l}H{h:<5d} " + " ".join(f"{x:6.2f}" for x in acc[l, h]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# beyond the paper (ours): a task-loss utility, solved with the same hull and greedy
#
# Instead of the oracle's attention-times-value proxy, measure what the task loses: the
# calibration answer's loss when only head h is cut to budget b (all other heads full), on a
# grid of budgets, linearly interpolated to every eviction count. The averaged curves go
# through the same convex hull and greedy sweep as the paper's.

TASKLOSS_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)  # fractions of a head's evictable tokens cut


@torch.no_grad()
def answer_nll(model, cache, follow_ids, answer_ids):
    """Mean negative log-likelihood (per row of the cache) of answer_ids after follow_ids: (B,)."""
    ids = torch.tensor([follow_ids + answer_ids[:-1]] * cache.B)
    logits = model(ids, cache=cache)[:, len(follow_ids) - 1:]  # (B, A, V)
    target = torch.tensor(answer_ids).expand(cache.B, -1)
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").mean(1)


@torch.no_grad()
def build_taskloss_profile(model, enc, scorer, cfg, n_contexts=8, n_questions=4, length=1024, seed=0, log=progress):
    """(99, L, H) prune ratios from task-loss curves averaged over calibration (context, question) pairs."""
    rng = random.Random(f"calibration-{seed}")
    stop = enc.encode_ordinary("\n")[0]
    L, H = model.cfg.n_layer, model.cfg.n_kv_head
    sums, t0, pairs = None, time.time(), 0
    for i in range(n_contexts):
        ex = tasks.make_example("qa", rng, length, n_questions)
        ctx = enc.encode_ordinary(ex.context)
        T = len(ctx)
        n_evictable = max(cfg.sink, T - cfg.window) - cfg.sink
        if sums is None:
            sums, T0 = np.zeros((L * H, n_evictable + 1)), T
        for q, _ in ex.qa:
            q_ids = enc.encode_ordinary(q)
            cache, probe, answer, imp = run_full(model, ctx, q_ids, cfg, cfg.horizon, stop)
            scores = scores_for(scorer, cache, probe, imp, cfg)
            base = float(answer_nll(model, cache.clone(), q_ids, answer)[0])
            # rows: every (head, grid point) with that one head cut and all others full
            counts = np.full((L * H, len(TASKLOSS_GRID), L, H), T)
            for hd in range(L * H):
                for g, frac in enumerate(TASKLOSS_GRID):
                    counts[hd, g].flat[hd] = T - round(frac * n_evictable)
            batch = cache.repeat(L * H * len(TASKLOSS_GRID))
            compress(batch, scores, counts.reshape(-1, L, H))
            points = (answer_nll(model, batch, q_ids, answer) - base).reshape(L * H, -1).numpy()
            # every context is mapped onto the first one's eviction axis by its fraction cut
            x = np.array(TASKLOSS_GRID) * (sums.shape[1] - 1)
            for hd in range(L * H):
                sums[hd] += np.interp(np.arange(sums.shape[1]), x, points[hd])
            pairs += 1
        log(i + 1, n_contexts, f"task-loss profile {scorer}: context {i + 1}/{n_contexts} ({pairs} pairs, "
            f"{time.time() - t0:.0f} s)")
    # measured losses are noisy: clip at zero and make them non-decreasing before the hull
    curves = [np.maximum.accumulate(np.maximum(c / pairs, 0.0)) for c in sums]
    n_protected = T0 - (sums.shape[1] - 1)
    floor = max(0, cfg.floor(T0) - n_protected)
    evicted = lukv.greedy_budget_table(curves, np.full(L * H, floor), len(lukv.RATIOS),
                                       n_protected_total=L * H * n_protected)
    return evicted.reshape(len(lukv.RATIOS), L, H) / T0


# -----------------------------------------------------------------------------
# output files


def safe_write(path, write, fallback_name):
    """Write a result, falling back to the current folder so a long run never loses its work."""
    try:
        write(path)
    except OSError as e:
        fallback = os.path.basename(path) or fallback_name
        print(f"could not write {path} ({e}); writing {fallback} instead", file=sys.stderr)
        path = fallback
        write(path)
    print(f"wrote {path}")
    return path


def write_json(path, result):
    def write(p):
        with open(p, "w") as f:
            json.dump(result, f, indent=1)
    return safe_write(path, write, "lukv_eval.json")


def check_writable(path):
    """Refuse an output path whose folder does not exist before a long run starts, not at its end."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"the folder of {path} does not exist; create it or give another path")


def plot(result, path, profile=None, scorer="snapkv"):
    """The README's picture (needs matplotlib): LU-KV's per-head budgets at 80% as a heatmap (when a
    profile is given), and accuracy vs compression for each allocator of one scorer, query-agnostic,
    with 95% intervals."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib to draw --plot", file=sys.stderr)
        return
    setting = result["settings"][0]
    keep = averaged_families(result, setting)
    panels = 2 if profile is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if profile is not None:
        ax = axes[0, 0]
        im = ax.imshow(100 * (1 - profile[79]), cmap="viridis", aspect="auto")  # row 79 = 80% compression
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(profile.shape[2]))
        ax.set_title(f"LU-KV budgets at 80% ({scorer}): % of context kept")
        fig.colorbar(im, ax=ax)
    ax = axes[0, -1]
    n_avg = len(method_scores(result, setting, keep))
    for s, allocator in result["methods"]:
        if s != scorer:
            continue
        stats = [interval(method_scores(result, setting, keep, f"{s}|{allocator}|{r}")) for r in result["ratios"]]
        mean = np.array([m for m, _, _ in stats])
        err = np.array([[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]])
        ax.errorbar([100 * r for r in result["ratios"]], mean, yerr=err, marker="o", capsize=3, label=allocator)
    ax.axhline(np.mean(method_scores(result, setting, keep)), color="k", ls="--", label="full cache")
    ax.set_xlabel("KV cache compression (%)")
    ax.set_ylabel(f"score, avg of {n_avg} examples")
    ax.set_title(f"{scorer} scores, {setting}, {result['length']} tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    safe_write(path, lambda p: fig.savefig(p, dpi=120), "lukv_eval.png")


def load_profiles(checkpoint, model_id, shape, scorers, cfg, intask_dir=None, families=()):
    """{scorer: table} for LU-KV, {'taskloss_' + scorer: table} for ours, and the in-task profiles
    {'intask_<family>_<scorer>': table} that `--intask` wrote to intask_dir, where the files exist."""
    out = {}
    for s in scorers:
        paths = {key: lukv.profile_path(checkpoint, key) for key in (s, "taskloss_" + s)}
        if intask_dir:
            paths.update({f"intask_{f}_{s}": os.path.join(intask_dir, f"profile_intask_{f}_{s}.npy") for f in families})
        for key, path in paths.items():
            if os.path.exists(path):
                out[key] = lukv.load_profile(path, s, model_id, shape, cfg)[0]
    return out


ALLOCATORS = ["uniform", "pyramid", "adakv", "lukv", "taskloss", "shuffled", "oracle"]
SCORERS = ["snapkv", "keydiff", "knorm", "expected_attention", "oracle"]


def method_list(scorers, allocators, profiles):
    """(scorer, allocator) pairs, without those that need a profile this scorer does not have."""
    return [(s, a) for s in scorers for a in allocators
            if a not in ("lukv", "shuffled", "taskloss", "intask") or a == "intask" and any(
                k.startswith("intask_") and k.endswith("_" + s) for k in profiles) or profile_key(s, a) in profiles]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--eval", action="store_true", help="the full evaluation table")
    parser.add_argument("--full-cache", action="store_true", help="only the full-cache accuracy per family")
    parser.add_argument("--knockout", action="store_true", help="accuracy with one head at a time cut to sink + window")
    parser.add_argument("--taskloss", action="store_true", help="(ours) build the task-loss profile for --scorers")
    parser.add_argument("--intask", action="store_true", help=f"diagnostic: one profile per family from seed "
                        f"{INTASK_SEED} (the in-task profile the intask allocator reads) and the budget correlations")
    # ---- model and method
    parser.add_argument("--checkpoint", default=lukv.DEFAULT_CHECKPOINT)
    parser.add_argument("--scorers", "--scorer", default=None, help="comma list (default: " + ",".join(SCORERS) + ")")
    parser.add_argument("--allocators", default=None, help="comma list (default: " + ",".join(ALLOCATORS) + ")")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: answer tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="context tokens")
    parser.add_argument("--n", type=int, default=None, help="examples per family")
    parser.add_argument("--families", default=None, help="comma list (default: every evaluation family + qa)")
    parser.add_argument("--ratios", default="0.5,0.8,0.9")
    parser.add_argument("--settings", default="agnostic,aware")
    parser.add_argument("--seed", type=int, default=2, help="evaluation seed (calibration and development use others)")
    parser.add_argument("--calib-contexts", type=int, default=16, help="--taskloss: calibration contexts (/2)")
    parser.add_argument("--calib-questions", type=int, default=8, help="--taskloss: questions per context (/2)")
    # ---- output
    parser.add_argument("--json", default="lukv_eval.json")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="--eval: the budget heatmap and accuracy vs "
                        "compression (needs matplotlib)")
    parser.add_argument("--from", dest="from_json", default=None, metavar="RESULT.json",
                        help="print the table of a saved --eval or --full-cache result (with --plot: draw it) "
                        "instead of running one")
    parser.add_argument("--out-dir", default="runs/profiles", help="--taskloss, --intask: where the profiles go (the "
                        "shipped ones in checkpoints/ are replaced only when you name it); --eval reads in-task "
                        "profiles from here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.from_json and not args.plot:  # print a saved result's table with this code
        with open(args.from_json) as f:
            saved = json.load(f)
        print(format_table(saved) if saved["ratios"] else full_cache_table(saved))
        sys.exit(0)
    if args.plot and args.from_json:  # redraw the picture from a saved result
        with open(args.from_json) as f:
            saved = json.load(f)
        m, _ = lukv.load_checkpoint(args.checkpoint)
        cfg = LUKVConfig(sink=args.sink, window=args.window, snap_window=args.snap_window)
        profile = lukv.load_profile(lukv.profile_path(args.checkpoint, "snapkv"), "snapkv", lukv.file_id(args.checkpoint),
                                    (m.cfg.n_layer, m.cfg.n_kv_head), cfg)[0]
        plot(saved, args.plot, profile)
        sys.exit(0)
    if not (args.eval or args.full_cache or args.knockout or args.taskloss or args.intask):
        parser.print_help()
        sys.exit(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in [args.json] + ([args.plot] if args.plot else []):
        check_writable(path)
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, snap_window=args.snap_window)
    model, enc, meta = lukv.load_tiny(args.checkpoint)
    model_id, shape = lukv.file_id(args.checkpoint), (model.cfg.n_layer, model.cfg.n_kv_head)
    print(f"model: {os.path.basename(args.checkpoint)} ({model.num_params() / 1e6:.2f}M parameters, id {model_id})")
    suite = TinySuite(enc)
    families = args.families.split(",") if args.families else suite.families
    ratios = [float(r) for r in args.ratios.split(",")]
    for r in ratios:
        lukv.check_ratio(r)
    scorers = args.scorers.split(",") if args.scorers else SCORERS
    partial = args.json + ".partial.jsonl"

    if args.taskloss:
        for s in (args.scorers.split(",") if args.scorers else ["snapkv"]):  # one profile takes minutes
            table = build_taskloss_profile(model, enc, s, cfg, max(1, args.calib_contexts // 2),
                                           max(1, args.calib_questions // 2), args.length)
            meta_p = lukv.profile_meta(s, model_id, cfg, utility="task loss (ours): calibration answer NLL with "
                                                                 f"one head cut, grid {TASKLOSS_GRID}")
            os.makedirs(args.out_dir, exist_ok=True)
            path = os.path.join(args.out_dir, f"profile_taskloss_{s}.npy")
            lukv.save_profile(path, table, meta_p)
            print(f"wrote {path}")

    if args.intask:  # one profile per family, from INTASK_SEED
        os.makedirs(args.out_dir, exist_ok=True)
        tables = {}
        for family in families:
            contexts = family_calibration_contexts(suite, family, args.calib_contexts, args.length)
            got, counts = profile_contexts(model, model_id, contexts, scorers, cfg,
                                           os.path.join(args.out_dir, f"intask_{family}.cache"), suite.stop_ids)
            for s, table in got.items():
                path = os.path.join(args.out_dir, f"profile_intask_{family}_{s}.npy")
                lukv.save_profile(path, table, lukv.profile_meta(
                    s, model_id, cfg, key=f"intask_{family}_{s}", horizon=cfg.horizon,
                    calibration=f"in-task: {family}, seed {INTASK_SEED}, {len(contexts)} examples", **counts))
                print(f"wrote {path}")
            tables[family] = got[scorers[0]]
        calib = lukv.profile_path(args.checkpoint, scorers[0])
        if os.path.exists(calib):
            tables["calibration"] = lukv.load_profile(calib, scorers[0], model_id, shape, cfg)[0]
        print(correlation_report(tables, scorers[0]))

    if args.knockout:
        n = args.n or 10
        acc = knockout(model, suite, families, n, args.length, args.seed, cfg)
        full_run = evaluate(model, suite, {}, families, [], [], n, args.length, args.seed, cfg)
        full = {f: float(np.mean([r["full"] for r in full_run["records"] if r["family"] == f])) for f in families}
        print(format_knockout(acc, families, full))
        write_json(args.json, {"knockout": acc.tolist(), "families": families, "full": full, "n": n})

    if args.full_cache:
        result = evaluate(model, suite, {}, families, [], [], args.n or 50, args.length, args.seed, cfg,
                          ("agnostic",), partial, model_id)
        print(full_cache_table(result))
        write_json(args.json, result)

    if args.eval:
        allocators = args.allocators.split(",") if args.allocators else ALLOCATORS
        profiles = load_profiles(args.checkpoint, model_id, shape, scorers, cfg,
                                 args.out_dir if "intask" in allocators else None, families)
        missing = [f for f in families if "intask" in allocators
                   and not any(k.startswith(f"intask_{f}_") for k in profiles)]
        if missing:
            sys.exit(f"the intask allocator needs the in-task profiles of {missing} in {args.out_dir}: make them with "
                     f"python evaluate.py --intask --families {','.join(missing)} --out-dir {args.out_dir}")
        methods = method_list(scorers, allocators, profiles)
        methods += [("streaming", "uniform")]
        result = evaluate(model, suite, profiles, families, ratios, methods, args.n or 10, args.length, args.seed,
                          cfg, tuple(args.settings.split(",")), partial, model_id)
        print(format_table(result))
        write_json(args.json, result)
        if args.plot:
            plot(result, args.plot, profiles.get("snapkv"))
