"""Tests of EXERCISES.md: every exercise's check passes on the repository and fails once its function is emptied.

    python -m pytest -q test_exercises.py

Each exercise in EXERCISES.md carries three machine-readable lines:

    Function: `lukv.py::lower_convex_hull`            (one or more, comma-separated; Class.method allowed)
    Check: `python -m pytest -q test_lukv.py -k "hull"`
    Expect: `2 passed`

The checks run as subprocesses, two at a time (a 2-core CI machine), each once on the repository
and once per function on a copy in tmp_path where that function's body is `raise NotImplementedError`.
"""
import ast
import concurrent.futures
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXERCISES = os.path.join(HERE, "EXERCISES.md")
PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
TIMEOUT = 300  # seconds per check; the slowest (the Triton interpreter) takes about 10 s


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
    """The files the checks need: *.py, pytest.ini, requirements*.txt and checkpoints/ (not runs/ or .git)."""
    os.makedirs(dst)
    for name in os.listdir(HERE):
        if name.endswith(".py") or name == "pytest.ini" or re.fullmatch(r"requirements.*\.txt", name):
            shutil.copy2(os.path.join(HERE, name), dst)
    shutil.copytree(os.path.join(HERE, "checkpoints"), os.path.join(dst, "checkpoints"))


def run_check(command, cwd):
    # one torch thread per check: the pool already runs one check per core, and more threads only contend
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(PYTEST + check_args(command), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


EXERCISE_LIST = parse_exercises(open(EXERCISES).read()) if os.path.exists(EXERCISES) else []
PASS_CASES = [pytest.param(e, id=f"ex{i + 1}") for i, e in enumerate(EXERCISE_LIST)]
EMPTY_CASES = [pytest.param(e, fn, id=f"ex{i + 1}-{fn.split('::')[-1]}")
               for i, e in enumerate(EXERCISE_LIST) for fn in e[1]]


def needs_triton(functions):
    if any(f.startswith("kernels.py::") for f in functions) and importlib.util.find_spec("triton") is None:
        pytest.skip("the Triton exercise needs triton (the CPU interpreter runs it: pip install triton)")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every run, started at once on a small pool: key -> future of (returncode, output)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    futures = {}
    for title, functions, check, _ in EXERCISE_LIST:  # the long ones first keeps both workers busy to the end
        futures[("pass", title)] = pool.submit(run_check, check, HERE)
    for title, functions, check, _ in EXERCISE_LIST:
        for fn in functions:
            path, qualname = fn.split("::")
            dst = str(tmp_path_factory.mktemp("empty") / "repo")
            copy_repository(dst)
            with open(os.path.join(dst, path)) as f:
                source = f.read()
            with open(os.path.join(dst, path), "w") as f:
                f.write(empty_function(source, qualname))
            futures[("empty", title, fn)] = pool.submit(run_check, check, dst)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


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
    """The exercise's check command passes on the repository as it is and prints its Expect summary."""
    title, functions, check, expect = exercise
    needs_triton(functions)
    code, output = results[("pass", title)].result()
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert code == 0, f"{title}: {check} failed on the repository:\n{output[-3000:]}"
    assert re.search(rf"(^|\D){expect}\b", summary), f"{title}: expected {expect!r} in the summary, got {summary!r}"


@pytest.mark.parametrize("exercise, function", EMPTY_CASES)
def test_check_fails_when_the_function_is_emptied(results, exercise, function):
    """With the function's body replaced by raise NotImplementedError (in a copy), the check fails because of it."""
    title, functions, check, _ = exercise
    needs_triton(functions)
    code, output = results[("empty", title, function)].result()
    assert code != 0, f"{title}: {check} still passes with {function} emptied:\n{output[-2000:]}"
    assert "NotImplementedError" in output, \
        f"{title}: {check} fails with {function} emptied, but not because of it:\n{output[-3000:]}"
