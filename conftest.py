"""
pytest setup shared by every test file: the Triton interpreter on CPU-only machines, hypothesis
profiles, the `slow` marker and the `tiny` tokenizer fixture.

    python -m pytest -q                              # fast: hypothesis profile "ci", slow tests skipped
    python -m pytest -q --run-slow                   # also the slow ones (torch.compile of every v2 case)
    HYPOTHESIS_PROFILE=thorough python -m pytest -q  # many more hypothesis examples

pytest imports this file before any test module, so the environment set here is in place before
anything imports triton or kernels.py (Triton picks interpreter or compiler when a kernel is defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # v3 kernels run as Python on the CPU

from hypothesis import settings  # noqa: E402

# no example database: tests write only to their tmp_path, and every run draws afresh
settings.register_profile("ci", max_examples=10, deadline=None, database=None)  # the default: a few per property
settings.register_profile("thorough", max_examples=200, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny tokenizer (checkpoints/tiny.tiktoken), for every test that reads it."""
    import tasks
    return tasks.load_tokenizer(os.path.join(tasks.ROOT, "checkpoints", "tiny.tiktoken"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (torch.compile cases)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes many seconds on a CPU (torch.compile); run with --run-slow")
    # the interpreter evaluates masked-off lanes too (0 / 0 in padded query rows): numpy warns, nothing is stored
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (torch.compile compiles each case); run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
