"""Tests of tasks.py and train_tiny.py: the tokenizer, the task generators and suite, the trainer.

    python -m pytest -q tests/test_tasks.py
"""
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lukv
import tasks
from model import load_checkpoint, save_checkpoint
from test_lukv import tiny_model

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(HERE, "checkpoints", "tiny.tiktoken")


# -----------------------------------------------------------------------------
# tokenizer and tasks


@pytest.fixture(scope="module")
def enc():
    return tasks.load_tokenizer(TOKENIZER)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trip_on_any_text(enc, text):
    """Any unicode text, including bytes the BPE never saw, decodes back to itself."""
    assert enc.decode(enc.encode_ordinary(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100))
def test_tokenizer_round_trip_on_any_bytes(enc, data):
    """Arbitrary bytes survive encode -> decode_bytes (byte-level BPE has no unknown token)."""
    text = data.decode("utf-8", errors="surrogateescape")
    assert enc.decode_bytes(enc.encode_ordinary(text.encode("utf-8", "surrogateescape").decode("latin-1"))) \
        .decode("utf-8").encode("latin-1") == data


def test_task_anchors_are_single_tokens(enc):
    """Every key, value, name and coded word is one token: the anchors a tiny model copies."""
    words = tasks.NAMES + tasks.CITIES + tasks.KEYS + tasks.CWE_WORDS + tasks.CODED + tasks.VAR_NAMES
    numbers = [str(n) for n in range(100, 1000)]
    long = [w for w in words + numbers if len(enc.encode_ordinary(" " + w)) != 1]
    assert not long, f"multi-token anchors: {long[:10]}"


def test_bpe_training_is_deterministic_and_round_trips(tmp_path):
    """Training the BPE twice on the same text gives the same ranks, which tiktoken loads and round-trips."""
    text = tasks.tokenizer_corpus(seed=5, n_docs=8)[:20000]
    a, b = tasks.train_bpe(text, 400), tasks.train_bpe(text, 400)
    assert a == b and len(a) == 400
    tasks.save_ranks(a, tmp_path / "t.tiktoken")
    enc = tasks.load_tokenizer(tmp_path / "t.tiktoken")
    assert enc.decode(enc.encode_ordinary(text[:3000])) == text[:3000]


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_generators_are_deterministic_and_answers_recoverable(family, enc):
    """The same seed gives the same examples, and a rule-based reader recovers every answer from its context."""
    a = tasks.example_set(family, 3, 512, seed=7)
    assert a == tasks.example_set(family, 3, 512, seed=7)
    rng = random.Random(family)
    for length in (512, 1024, 4096):
        ex = tasks.make_example(family, rng, length, n_questions=5)
        n = len(enc.encode_ordinary(ex.context))
        assert 0.75 * length <= n <= 1.15 * length, f"{family}: asked {length} tokens, got {n}"
        for q, ans in ex.qa:
            got = tasks.solve(family, ex.context, q)
            assert tasks.exact_match(family, got, ans), f"{family}: {q!r} -> {got!r}, expected {ans!r}"


def test_every_qa_answer_is_the_only_word_after_its_prompt():
    """In a qa context, each answer prompt's words are followed by the answer and by no other word (one answer per question)."""
    rng = random.Random("unique")
    for _ in range(20):
        ex = tasks.make_example("qa", rng, 1024, 40)
        for q, ans in ex.qa:
            found = set(tasks.qa_answers(ex.context, q))  # both sentences of an event repeat "Tom bought a chair"
            assert found == {ans.strip()}, (q, found, ans)


def test_events_of_a_context_differ_in_verb_and_object():
    """No two events of a qa context share a verb or an object, and " near" comes only before event cities."""
    rng = random.Random("distinct")
    for _ in range(50):
        cast = tasks.make_cast(rng, rng.randint(4, 7))
        events = tasks.make_events(rng, cast, len(cast))
        assert len({e.verb for e in events}) == len({e.obj for e in events}) == len(events) == len(cast), events
        sentences, _ = tasks.prose_sentences(rng, 600, cast, events)
        near_sentences = [s for s in sentences if " near " in s]
        assert sorted(near_sentences) == sorted(tasks.event_sentences(e)[1] for e in events)


