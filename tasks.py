"""
The tokenizer and a RULER-style synthetic long-context task suite, all generated here; beside them
the small tools the commands share (intervals, the budget heatmap, file ids, checked command lines).

Nothing is downloaded: a small byte-level BPE is trained on text this file generates and is
loaded into `tiktoken.Encoding` (GPT-2's split pattern, one <|endoftext|> special token); the
ranks are saved in tiktoken's rank-file format next to the checkpoint.

The text has two kinds of structure, so that heads specialise:
- local: sentences from a small grammar in which a noun decides its verb and its adjectives;
- long-range: each document has a cast of characters whose home, job and pet never change and
  are mentioned again later, plus events (who did what, where, when), each told in two short sentences.

Task families (each example is a context, a question and an answer, so that a context can be
compressed before the question is seen, the paper's query-agnostic setting):
  niah_single, niah_multikey, niah_multivalue, niah_multiquery  (needles in the prose)
  vt  (variable tracking: chains of VAR X = Y)
  cwe, fwe  (common- and frequent-words extraction, the aggregation families)
  qa  (questions about facts in the prose: the *calibration* family for offline profiling,
       kept apart from the evaluation families above)

    python tasks.py --show niah_multikey --length 1024   # print one example
    python tasks.py --train-tokenizer checkpoints/tiny.tiktoken
"""

import argparse
import base64
import hashlib
import math
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import regex
import tiktoken

# -----------------------------------------------------------------------------
# word pools (small on purpose: a tiny model learns single-token anchors quickly)

NAMES = ("Alice Bob Carol David Emma Frank Grace Henry Ivy Jack Kate Liam Mia Noah Olga Paul "
         "Quinn Rose Sam Tara Uma Victor Wendy Yara Zack Anna Ben Clara Dan Eva Finn Gina Hugo "
         "Iris Jon Lena Max Nora Otto Pia Ruth Saul Tom Vera Walt").split()
CITIES = ("Paris Rome Oslo Lima Cairo Delhi Tokyo Berlin Madrid Vienna Dublin Prague Athens "
          "Lisbon Warsaw Sofia Riga Quito Hanoi Seoul Milan Lyon Bonn Bern Porto Perth").split()
JOBS = "baker teacher doctor farmer pilot painter writer nurse singer tailor sailor miner judge cook clerk poet".split()
PETS = "cat dog horse parrot rabbit goat turtle owl mouse pony hamster lizard".split()
OBJECTS = "lamp book chair coat ring map cup rope kite drum bell hat vase clock knife sword mirror basket".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
VERBS = dict(pair.split("/") for pair in  # base form -> past tense
             "buy/bought find/found paint/painted sell/sold lose/lost fix/fixed carry/carried hide/hid clean/cleaned borrow/borrowed".split())

# the local grammar: each noun class has its own verbs and adjectives
GRAMMAR = {
    "animal": ("fox wolf bear deer hare crow swan frog".split(),
               "runs sleeps jumps hunts hides waits".split(),
               "quick sly brown wild small grey".split()),
    "water": ("river lake stream sea pond brook".split(),
              "flows shines rises glitters freezes".split(),
              "cold deep calm blue clear".split()),
    "plant": ("oak pine rose fern tree vine".split(),
              "grows blooms sways withers".split(),
              "green tall old young thin".split()),
    "weather": ("wind rain snow storm fog cloud".split(),
                "blows falls drifts passes fades".split(),
                "strong light heavy dark soft".split()),
}
PREPS = "over past beside under behind".split()  # not "near": events use it before their city
SCENERY = "hill field road wall house meadow valley gate".split()

KEYS = ("apple banana cherry grape lemon mango melon olive peach pear plum berry walnut "
        "almond pepper ginger garlic onion carrot potato tomato violet tulip daisy lily "
        "orchid cactus maple cedar willow bamboo copper silver golden iron marble crystal "
        "amber jade ruby pearl coral ivory velvet silk cotton linen wool leather paper "
        "glass stone brick candle lantern compass anchor arrow hammer ladder pillow blanket "
        "kettle spoon fork plate bowl bottle jar button needle thread wagon sled canoe "
        "violin piano guitar flute trumpet harp cello banjo tiger lion zebra panda koala "
        "camel eagle falcon raven sparrow dolphin whale shark salmon oyster lobster").split()
