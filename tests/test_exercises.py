"""Tests of EXERCISES.md: every exercise's check passes on the repository and fails once its function is emptied.

    python -m pytest -q tests/test_exercises.py

Each exercise in EXERCISES.md carries three machine-readable lines:

    Function: `solver.py::lower_convex_hull`            (one or more, comma-separated; Class.method allowed)
    Check: `python -m pytest -q tests/test_solver.py -k "hull"`
    Expect: `2 passed`

Every check must pass on the repository and fail on a copy where its function's body is
`raise NotImplementedError`. Most of a fresh pytest run is importing torch and hypothesis, so the
runs do not each start a Python: one server process (`python test_exercises.py --serve`) imports
the heavy libraries once and forks a child per run, which changes into its folder and calls
pytest.main there. The pass checks of one test file share one run: each check's selection is
collected with its own -k (pytest decides what it selects), then the union runs once and every
test's outcome is recorded. Each emptied function gets its own run of its check, stopping at the
first failure, in one of two copies of the repository (one per child running at a time): the file
under test is rewritten before the run and restored after it. At most two runs go at once (a
2-core machine), the slow ones first.
"""
import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import traceback

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EXERCISES = os.path.join(HERE, "EXERCISES.md")
PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider",
               "-W", "ignore::pytest.PytestAssertRewriteWarning"]  # the server imports hypothesis before pytest
WORKERS = 2  # checks running at once, and copies of the repository for the emptied ones
TIMEOUT = 300  # seconds per check; the slowest (the Triton interpreter) takes about 10 s
HEAVY = ["torch", "torch.nn", "torch.nn.functional", "numpy", "regex", "tiktoken", "hypothesis",
         "hypothesis.strategies", "hypothesis.extra._patching",  # (libcst: hypothesis reports a failure with it)
         "triton", "triton.language"]  # what the server imports before forking, where installed


def parse_exercises(text):
    """[(title, functions, check, expect)] from the '## ' sections of EXERCISES.md that carry a Check line."""
    out = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        fields = {}
        for key in ("Function", "Check", "Expect"):
            m = re.search(rf"^{key}: (.+)$", section, flags=re.M)
            fields[key] = re.findall(r"`([^`]+)`", m.group(1)) if m else []
        if not fields["Check"]:
            continue
        assert fields["Function"] and fields["Expect"], f"exercise {title!r}: expected Function:, Check: and Expect: lines"
        out.append((title, fields["Function"], fields["Check"][0], fields["Expect"][0]))
    return out


def check_args(command):
    """The pytest arguments of a check command 'python -m pytest -q FILE -k "..."' (without -q)."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "pytest"], f"a check must start with 'python -m pytest', got {command!r}"
    return [w for w in words[3:] if w != "-q"]


def empty_function(source, qualname):
    """source with the body of function `qualname` ('name' or 'Class.name') replaced by raise NotImplementedError.

    The signature, decorators and docstring stay; ast gives the line numbers of the body."""
    tree = ast.parse(source)
    scope, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        assert node is not None, f"{qualname}: no {part!r} found"
        scope = node.body
    assert isinstance(node, ast.FunctionDef), f"{qualname} is not a function"
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    first = body[1] if has_doc and len(body) > 1 else body[0]
    if has_doc and len(body) == 1:
        raise AssertionError(f"{qualname} has only a docstring: nothing to empty")
    lines = source.splitlines(keepends=True)
    indent = " " * first.col_offset
    start, end = first.lineno - 1, node.end_lineno  # 0-based start line, exclusive end
    return "".join(lines[:start] + [f"{indent}raise NotImplementedError\n"] + lines[end:])


def copy_repository(dst):
    """The files the checks need: the root's *.py, *.md, pytest.ini, requirements*.txt, the folders of code
    and checkpoints/, with the compiled modules (__pycache__, still valid: copy2 keeps the times they are
    checked against); not results/, runs/ or .git."""
    os.makedirs(dst)
    for name in os.listdir(HERE):
        if name.endswith((".py", ".md")) or name == "pytest.ini" or re.fullmatch(r"requirements.*\.txt", name):
            shutil.copy2(os.path.join(HERE, name), dst)
    for folder in ("checkpoints", "tests", "experiments", "bench", "__pycache__"):
        if os.path.isdir(os.path.join(HERE, folder)):
            shutil.copytree(os.path.join(HERE, folder), os.path.join(dst, folder),
                            ignore=shutil.ignore_patterns("*.cache", "*.tmp"))


def write_source(path, source):
    """Write a module's source and drop its compiled file, which may belong to another version of the same
    size written in the same second (the two things Python checks)."""
    with open(path, "w") as f:
        f.write(source)
    compiled = importlib.util.cache_from_source(path)
    if os.path.exists(compiled):
        os.remove(compiled)


# -----------------------------------------------------------------------------
# the server: import once, fork a child per run


class Collected:
    """A pytest plugin: the node ids a run selects."""

    def pytest_collection_finish(self, session):
        self.nodeids = [item.nodeid for item in session.items]


class Outcomes:
    """A pytest plugin: each test's outcome, 'failed' if any phase failed, else 'skipped' if one skipped."""

    def __init__(self):
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        old = self.outcomes.get(report.nodeid, "passed")
        self.outcomes[report.nodeid] = "failed" if report.failed or old == "failed" else \
            "skipped" if report.skipped or old == "skipped" else "passed"


