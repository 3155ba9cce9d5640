"""
Tests of experiments/calibration.py: every protocol is deterministic and fits its length in the
shipped tiny tokenizer's tokens; the story has seven chapters and answerable questions of every kind;
mixed mixes many kinds of text and none of the evaluation families' shapes; documents() is the shipped tables'
protocol token for token; calibration files round-trip and bad ones are refused by file and line.

    python -m pytest -q tests/test_calibration.py
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import tasks
from experiments import calibration as cal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the evaluation families' texts look like (tasks.py and experiments/ruler.py): no calibration text may
EVALUATION_SHAPES = ["special magic", tasks.needle("x", 1)[:28], "VAR ", "Document 1:", "lives in", "works as a",
                     "Answer the question based on the given documents", "Below is a list of words",
                     "Read the following coded text"]


def chapters_of(text):
    """{1..7: the text of that chapter, heading included}."""
    parts = text.split("\nChapter ")[1:]
    return {cal.ORDINALS.index(p.split(":")[0]) + 1: "Chapter " + p for p in parts}


@pytest.mark.parametrize("name", list(cal.PROTOCOLS))
def test_deterministic_by_seed(name, tiny):
    """A protocol's maker returns the same set for the same seed and a different one for another seed."""
    make = cal.PROTOCOLS[name].maker
    first, again, other = make(0, 1024, tiny), make(0, 1024, tiny), make(1, 1024, tiny)
    assert first.contexts == again.contexts and first.answers == again.answers
    assert first.contexts[0][0] != other.contexts[0][0], f"{name}: seeds 0 and 1 gave the same first context"


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("name", ["paper", "mixed"])
def test_contexts_fit_length(name, length, tiny):
    """Every context plus any one question in the protocol's format fits the length, within 15% of it."""
    protocol = cal.PROTOCOLS[name]
    for seed in (0, 1):
        for context, questions in protocol.maker(seed, length, tiny).contexts:
            n = cal.count_tokens(tiny, context)
            longest = max(cal.count_tokens(tiny, protocol.question_format.format(q=q)) for q in questions)
            assert n + longest <= length, f"{name} seed {seed}: {n} + {longest} tokens > {length}"
            assert n >= 0.85 * length, f"{name} seed {seed}: only {n} of {length} tokens used"


def test_documents_fit_length(tiny):
    """documents() stops 40 tokens short of the length, so a question fits beside them."""
    for context, questions in cal.documents(0, 1024, tiny).contexts:
        assert cal.count_tokens(tiny, context) <= 1024 and len(questions) == 8


@pytest.mark.parametrize("length", [1024, 4096])
def test_story_chapters_and_questions(length, tiny):
    """The story has chapters One to Seven in order and 28-34 questions: details, foreshadowing and structure
    for every chapter, whole-text ones, and each question's reference answer in the text (of its chapter)."""
    for seed in range(4):
        c = cal.story(seed, length, tiny)
        (text, questions), answers, kinds = c.contexts[0], c.answers[0], c.kinds[0]
        chapters = chapters_of(text)
        assert list(chapters) == list(range(1, 8)), f"seed {seed}: chapters {list(chapters)}"
        assert 28 <= len(questions) <= 34 and len(answers) == len(kinds) == len(questions)
        for ch in range(1, 8):
            got = {k.split("/")[1] for k in kinds if k.startswith(f"ch{ch}/")}
            assert got == {"details", "foreshadowing", "structure"}, f"seed {seed}, chapter {ch}: {got}"
        assert 2 <= kinds.count("whole") <= 4
        for q, a, k in zip(questions, answers, kinds):
            where = text if k == "whole" else chapters[int(k[2])]
            assert a.lower() in where.lower(), f"seed {seed}: the answer {a!r} to {q!r} ({k}) is not in its text"


def test_story_grows_with_length(tiny):
    """The plot and questions depend on the seed only; a longer length gives longer chapters."""
    short, long = cal.story(0, 1024, tiny), cal.story(0, 4096, tiny)
    assert short.contexts[0][1] == long.contexts[0][1] and short.answers == long.answers
    for ch in range(1, 8):
        assert len(chapters_of(long.contexts[0][0])[ch]) > len(chapters_of(short.contexts[0][0])[ch])
    with pytest.raises(ValueError, match="at least"):
        cal.story(0, 300, tiny)


def test_mixed_kinds_and_no_evaluation_shapes(tiny):
    """mixed uses at least 5 kinds of text; neither it nor the story holds an evaluation family's phrasing."""
    m = cal.mixed(0, 4096, tiny)
    assert len({k.split("/")[0] for ks in m.kinds for k in ks}) >= 5
    assert len({piece.split("\n")[0].split(":")[0].split(" ")[0] for context, _ in m.contexts
                for piece in context.split("\n\n") if piece[:1].isupper()}) >= 5
    texts = [context for context, _ in m.contexts] + [cal.story(0, 4096, tiny).contexts[0][0]]
    for shape in EVALUATION_SHAPES:
        assert not any(shape in t for t in texts), f"calibration text contains the evaluation phrasing {shape!r}"