def test_more_events_than_verbs_raise():
    """Asking for more events than there are verbs raises a ValueError that names the limit."""
    cast = tasks.make_cast(random.Random(0), len(tasks.VERBS) + 2)
    with pytest.raises(ValueError, match=f"at most {len(tasks.VERBS)} events"):
        tasks.make_events(random.Random(0), cast, len(cast))


def test_every_qa_question_has_a_kind():
    """question_kind names every calibration question, and all seven kinds occur (the per-kind accuracy is complete)."""
    rng = random.Random("kinds")
    kinds = [tasks.question_kind(q) for _ in range(20) for q, _ in tasks.make_example("qa", rng, 512, 30).qa]
    assert "other" not in kinds and set(kinds) == set(tasks.QA_KINDS.values())


def test_unknown_family_and_short_length_are_refused():
    """Bad task requests name what is accepted."""
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.make_example("nope", random.Random(0), 512)
    with pytest.raises(ValueError, match="at least 64"):
        tasks.make_example("vt", random.Random(0), 10)


# -----------------------------------------------------------------------------
# trainer


def run_train(out, *extra):
    cmd = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--smoke", "--out", str(out), "--tokenizer", TOKENIZER,
           "--max-steps", "6", "--eval-every", "1000", *extra]
    subprocess.run(cmd, check=True, capture_output=True, cwd=HERE)


def test_training_resumes_exactly(tmp_path):
    """Six steps in one call and three + three steps in two calls give bit-identical weights."""
    run_train(tmp_path / "a")
    run_train(tmp_path / "b", "--chunk-steps", "3")
    assert not (tmp_path / "b" / "tiny.pt").exists()
    run_train(tmp_path / "b", "--chunk-steps", "3")
    a = torch.load(tmp_path / "a" / "resume.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "resume.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resuming"
    _, header = load_checkpoint(str(tmp_path / "b" / "tiny.pt"))
    meta = header["meta"]
    assert meta["steps"] == 6 and "train_tiny.py" in meta["command"]


def test_smoke_training_never_touches_the_shipped_files_and_refuses_another_configuration(tmp_path):
    """train_tiny.py --smoke, run as the README says, writes under runs/tiny and leaves checkpoints/ as it
    was; a tiny.pt of another configuration in --out is refused before any step, and left as it was."""
    shipped = {name: tasks.file_id(os.path.join(HERE, "checkpoints", name)) for name in ("tiny.pt", "tiny.tiktoken")}
    cmd = [sys.executable, os.path.join(HERE, "train_tiny.py"), "--smoke", "--tokenizer", TOKENIZER,
           "--max-steps", "1", "--eval-every", "1000"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(tmp_path))
    assert (tmp_path / "runs" / "tiny" / "tiny.pt").exists()
    assert shipped == {name: tasks.file_id(os.path.join(HERE, "checkpoints", name)) for name in shipped}
    other = tmp_path / "other"
    other.mkdir()
    save_checkpoint(str(other / "tiny.pt"), tiny_model(), TOKENIZER, {"command": "another run"})
    before = tasks.file_id(str(other / "tiny.pt"))
    run = subprocess.run(cmd + ["--out", str(other)], capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode != 0 and "another configuration" in run.stderr, run.stderr
    assert tasks.file_id(str(other / "tiny.pt")) == before


def test_tiny_suite_items_are_the_examples_as_token_ids(enc):
    """TinySuite's items are tasks.example_set's examples as token ids, their answer budget covers the
    reference, and an answer is read up to its first newline and scored by exact match."""
    suite = tasks.TinySuite(enc)
    items = suite.items("niah_multikey", 3, 512, 7)
    for item, ex in zip(items, tasks.example_set("niah_multikey", 3, 512, 7)):
        assert enc.decode(item.context) == ex.context and enc.decode(item.question) == ex.qa[0][0]
        assert item.max_new >= len(enc.encode_ordinary(ex.qa[0][1])) + 1
        assert suite.score(item, suite.answer(enc.encode_ordinary(ex.qa[0][1] + "\nmore"))) == 1.0
        assert suite.score(item, suite.answer(enc.encode_ordinary(" 0"))) == 0.0
    assert not suite.done(items[0])(enc.encode_ordinary(" 12\n"))  # the newline is a stop token, not a rule
