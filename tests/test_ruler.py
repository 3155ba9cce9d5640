"""
Tests of experiments/ruler.py: determinism, the length bound in the model's own tokens (both prompt formats),
a rule-based solver that finds every reference in the context alone, RULER's scoring on
hand-worked answers, and bad input. Tokenizers: the shipped tiny.tiktoken and a small byte-level
BPE with ChatML tokens built here (the chat format); test_hf.py checks SmolLM2's own tokenizer too.

    python -m pytest -q tests/test_ruler.py
"""

import re
from collections import Counter

import pytest

import tasks
from experiments import ruler

LENGTHS = [1024, 2048]
SLACK = 64  # tokens a prompt may fall short of its length: about one haystack unit (a noise line, a document)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' "
          "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tiny):
    """A byte-level BPE of 2000 tokens trained on this suite's own prompts, with ChatML's special tokens and
    template, as an hf.HFTokenizer (what a real chat model's tokenizer is here)."""
    tokenizers = pytest.importorskip("tokenizers", reason="pip install -r requirements-hf.txt")
    from experiments import hf
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    corpus = []
    for family in ruler.FAMILIES:
        ex = ruler.make_example(family, tiny, 1024, seed=99)
        corpus.append("".join(u + r for u, r in ex.shots) + ex.context + ex.question + ex.answer_prefix)
    tok.train_from_iterator(corpus, trainer)
    return hf.HFTokenizer(tokenizer=tok, sha256="test", chat_template=CHATML, eos_token="<|im_end|>")


# -----------------------------------------------------------------------------
# a solver: every reference can be read from the context and question alone


def solve(example):
    """The references, found by rules in the example's text: proof that every answer is in the context."""
    family, context, question = example.family, example.context, example.question
    if family.startswith("niah"):
        query = re.search(r"for (.+) mentioned in the provided text\?", question).group(1)
        keys = re.split(r", and |, ", query)
        return [v for k in keys for v in re.findall(rf"One of the special magic numbers for {re.escape(k)} is: "
                                                    r"(\d+)\.", context)]
    if family == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", question).group(1)
        names = re.findall(rf"VAR (\w+) = {value}\b", context)
        while nxt := re.findall(rf"VAR (\w+) = VAR {names[-1]}\b", context):
            names += nxt
        return names
    if family == "cwe":
        counts = Counter(re.findall(r"\d+\. (\S+)", context)).most_common()
        assert counts[9][1] > counts[10][1], "the 10 most common words must be unambiguous"
        return [w for w, _ in counts[:10]]
    if family == "fwe":
        counts = Counter(context.split("coded words. ", 1)[1].split()).most_common()
        assert counts[0][0] == "..." and counts[1][1] > counts[2][1] > counts[3][1] > counts[4][1]
        return [w for w, _ in counts[1:4]]
    name = re.search(r"(?:does|of|did) ([A-Z]\w+ [A-Z]\w+)", question).group(1)
    rules = {"live": rf"{name} lives in (\w+)\.", "job": rf"{name} works as a (\w+)\.",
             "pet": rf"{name} has a (\w+)\."}
    kind = next((k for k in rules if k in question), None)
    if kind is None:  # What did NAME VERB on DAY?
        verb, day = re.search(rf"{name} (\w+) on (\w+)\?", question).groups()
        rules[kind] = rf"On {day}, {name} {tasks.VERBS[verb]} a (\w+)\."
    found = re.findall(rules[kind], context)
    assert len(found) == 1, f"the fact about {name} must be stated once, found {found}"
    return found


@pytest.mark.parametrize("family", ruler.FAMILIES)
def test_every_reference_is_in_the_context(tiny, family):
    """A rule-based reader recovers every reference from the context and question (as a set: order is free)."""
    for index in range(3):
        ex = ruler.make_example(family, tiny, 1024, seed=1, index=index)
        assert sorted(solve(ex)) == sorted(ex.references), (family, index)


# -----------------------------------------------------------------------------
# the length bound and determinism


@pytest.mark.parametrize("family", ruler.FAMILIES)
def test_prompts_fit_their_length_and_come_close(tiny, chat_tokenizer, family):
    """The whole prompt, template included, takes at most `length` tokens and at least length - SLACK, in the plain
    format (tiny tokenizer) and both formats of a chat tokenizer; n_tokens counts it, context + question."""
    for enc, fmt in [(tiny, "plain"), (chat_tokenizer, "plain"), (chat_tokenizer, "chat")]:
        for length in LENGTHS:
            ex = ruler.make_example(family, enc, length, seed=0, index=0, fmt=fmt)
            context, question = ruler.prompt_parts(ex, enc)
            assert len(context) + len(question) == ex.n_tokens == len(ruler.prompt_ids(ex, enc))
            assert length - SLACK <= ex.n_tokens <= length, (family, fmt, length, ex.n_tokens)