def test_mixed_questions_vary_and_answer_from_text(tiny):
    """Each mixed context asks several question kinds, and every detail and order answer is in its context."""
    m = cal.mixed(0, 1024, tiny)
    for (context, questions), answers, kinds in zip(m.contexts, m.answers, m.kinds):
        assert len(questions) == 4 and len({k.split("/")[1] for k in kinds}) >= 3, kinds
        for q, a, k in zip(questions, answers, kinds):
            if k.endswith(("/detail", "/order")):
                assert a.lower() in context.lower(), f"{a!r} ({q}) not in its context"


def test_documents_reproduce_the_shipped_tables_calibration(tiny):
    """documents() encoded with its question format is, token for token, the calibration of the shipped
    SmolLM2 tables (real.qa_calibration_contexts of commit 94f65d7; its ids hashed here with the tiny
    tokenizer, the way that commit's code built them)."""
    fmt = cal.PROTOCOLS["documents"].question_format
    for (n, length, q, seed), digest in [((8, 1024, 8, 0), "b6aaf4d4c13dfd82"), ((3, 512, 4, 1), "e4ada84d735fedc5")]:
        ours = cal.documents(seed, length, tiny, n, q)
        encoded = [[tiny.encode_ordinary(c), [tiny.encode_ordinary(fmt.format(q=x)) for x in qs]]
                   for c, qs in ours.contexts]
        assert hashlib.sha256(json.dumps(encoded).encode()).hexdigest()[:16] == digest, (n, length, q, seed)


def test_file_round_trip(tmp_path, tiny):
    """write_calibration_file then read_calibration_file gives back contexts, questions, answers and kinds."""
    for c in (cal.story(0, 1024, tiny), cal.mixed(0, 1024, tiny, n_contexts=2), cal.documents(0, 512, tiny, 2)):
        path = str(tmp_path / f"{c.name}.jsonl")
        cal.write_calibration_file(path, c)
        back = cal.read_calibration_file(path)
        assert [(x, list(q)) for x, q in c.contexts] == back.contexts
        assert (c.answers, c.kinds) == (back.answers, back.kinds)
        assert not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("bad", ['not json at all', '{"context": "x"}', '{"context": "x", "questions": []}',
                                 '{"context": "x", "questions": [3]}', '["x", ["q"]]',
                                 '{"context": 1, "questions": ["q"]}',
                                 '{"context": "x", "questions": ["q"], "answers": ["a", "b"]}'])
def test_malformed_file_refused(bad, tmp_path):
    """A bad line (not JSON, no questions, empty list, not strings) is refused in one line naming the file and line."""
    path = tmp_path / "calib.jsonl"
    path.write_text('{"context": "A good line.", "questions": ["Why?"]}\n\n' + bad + "\n")
    with pytest.raises(ValueError) as e:
        cal.read_calibration_file(str(path))
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_protocol_settings():
    """The paper preset is the official run's (64 answer tokens at 0.7 as the future, 4:1 / 4:32, SnapKV 32
    max-pooled by 7); documents is this project's earlier one (16 greedy tokens after the question, 4:16)."""
    paper, docs = cal.PROTOCOLS["paper"], cal.PROTOCOLS["documents"]
    assert (paper.horizon, paper.temperature, paper.answer_only) == (64, 0.7, True)
    assert paper.protected["expected_attention"] == paper.protected["keydiff"] == (4, 1)
    assert (paper.protected["snapkv"], paper.snap_window, paper.snap_kernel, paper.snap_pool) == ((4, 32), 32, 7, "max")
    assert (docs.horizon, docs.temperature, docs.answer_only, docs.protected["snapkv"]) == (16, 0.0, False, (4, 16))
    assert "knorm" not in paper.protected  # the paper fixes no protected tokens for K-norm


@pytest.mark.parametrize("args", [["--protocol", "nope"], ["--length", "10"]])
def test_cli_refuses_bad_arguments(args):
    """The command line refuses an unknown protocol or a too-short length with one line and exit code 2."""
    run = subprocess.run([sys.executable, "-m", "experiments.calibration", *args], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_cli_writes_a_readable_file(tmp_path):
    """--out writes a file that read_calibration_file reads back as the maker's set."""
    out = str(tmp_path / "paper.jsonl")
    run = subprocess.run([sys.executable, "-m", "experiments.calibration", "--protocol", "paper", "--length", "1024",
                          "--out", out], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(cal.read_calibration_file(out).contexts[0][1]) >= 28