def run_checks(job):
    """The pass checks of one test file in one pytest run: each check's selection (collected with its own
    -k, so pytest decides what it selects), then the union of them run once; written to job["result"]."""
    members = []
    for expr in job["exprs"]:
        collected = Collected()
        pytest.main(["--collect-only"] + PYTEST_ARGS + job["args"] + (["-k", expr] if expr else []),
                    plugins=[collected])
        members.append(collected.nodeids)
    union = " or ".join(f"({e})" for e in job["exprs"]) if all(job["exprs"]) else None
    record = Outcomes()
    code = pytest.main([a for a in PYTEST_ARGS if a != "-x"] + job["args"] + (["-k", union] if union else []),
                       plugins=[record])
    with open(job["result"], "w") as f:
        json.dump({"members": members, "outcomes": record.outcomes}, f)
    return code


def run_child(job, cwd):
    """In a forked child: run the job's pytest in cwd, output to job["log"]; never returns."""
    code = 99
    try:
        os.chdir(cwd)
        theirs = ("", HERE, cwd, os.path.join(HERE, "tests"))  # the repository's own modules: the folder's instead
        sys.path[:] = [cwd] + [p for p in sys.path if p not in theirs]
        null, log = os.open(os.devnull, os.O_RDONLY), os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(null, 0), os.dup2(log, 1), os.dup2(log, 2)
        signal.alarm(TIMEOUT)  # a hung check dies by SIGALRM and reads as a failure
        if job["empty"] is None:
            code = int(run_checks(job))
        else:  # one check, stopping at its first failure; hypothesis need not shrink what always raises, and
            # Python's own tracebacks name the exception without parsing every file they pass through
            code = int(pytest.main(PYTEST_ARGS + ["--tb=native", "--hypothesis-profile", "exercises-emptied"]
                                   + job["args"]))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def serve(slots):
    """Read every job (one JSON line each) from stdin, run them WORKERS at a time, print {id, rc} lines.

    A job {"id", "args", "log", "empty": null | {"path", "source"}} runs in HERE (the pass checks of one
    file, run_checks; also "exprs" and "result"), or in a free slot, a copy of the repository, where
    slot/path holds "source" for the run and the original again after it."""
    plugins = [ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group="pytest11")]
    for name in HEAVY + plugins:  # the children inherit these imported; the project's modules they import fresh
        try:
            __import__(name)
        except ImportError:
            pass
    from hypothesis import Phase, settings
    settings.register_profile("exercises-emptied", max_examples=10, deadline=None, database=None,
                              phases=[Phase.explicit, Phase.generate])
    pending = [json.loads(line) for line in sys.stdin if line.strip()]
    free, running = list(slots), {}  # pid -> (job, slot)
    while pending or running:
        while len(running) < WORKERS:
            job = next((j for j in pending if j["empty"] is None or free), None)
            if job is None:
                break
            pending.remove(job)
            slot = free.pop() if job["empty"] else None
            if slot:
                write_source(os.path.join(slot, job["empty"]["path"]), job["empty"]["source"])
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                run_child(job, slot or HERE)
            running[pid] = (job, slot)
        pid, status = os.wait()
        job, slot = running.pop(pid)
        if slot:
            with open(os.path.join(HERE, job["empty"]["path"])) as f:
                write_source(os.path.join(slot, job["empty"]["path"]), f.read())
            free.append(slot)
        print(json.dumps({"id": job["id"], "rc": os.waitstatus_to_exitcode(status)}), flush=True)


# -----------------------------------------------------------------------------
# the tests


EXERCISE_LIST = parse_exercises(open(EXERCISES).read()) if os.path.exists(EXERCISES) else []
PASS_CASES = [pytest.param(e, id=f"ex{i + 1}") for i, e in enumerate(EXERCISE_LIST)]
EMPTY_CASES = [pytest.param(e, fn, id=f"ex{i + 1}-{fn.split('::')[-1]}")
               for i, e in enumerate(EXERCISE_LIST) for fn in e[1]]


def triton_missing(functions):
    return any(f.startswith("kernels.py::") for f in functions) and importlib.util.find_spec("triton") is None


def needs_triton(functions):
    if triton_missing(functions):
        pytest.skip("the Triton exercise needs triton (the CPU interpreter runs it: pip install triton)")


