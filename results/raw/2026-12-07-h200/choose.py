"""The pre-registered choice of the default protocol and table-length policy from the dev-seed runs.

For every protocol P and policy (P's 1k table at every length, P's 4k table at every length, or the table made
at the evaluated length): the mean over lengths {1024, 4096} and scorers {expected_attention, keydiff} of LU-KV's
dev-seed average at 80% (over the families the full cache gets >= 50% right in that run). The best wins; ties go
to documents, then mixed, then paper, and to the 1024 policy, then 4096, then per-length (the simplest first)."""
import glob
import json
import sys

import numpy as np

W = sys.argv[1]
scores = {}  # (length, scorer, table stem) -> mean
for L in (1024, 4096):
    records = []
    for path in sorted(glob.glob(f"{W}/dev_{L}_*.json")):
        records += json.load(open(path))["records"]
    fams = sorted({r["family"] for r in records})
    kept = [f for f in fams if np.mean([r["full"] for r in records if r["family"] == f]) >= 0.5]
    recs = [r for r in records if r["family"] in kept]
    print(f"dev {L}: {len(recs)} examples over {kept}; full {np.mean([r['full'] for r in recs]):.3f}")
    for key in recs[0]["methods"] if recs else []:
        scorer, label, ratio = key.split("|")
        stem = label.split(":", 1)[1]  # lukv:smollm2_<protocol>_<length>_<scorer>
        scores[(L, scorer, stem)] = float(np.mean([r["methods"][key]["score"] for r in recs]))
        print(f"  {scorer:18s} {stem:45s} {scores[(L, scorer, stem)]:.3f}")
best = None
for p_rank, P in enumerate(["documents", "mixed", "paper"]):
    for q_rank, policy in enumerate(["1024", "4096", "per-length"]):
        vals = [scores.get((L, s, f"smollm2_{P}_{L if policy == 'per-length' else policy}_{s}"))
                for L in (1024, 4096) for s in ("expected_attention", "keydiff")]
        if any(v is None for v in vals):
            print(f"{P:10s} {policy:10s} incomplete")
            continue
        mean = float(np.mean(vals))
        print(f"{P:10s} {policy:10s} {mean:.4f}  ({', '.join(f'{v:.3f}' for v in vals)})")
        if best is None or mean > best[0] + 1e-12:
            best = (mean, P, policy)
print(f"protocol {best[1]}\npolicy {best[2]}\nmean {best[0]:.4f}")