CWE_WORDS = ("able acid aged also area army away baby back ball band bank base bath bean beat "
             "belt bird blow blue boat body bone boot born boss both bowl bulk burn bush busy "
             "cake call calm camp card care cart case cash cast cell chat chip city club coal "
             "coat code cold cool copy core cost crew crop dark data date dawn deal dear debt "
             "deck deep desk dial diet disk dock door dose down draw drew drop drug dual duke "
             "dust duty earn east easy edge else even ever exit face fact fail fair fall farm "
             "fast fate fear feed feel file fill film fine fire firm fish five flag flat flow").split()
# pseudo-words (consonant-vowel-consonant) for variable names and coded words
_CONS, _VOWS = "bdfgklmnprstvz", "aeiou"
CODED = [c1 + v + c2 for c1 in _CONS for v in _VOWS for c2 in "kmnprstx"][::7]  # 140 words
VAR_NAMES = [w.upper() for w in CODED[::2]]  # 70 upper-case names

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# the tokenizer: byte-level BPE trained here, served by tiktoken


def train_bpe(text, vocab_size):
    """Byte-level BPE (minbpe's algorithm) on the GPT-2 pre-split; returns {token_bytes: rank}.

    Merges are learned on the table of distinct pre-split chunks weighted by their counts,
    which is exact and fast because generated text repeats the same few hundred words.
    """
    assert vocab_size > 256, f"vocab_size must exceed the 256 byte tokens, got {vocab_size}"
    chunks = Counter(regex.findall(GPT2_PATTERN, text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunks]
    counts = list(chunks.values())
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for word, count in zip(words, counts):
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every chunk is one token already
        # most frequent pair; ties go to the smaller byte string so training is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i:i + 2] = [merged]
                i += 1
    return ranks


def save_ranks(ranks, path):
    """Write tiktoken's rank-file format: one `base64(token) rank` line per token."""
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def load_tokenizer(path, expected_sha256=None):
    """Load a rank file into a tiktoken.Encoding; refuse one that does not match a checkpoint."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} not found; it ships next to the checkpoint "
                                f"(make one with: python tasks.py --train-tokenizer {path})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"tokenizer {path} has sha256 {digest[:12]}..., but the checkpoint was trained "
                         f"with {expected_sha256[:12]}...; use the .tiktoken file saved with that checkpoint")
    ranks = {}
    for line in data.decode().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding(name="lukv-tiny", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: len(ranks)})
    enc.sha256 = digest
    return enc


def tokenizer_corpus(seed=0, n_docs=300):
    """Text to train the BPE on: every family at a few lengths, plus each pool word many times."""
    rng = random.Random(seed)
    parts = []
    for i in range(n_docs):
        family = FAMILIES[i % len(FAMILIES)]
        ex = make_example(family, rng, n_tokens=rng.choice([256, 512]), n_questions=3)
        parts.append(ex.context + "".join(q + a + "\n" for q, a in ex.qa))
    pools = NAMES + CITIES + JOBS + PETS + OBJECTS + DAYS + list(VERBS) + list(VERBS.values()) + KEYS + CWE_WORDS + CODED + VAR_NAMES
    for g in GRAMMAR.values():
        pools += g[0] + g[1] + g[2]
    numbers = [str(n) for n in range(100, 1000)]
    parts.append(" ".join(pools * 30) + " " + " ".join(numbers * 30))
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# the prose: a cast of characters, events, and grammar sentences


@dataclass
class Character:
    name: str
    city: str
    job: str
    pet: str


@dataclass
class Event:
    name: str
    verb: str
    obj: str
    place: str  # a city
    day: str


def make_cast(rng, n):
    names = rng.sample(NAMES, n)
    return [Character(nm, rng.choice(CITIES), rng.choice(JOBS), rng.choice(PETS)) for nm in names]


def make_events(rng, cast, n):
    """n events (at most one per person) with distinct verbs and distinct objects, so that every
    question about them has exactly one answer and the words before each answer ("Tom bought a",
    "bought a chair on") are followed by one word only. With a verb shared by two events, stage 5c
    answered "Liam painted a" with the object of "Henry painted a map" (all 8 of its 25 "what" misses)."""
    n = min(n, len(cast))
    if n > min(len(VERBS), len(OBJECTS)):
        raise ValueError(f"at most {min(len(VERBS), len(OBJECTS))} events per context (one verb and one object "
                         f"each), got {n}; ask for fewer events or a smaller cast")
    names = rng.sample([c.name for c in cast], n)
    verbs = rng.sample(list(VERBS), n)
    objects = rng.sample(OBJECTS, n)
    return [Event(nm, vb, ob, rng.choice(CITIES), rng.choice(DAYS)) for nm, vb, ob in zip(names, verbs, objects)]


def fact_sentences(c):
    return [f"{c.name} lives in {c.city}.", f"{c.name} works as a {c.job}.", f"{c.name} has a {c.pet}."]


def mention_sentence(rng, c, cast):
    """A later mention that repeats a fixed attribute: predicting it needs a look far back."""
    other = rng.choice([o for o in cast if o is not c] or cast)
    return rng.choice([f"{c.name} the {c.job} met {other.name} in {c.city}.",
                       f"{c.name} walked the {c.pet} with {other.name}.",
                       f"In {c.city}, {c.name} spoke with {other.name} the {other.job}."])


def event_sentences(e):
    """An event told in two sentences, each ending on a word that a question asks for, right after
    the event's own object ("Tom bought a chair on" -> Monday, "... a chair near" -> Oslo): the form
    of the cast facts, which the model answers right. Told as "On Monday, Tom bought a chair in the
    bakery." (the first design), the day sat before the name and the place after "in the", and the
    model found them in only 10/29 and 3/32 questions (README, "Which questions fail"). The place
    follows "near", one token used nowhere else in the prose: after "in" (also "lives in", "met Bob
    in", "In Paris,") stage 5c copied another sentence's city in 10 of 18 "where" questions, while
    "on", which only events use, led to the right day in 21 of 21. After "at", two tokens (" ", "at")
    that put the object two tokens back, a fine-tune found the city in 11 of 47 (stage 6a)."""
    past = VERBS[e.verb]
    return [f"{e.name} {past} a {e.obj} on {e.day}.", f"{e.name} {past} a {e.obj} near {e.place}."]


def grammar_sentence(rng):
    """The local structure: the noun picks its verb and adjective from its own class."""
    nouns, verbs, adjs = GRAMMAR[rng.choice(list(GRAMMAR))]
    return f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} {rng.choice(PREPS)} the {rng.choice(SCENERY)}."


def prose_sentences(rng, n_words, cast=None, events=()):
    """About n_words of prose: facts first, mentions and events spread through, grammar between."""
    cast = cast or make_cast(rng, rng.randint(3, 6))
    out, words = [], 0
    pending = [s for c in cast for s in fact_sentences(c)] + [s for e in events for s in event_sentences(e)]
    rng.shuffle(pending)
    # place every pending fact/event in the first 90% so each is stated before being asked about
    while words < n_words:
        r = rng.random()
        if pending and (r < 0.25 or words > 0.9 * n_words):
            s = pending.pop()
        elif r < 0.5:
            s = mention_sentence(rng, rng.choice(cast), cast)
        else:
            s = grammar_sentence(rng)
        out.append(s)
        words += s.count(" ") + 1
    return out + pending, cast


def insert_at_random_depths(rng, sentences, inserts):
    """Insert sentences at random depths, keeping the order of `inserts`."""
    slots = sorted(rng.randrange(len(sentences) + 1) for _ in inserts)
    out = list(sentences)
    for offset, (slot, s) in enumerate(zip(slots, inserts)):
        out.insert(slot + offset, s)
    return out


# -----------------------------------------------------------------------------
# the task families

# words per BPE token with the shipped tokenizer (measured: prose 0.86, word lists 1.0), so that
# n_tokens asks for a context of about that many tokens
WORDS_PER_TOKEN = {"cwe": 1.0, "fwe": 1.0}
PROSE_WORDS_PER_TOKEN = 0.86


@dataclass
class Example:
    family: str
    context: str
    qa: list  # [(question, answer)]; evaluation uses the first, training may use several


def needle(k, v):
    return f"The special magic number for {k} is {v}."


def niah(rng, n_words, n_keys, n_values, n_questions, multiquery=False):
    keys = rng.sample(KEYS, n_keys)
    values = {k: rng.sample(range(100, 1000), n_values) for k in keys}
    needles = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    haystack, _ = prose_sentences(rng, n_words)
    context = " ".join(insert_at_random_depths(rng, haystack, [needle(k, v) for k, v in needles]))
    # values of one key are listed in the order they appear in the context
    order = {k: [v for kk, v in needles if kk == k] for k in keys}
    qa = []
    asked = rng.sample(keys, min(n_questions, n_keys)) if not multiquery else None
    if multiquery:
        for _ in range(n_questions):
            ks = rng.sample(keys, min(len(keys), rng.randint(2, 4)))
            q = f"\nQuestion: What are the special magic numbers for {' '.join(ks)}?\nAnswer:"
            qa.append((q, " " + " ;".join(f" {k} is {order[k][0]}" for k in ks).strip()))
    elif n_values == 1:
        for k in asked:
            qa.append((f"\nQuestion: What is the special magic number for {k}?\n"
                       f"Answer: The special magic number for {k} is", f" {order[k][0]}"))
    else:
        for k in asked:
            qa.append((f"\nQuestion: What are all the special magic numbers for {k}?\n"
                       f"Answer: The special magic numbers for {k} are", " " + " ".join(map(str, order[k]))))
    return context, qa


def make_niah_single(rng, n_words, n_questions):
    return niah(rng, n_words, 1, 1, 1)


def make_niah_multikey(rng, n_words, n_questions):
    return niah(rng, n_words, rng.randint(4, 8), 1, n_questions)


def make_niah_multivalue(rng, n_words, n_questions):
    return niah(rng, n_words, rng.randint(1, 2), 4, n_questions)


def make_niah_multiquery(rng, n_words, n_questions):
    return niah(rng, n_words, 4, 1, n_questions, multiquery=True)


def make_vt(rng, n_words, n_questions, n_chains=2, n_hops=3):
    """Variable tracking: VAR A = 123 then VAR B = A ...; which variables hold 123?"""
    names = rng.sample(VAR_NAMES, n_chains * (n_hops + 1))
    values = rng.sample(range(100, 1000), n_chains)
    chains = [names[i * (n_hops + 1):(i + 1) * (n_hops + 1)] for i in range(n_chains)]
    statements = []
    for chain, value in zip(chains, values):
        stmts = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
        statements.append(stmts)
    # interleave the chains, each kept in order
    merged = []
    while any(statements):
        s = rng.choice([s for s in statements if s])
        merged.append(s.pop(0))
    haystack, _ = prose_sentences(rng, n_words)
    context = " ".join(insert_at_random_depths(rng, haystack, merged))
    qa = []
    for i in rng.sample(range(n_chains), min(n_questions, n_chains)):
        qa.append((f"\nQuestion: Find all variables that are assigned the value {values[i]}.\n"
                   f"Answer: The variables are", " " + " ".join(chains[i])))
    return context, qa


def make_cwe(rng, n_words, n_questions, n_common=5):
    """Common words: n_common words appear n_each times each, every other word at most half that."""
    words = rng.sample(CWE_WORDS, len(CWE_WORDS))
    common, rare = words[:n_common], words[n_common:]
    n_each = max(4, n_words // 25)
    n_rare = max(0, n_words - n_common * n_each)
    # deal the rare words round-robin, so no rare word passes ceil(n_rare / len(rare)) <= n_each / 2
    seq = [w for w in common for _ in range(n_each)] + [rare[i % len(rare)] for i in range(n_rare)]
    rng.shuffle(seq)
    context = "Below is a list of words. " + " ".join(seq) + "."
    q = (f"\nQuestion: What are the {n_common} most common words in the list?\n"
         f"Answer: The most common words are")
    return context, [(q, " " + " ".join(sorted(common)))]


def make_fwe(rng, n_words, n_questions, alpha=2.0):
    """Frequent words: coded words drawn from a Zipf law; which three appear most often?"""
    vocab = rng.sample(CODED, 40)
    weights = [1.0 / (i + 1) ** alpha for i in range(len(vocab))]
    seq = rng.choices(vocab, weights=weights, k=n_words)
    ranked = Counter(seq).most_common()
    # keep examples whose top three are strictly ordered, so the answer is unique
    while len(ranked) < 4 or not (ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]):
        seq = rng.choices(vocab, weights=weights, k=n_words)
        ranked = Counter(seq).most_common()
    context = "Read the following coded text. " + " ".join(seq) + "."
    q = ("\nQuestion: What are the three most frequent coded words in the text?\n"
         "Answer: The three most frequent coded words are")
    return context, [(q, " " + " ".join(w for w, _ in ranked[:3]))]


def make_qa(rng, n_words, n_questions):
    """Calibration family: prose with events; who did what, where, when, and facts of the cast."""
    cast = make_cast(rng, rng.randint(4, 7))
    events = make_events(rng, cast, rng.randint(3, len(cast)))
    sentences, _ = prose_sentences(rng, n_words, cast, events)
    context = " ".join(sentences)
    questions = []
    for e in events:  # verb is the base form; VERBS[verb] its past tense
        past = VERBS[e.verb]
        questions += [
            (f"\nQuestion: What did {e.name} {e.verb} on {e.day}?\nAnswer: {e.name} {past} a", f" {e.obj}"),
            (f"\nQuestion: Who {past} a {e.obj} near {e.place}?\nAnswer:", f" {e.name}"),
            (f"\nQuestion: When did {e.name} {e.verb} the {e.obj}?\nAnswer: {e.name} {past} a {e.obj} on", f" {e.day}"),
            (f"\nQuestion: Where did {e.name} {e.verb} the {e.obj}?\nAnswer: {e.name} {past} a {e.obj} near", f" {e.place}"),
        ]
    for c in cast:
        questions += [
            (f"\nQuestion: Where does {c.name} live?\nAnswer: {c.name} lives in", f" {c.city}"),
            (f"\nQuestion: What is the job of {c.name}?\nAnswer: {c.name} works as a", f" {c.job}"),
            (f"\nQuestion: Which pet does {c.name} have?\nAnswer: {c.name} has a", f" {c.pet}"),
        ]
    rng.shuffle(questions)
    return context, questions[:n_questions]


QA_KINDS = {"Who": "event: who", "What did": "event: what", "When": "event: when", "Where did": "event: where",
            "Where does": "cast: city", "What is": "cast: job", "Which pet": "cast: pet"}


def question_kind(question):
    """The kind of a qa question ("event: where", "cast: pet", ...): accuracy per kind shows what a model lacks."""
    words = question.split("Question: ")[1].split()
    return QA_KINDS.get(" ".join(words[:2]), QA_KINDS.get(words[0], "other"))


GENERATORS = {
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "vt": make_vt,
    "cwe": make_cwe,
    "fwe": make_fwe,
    "qa": make_qa,
}
FAMILIES = list(GENERATORS)
EVAL_FAMILIES = [f for f in FAMILIES if f != "qa"]  # qa is the calibration source
SET_FAMILIES = {"niah_multivalue", "cwe"}  # answers whose order does not matter


def make_example(family, rng, n_tokens, n_questions=1):
    """One example whose context is about n_tokens long (exact length depends on the BPE)."""
    if family not in GENERATORS:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    if n_tokens < 64:
        raise ValueError(f"n_tokens must be at least 64 for a context with a haystack, got {n_tokens}")
    context, qa = GENERATORS[family](rng, int(n_tokens * WORDS_PER_TOKEN.get(family, PROSE_WORDS_PER_TOKEN)),
                                     n_questions)
    return Example(family, context, qa)


def example_set(family, n, n_tokens, seed):
    """n deterministic evaluation examples (one question each) of one family."""
    rng = random.Random(f"{family}-{n_tokens}-{seed}")
    return [make_example(family, rng, n_tokens) for _ in range(n)]


def qa_answers(context, question):
    """Every word that the qa reading rule finds for a question, in context order (one, in a well-made context).

    The answer prompt's words start the sentence that holds the answer ("Tom bought a chair near" ->
    the next word); the "who" prompt is empty, and the answer starts the sentence that ends with the event.
    """
    sentences = context.replace("? ", ". ").rstrip(".").split(". ")
    prefix = question.split("Answer:")[1].strip()
    if prefix == "":  # who did it: the name that starts the event's "... near <city>" sentence
        event = regex.findall(r"Who (.+)\?", question)[0]
        return [s.split()[0] for s in sentences if s.endswith(" " + event)]
    return [s[len(prefix):].split()[0] for s in sentences if s.startswith(prefix + " ")]


def solve(family, context, question):
    """A rule-based reader that answers from the context alone: proof that every answer is there."""
    if family.startswith("niah"):
        keys = regex.findall(r"for ((?:\w+ ?)+)\?", question)[0].split()
        values = {k: [int(v) for v in regex.findall(rf"magic number for {k} is (\d+)", context)] for k in keys}
        if family == "niah_multiquery":
            return " " + " ;".join(f" {k} is {values[k][0]}" for k in keys).strip()
        return " " + " ".join(str(v) for v in values[keys[0]])
    if family == "vt":
        value = regex.findall(r"value (\d+)", question)[0]
        names = regex.findall(rf"VAR (\w+) = {value}\b", context)
        while True:  # follow the chain VAR B = A
            nxt = regex.findall(rf"VAR (\w+) = {names[-1]}\b", context)
            if not nxt:
                return " " + " ".join(names)
            names.append(nxt[0])
    if family in ("cwe", "fwe"):
        words = context.split(". ", 1)[1].rstrip(".").split()
        n = 5 if family == "cwe" else 3
        top = [w for w, _ in Counter(words).most_common(n)]
        return " " + " ".join(sorted(top) if family == "cwe" else top)
    if family == "qa":
        return " " + qa_answers(context, question)[0]
    raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")


def exact_match(family, prediction, answer):
    """Exact match of the generated answer; order-free for the set-valued families."""
    pred, ans = prediction.strip().rstrip("."), answer.strip()
    if family in SET_FAMILIES:
        return sorted(pred.split()) == sorted(ans.split())
    return pred == ans


# -----------------------------------------------------------------------------
# a suite: what lukv.run_example and the experiments need of a set of tasks


@dataclass
class Item:
    """One example as token ids: the context a query-agnostic method compresses, then the question."""
    family: str
    index: int
    context: list  # token ids compressed before the question is seen
    question: list  # token ids fed after it (the question, and any answer prefix)
    references: list  # the strings a right answer holds
    max_new: int  # answer tokens generated at most
    kind: str = ""  # a finer label (qa's question kind), for the full-cache breakdown


class Suite(Protocol):
    """The interface of a task suite (TinySuite here; experiments/ruler.py's RulerSuite for real models)."""
    families: list  # the family names items() accepts
    stop_ids: set  # token ids that end an answer (excluded from it)

    def items(self, family: str, n: int, length: int, seed: int) -> list:
        """n Items of one family, contexts of about `length` tokens; the same arguments give the same items."""

    def done(self, item: Item) -> Callable[[list], bool]:
        """A rule that ends an answer early by its ids so far (a newline rule); lambda ids: False if none."""

    def answer(self, ids: list) -> str:
        """The text of an answer's ids, as score() reads it."""

    def score(self, item: Item, answer: str) -> float:
        """The answer's score in [0, 1]."""


class TinySuite:
    """This file's families for the shipped tiny model: answers end at the first newline, exact match."""

    families = EVAL_FAMILIES + ["qa"]

    def __init__(self, enc):
        self.enc = enc
        self.stop_ids = {enc.encode_ordinary("\n")[0]}

    def items(self, family, n, length, seed):
        out = []
        for i, ex in enumerate(example_set(family, n, length, seed)):
            q, a = ex.qa[0]
            out.append(Item(family, i, self.enc.encode_ordinary(ex.context), self.enc.encode_ordinary(q), [a],
                            len(self.enc.encode_ordinary(a)) + 2, question_kind(q) if family == "qa" else ""))
        return out

    def done(self, item):
        return lambda ids: False  # the newline is a stop token

    def answer(self, ids):
        return self.enc.decode(ids).split("\n")[0]  # a merged token may carry the newline inside it

    def score(self, item, answer):
        return float(exact_match(item.family, answer, item.references[0]))

    def calibration(self, n_contexts, n_questions, length, seed=0):
        """[(context ids, [question ids, ...])] for lukv.profile: qa prose with n_questions questions each, from
        seeds calibration-N (the evaluation never draws them)."""
        rng = random.Random(f"calibration-{seed}")
        examples = [make_example("qa", rng, length, n_questions) for _ in range(n_contexts)]
        return [(self.enc.encode_ordinary(ex.context), [self.enc.encode_ordinary(q) for q, _ in ex.qa])
                for ex in examples]


# -----------------------------------------------------------------------------
# reporting: a mean with its 95% interval, a budget heatmap


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


def heatmap(keep_frac, title):
    """A layer x head heatmap of keep fractions drawn with block characters (darker = keeps more)."""
    shades = " ░▒▓█"
    L, H = keep_frac.shape
    lines = [title, "        " + "".join(f"h{h:<3d}" for h in range(H)) + "   keep % per KV head"]
    for l in range(L):
        cells = "".join(shades[min(4, int(f * 5))] * 3 + " " for f in keep_frac[l])
        lines.append(f"layer {l:2d} {cells}  " + " ".join(f"{100 * f:3.0f}" for f in keep_frac[l]))
    lines.append("        scale: ' ' <20%  ░ <40%  ▒ <60%  ▓ <80%  █ >=80%")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command lines: every argument checked before any work, a bad one refused in one line (exit code 2)

ROOT = os.path.dirname(os.path.abspath(__file__))


def progress(done, total, text):
    """A progress line: redrawn in place on a terminal; every 10% and at the end in a log file."""
    if sys.stdout.isatty():
        print(f"\r{text}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(text, flush=True)


def file_id(path):
    """A short id of a file: the sha256 of its bytes (a profile names the model file it belongs to)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def profile_path(checkpoint, scorer):
    """Where the profile of a checkpoint and scorer lives: beside it, named by both (checkpoints/tiny_snapkv.npy)."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{stem}_{scorer}.npy")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line (`prog: error: what was expected`), exit code 2, and which
    takes flags by their full names only (--smo is refused, not read as a --smoke that no code then sees)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def is_shipped(path):
    """Whether path is a file the repository ships (tracked by git), which no command overwrites unasked."""
    path = os.path.abspath(path)
    if not os.path.exists(path) or not path.startswith(ROOT + os.sep):
        return False
    try:
        return subprocess.run(["git", "ls-files", "--error-unmatch", os.path.relpath(path, ROOT)], cwd=ROOT,
                              capture_output=True).returncode == 0
    except OSError:  # no git: everything under checkpoints/ and results/ ships
        return os.path.relpath(path, ROOT).split(os.sep)[0] in ("checkpoints", "results")


def check_output(parser, path, suffix, overwrite=False):
    """Refuse an output path before any work: wrong kind of file, a folder that does not exist or cannot be
    written, or a file the repository ships (unless --overwrite names it)."""
    if not path.endswith(suffix):
        parser.error(f"{path}: expected a {suffix} file")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a real write: a read-only folder fails here, not at the end
    except OSError as e:
        parser.error(f"cannot write into the folder of {path} ({e.strerror}); give another path")
    if os.path.isdir(path):
        parser.error(f"{path} is a folder; expected a {suffix} file")
    if is_shipped(path) and not overwrite:
        parser.error(f"{path} is a file the repository ships; pass --overwrite to replace it, or write elsewhere")


def check_range(parser, name, value, low, high=None):
    """Refuse an integer argument outside [low, high] with one line."""
    if value < low or (high is not None and value > high):
        parser.error(f"{name} must be {f'between {low} and {high}' if high is not None else f'at least {low}'}, "
                     f"got {value}")


def check_names(parser, flag, names, known):
    """The comma list of a flag, each name one of `known`, else refused naming the known ones."""
    bad = [n for n in names if n not in known]
    if bad or not names:
        parser.error(f"{flag}: unknown {bad or 'empty list'}; expected a comma list of {', '.join(known)}")
    return names


# -----------------------------------------------------------------------------

def parse(argv=None):
    """(parser, args), every argument checked before any work."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--show", choices=FAMILIES, help="print one example of this family")
    parser.add_argument("--length", type=int, default=1024, help="context length in tokens (approximate, >= 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-tokenizer", metavar="PATH", help="train the BPE and write its rank file here")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. the 256 bytes (>= 257)")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing the shipped tokenizer")
    args = parser.parse_args(argv)
    if not (args.show or args.train_tokenizer):
        parser.error("say what to do: --show FAMILY or --train-tokenizer PATH")
    check_range(parser, "--length", args.length, 64)
    check_range(parser, "--vocab-size", args.vocab_size, 257)
    if args.train_tokenizer:
        check_output(parser, args.train_tokenizer, ".tiktoken", args.overwrite)
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    if args.train_tokenizer:
        ranks = train_bpe(tokenizer_corpus(args.seed), args.vocab_size)
        save_ranks(ranks, args.train_tokenizer)
        enc = load_tokenizer(args.train_tokenizer)
        print(f"wrote {len(ranks)} ranks to {args.train_tokenizer} (sha256 {enc.sha256[:12]})")
    if args.show:
        ex = make_example(args.show, random.Random(args.seed), args.length)
        print(ex.context, ex.qa[0][0], "|", ex.qa[0][1])