def split_k(args):
    """(the arguments without -k, the -k expression or None)."""
    if "-k" not in args:
        return args, None
    i = args.index("-k")
    return args[:i] + args[i + 2:], args[i + 1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every check, run by one server. ("pass", title) -> (failed node ids, passed count, output);
    ("empty", title, fn) -> (returncode, output)."""
    tmp = tmp_path_factory.mktemp("exercises")
    slots = [str(tmp / f"repo{i}") for i in range(WORKERS)]
    for slot in slots:
        copy_repository(slot)
    out, groups, jobs = {}, {}, []
    for title, functions, check, _ in EXERCISE_LIST:
        if triton_missing(functions):
            continue
        args, expr = split_k(check_args(check))
        groups.setdefault(json.dumps(args), []).append((title, expr))  # the pass checks of one file: one run
        for fn in functions:
            path, qualname = fn.split("::")
            try:
                with open(os.path.join(HERE, path)) as f:
                    source = empty_function(f.read(), qualname)
            except (OSError, AssertionError) as e:  # a renamed function fails its own case, not every case
                out[("empty", title, fn)] = (None, f"could not empty {fn}: {e}")
                continue
            jobs.append({"key": ["empty", title, fn], "args": check_args(check),
                         "empty": {"path": path, "source": source}})
    jobs += [{"titles": [title for title, _ in checks], "args": json.loads(args), "exprs": [e for _, e in checks],
              "empty": None} for args, checks in groups.items()]
    for i, job in enumerate(jobs):
        job.update(id=i, log=str(tmp / f"run{i}.log"), result=str(tmp / f"run{i}.json"))
    jobs.sort(key=lambda j: ("tests/test_kernels.py" not in j["args"], j["empty"] is not None))  # the slow ones first
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # one thread per check
           "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp / "hypothesis")}  # hypothesis's examples stay out of the repository
    import torch  # (conftest.py has imported it already)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # conftest.py's rule, decided before the server imports triton
    server = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve", *slots], cwd=HERE, env=env,
                            input="".join(json.dumps(j) + "\n" for j in jobs), capture_output=True, text=True,
                            timeout=TIMEOUT * len(jobs) / WORKERS + 60)
    done = {r["id"]: r["rc"] for r in map(json.loads, server.stdout.splitlines())}
    for job in jobs:
        log = open(job["log"]).read() if os.path.exists(job["log"]) else ""
        log = log or f"no output (return code {done.get(job['id'])}); the server said:\n{server.stderr[-3000:]}"
        if job["empty"] is not None:
            out[tuple(job["key"])] = (done.get(job["id"]), log)
            continue
        got = json.load(open(job["result"])) if os.path.exists(job["result"]) else {"members": [], "outcomes": {}}
        for title, ids in zip(job["titles"], got["members"] + [[]] * len(job["titles"])):
            outcomes = [got["outcomes"].get(nodeid, "not run") for nodeid in ids]
            failed = [nodeid for nodeid, o in zip(ids, outcomes) if o not in ("passed", "skipped")]
            out[("pass", title)] = (failed if ids else ["(nothing collected)"], outcomes.count("passed"), log)
    return out


def test_exercises_file_lists_eight_to_twelve_checked_exercises():
    """EXERCISES.md holds 8 to 12 exercises, each naming existing functions, a pytest check and its summary."""
    assert 8 <= len(EXERCISE_LIST) <= 12, f"expected 8 to 12 exercises with Check: lines, found {len(EXERCISE_LIST)}"
    for title, functions, check, expect in EXERCISE_LIST:
        assert re.fullmatch(r"\d+ passed", expect), f"{title}: Expect: should read 'N passed', got {expect!r}"
        check_args(check)
        for fn in functions:
            path, qualname = fn.split("::")
            empty_function(open(os.path.join(HERE, path)).read(), qualname)  # raises if the name is gone


def test_empty_function_keeps_signature_and_docstring():
    """Emptying keeps decorators, signature and docstring, and the result still parses and raises."""
    source = 'import functools\n\n\nclass A:\n    @functools.lru_cache\n    def f(self, x,\n          y=1):\n' \
             '        """Doc."""\n        z = x + y\n        return z\n\n    def g(self):\n        return 2\n'
    emptied = empty_function(source, "A.f")
    assert '"""Doc."""\n        raise NotImplementedError\n\n    def g' in emptied and "z = x" not in emptied
    namespace = {}
    exec(emptied, namespace)
    with pytest.raises(NotImplementedError):
        namespace["A"]().f(1)
    assert namespace["A"]().g() == 2


@pytest.mark.parametrize("exercise", PASS_CASES)
def test_check_passes_on_the_repository(results, exercise):
    """The exercise's check selects tests that all pass on the repository as it is, as many as Expect says."""
    title, functions, check, expect = exercise
    needs_triton(functions)
    failed, passed, output = results[("pass", title)]
    assert not failed, f"{title}: {check} failed on the repository ({', '.join(failed)}):\n{output[-3000:]}"
    assert expect == f"{passed} passed", f"{title}: expected {expect!r}, the check passes {passed}"


@pytest.mark.parametrize("exercise, function", EMPTY_CASES)
def test_check_fails_when_the_function_is_emptied(results, exercise, function):
    """With the function's body replaced by raise NotImplementedError (in a copy), the check fails because of it."""
    title, functions, check, _ = exercise
    needs_triton(functions)
    code, output = results[("empty", title, function)]
    assert code is not None, output
    assert code != 0, f"{title}: {check} still passes with {function} emptied:\n{output[-2000:]}"
    assert "NotImplementedError" in output, \
        f"{title}: {check} fails with {function} emptied, but not because of it:\n{output[-3000:]}"


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2:])