@pytest.mark.parametrize("family", ruler.FAMILIES)
def test_examples_are_deterministic_and_formats_share_answers(tiny, chat_tokenizer, family):
    """The same (family, seed, index, length) gives the same example; another index another one; the plain and
    chat examples of one index ask for the same answers."""
    a, b = (ruler.make_example(family, tiny, 1024, seed=3, index=5) for _ in range(2))
    assert a == b
    assert ruler.make_example(family, tiny, 1024, seed=3, index=6).references != a.references
    plain, chat = (ruler.make_example(family, chat_tokenizer, 1024, 3, 5, fmt) for fmt in ruler.FORMATS)
    assert plain.references == chat.references and plain.question == chat.question


def test_prompt_formats(chat_tokenizer):
    """plain = shots + context + question + answer prefix as text; chat = the template's turns with the answer
    primed: the assistant turn opens with the answer prefix (its leading space dropped), cwe's shot a turn before."""
    enc = chat_tokenizer
    ex = ruler.make_example("niah_single", enc, 1024, fmt="plain")
    assert enc.decode(ruler.prompt_ids(ex, enc)) == ex.context + ex.question + ex.answer_prefix
    assert ex.answer_prefix == f" The special magic number for {ex.question.split(' for ')[1].split(' ')[0]} " \
                               f"mentioned in the provided text is"  # RULER's singular wording
    chat = enc.decode(ruler.prompt_ids(ruler.make_example("niah_single", enc, 1024, fmt="chat"), enc))
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(
        "<|im_end|>\n<|im_start|>assistant\n" + ex.answer_prefix.lstrip())
    cwe = ruler.make_example("cwe", enc, 1024, fmt="chat")
    text = enc.decode(ruler.prompt_ids(cwe, enc))
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2
    assert "Answer: The top 10 words that appear most often in the list are: 1. " in text
    context, question = ruler.prompt_parts(cwe, enc)
    assert enc.decode(context).endswith(cwe.context) and enc.decode(question).startswith(cwe.question)


# -----------------------------------------------------------------------------
# scoring (RULER's string_match_all / string_match_part) and generation rules


@pytest.mark.parametrize("family, prediction, references, expected", [
    ("niah_single", " 548.<|im_end|>", ["548"], 1.0),  # trailing punctuation and the end-of-turn text
    ("niah_single", " 5480", ["548"], 1.0),  # a substring counts, as in RULER
    ("niah_single", "I don't know", ["548"], 0.0),
    ("niah_multivalue", "1234567, 7654321, and 1111111.", ["1234567", "7654321", "1111111", "2222222"], 0.75),
    ("vt", "the variables are abcde, FGHIJ\x00", ["ABCDE", "FGHIJ", "KLMNO"], 2 / 3),  # case, control characters
    ("cwe", "1. olive 2. zack", ["olive", "zack", "snow", "wild"], 0.5),
    ("fwe", "", ["tsdnvq", "khtook", "nufhng"], 0.0),
    ("qa", " Paris or Rome", ["Rome", "Oslo"], 1.0),  # part: any one reference is a hit
    ("qa", " Lima", ["Rome", "Oslo"], 0.0),
])
def test_score_known_answers(family, prediction, references, expected):
    """Hand-worked RULER scores: 3 of 4 values found = 0.75; 2 of 3 variables regardless of case = 2/3; qa takes
    the best reference (string_match_part)."""
    assert ruler.score(family, prediction, references) == pytest.approx(expected)


def test_stopping_rules(tiny, chat_tokenizer):
    """A newline ends an answer of one reference once its first letter or digit is out (answers of several may list
    them one per line); the stop tokens are the end-of-turn ids; the generation budgets are RULER's."""
    assert not ruler.answer_done("niah_single", "\n 548")
    assert not ruler.answer_done("qa", ":\n")  # the answer has not started yet
    assert ruler.answer_done("niah_single", "\n 548.\nAlso") and ruler.answer_done("qa", ": Oslo\n")
    assert not ruler.answer_done("niah_multivalue", ":\n\n* 4093680\n* 1234567")  # several answers, one per line
    assert not ruler.answer_done("cwe", " 1. olive\n2. zack")
    assert ruler.stop_ids(tiny) == [tiny.eot_token]
    assert ruler.stop_ids(chat_tokenizer) == [chat_tokenizer.token_id("<|im_end|>")]
    assert all(ruler.make_example(f, tiny, 1024).max_new_tokens == n for f, n in ruler.MAX_NEW_TOKENS.items())


# -----------------------------------------------------------------------------
# bad input


def test_bad_input_says_what_is_expected(tiny):
    """An unknown family or format, a length too small for the template, the chat format without a chat template,
    and scoring without references each raise a ValueError that says what to do."""
    with pytest.raises(ValueError, match="unknown task family 'niah'; expected one of"):
        ruler.make_example("niah", tiny, 1024)
    with pytest.raises(ValueError, match="unknown prompt format 'xml'"):
        ruler.make_example("vt", tiny, 1024, fmt="xml")
    with pytest.raises(ValueError, match=r"length 100 is too small for vt: .* ask for at least \d+"):
        ruler.make_example("vt", tiny, 100)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        ruler.make_example("qa", tiny, 1024, fmt="chat")
    with pytest.raises(ValueError, match="unknown task family"):
        ruler.score("passkey", "1", ["1"])
    with pytest.raises(ValueError, match="at least one reference"):
        ruler.score("qa", "1", [])
