"""Hand-made mutants of the method: apply each one-line edit, run the method's tests, put the line back,
and say which test functions fail. Each mutant changes what the method computes; a test suite that
guards every property twice fails at least two test functions for each.

    python tests/mutants.py          # from the repository root; a few minutes on a 2-core CPU
"""
import re
import subprocess
import sys

MUTANTS = [  # (file, the line as it is, the mutant)
 ("lukv.py", "        norms.append(n / n.sum())", "        norms.append(n)"),
 ("solver.py", "while len(blocks) >= 2", "while len(blocks) >= 3"),
 ("lukv.py", "        imp = torch.maximum(imp, (a * vnorm[..., :T].float()).amax(dim=2))", "        imp = imp + (a * vnorm[..., :T].float()).amax(dim=2)"),
 ("baselines.py", "total, floor, alpha = kept_total(L * H, ratio, T, cfg), cfg.floor(T), cfg.adakv_alpha", "total, floor, alpha = kept_total(L * H, ratio, T, cfg), cfg.floor(T), 0.0"),
 ("solver.py", "    n_tokens = sum(len(c) - 1 for c in curves) + n_protected_total", "    n_tokens = sum(len(c) - 1 for c in curves)"),
 ("solver.py", "    by_remainder = np.lexsort((np.arange(len(shares)), -(shares - rounded)))", "    by_remainder = np.arange(len(shares))"),
 ("solver.py", "    return n - (2 * millionths * n + 10**6) // (2 * 10**6)", "    return n - (2 * millionths * n + 10**6 - 1) // (2 * 10**6)"),
]
FILES = "test_lukv.py tests/test_scorers.py tests/test_solver.py tests/test_peers.py".split()
for path, a, b in MUTANTS:
    src = open(path).read()
    assert src.count(a) == 1, (path, a)
    open(path, "w").write(src.replace(a, b))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *FILES], capture_output=True, text=True)
        failed = sorted({re.sub(r"\[.*", "", l.split("::")[1].split(" ")[0]) for l in r.stdout.splitlines() if l.startswith("FAILED")})
        print(f"{path}: {b.strip()[:60]} -> {len(failed)} test functions fail: {failed}", flush=True)
    finally:
        open(path, "w").write(src)
