"""
A RULER-style long-context suite for real models: RULER's task families, prompt templates, answer
prefixes, generation budgets and scoring (Hsieh et al. 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?", github.com/NVIDIA/RULER), every prompt cut to a length in
the model's own tokens.

Families: niah_single (RULER's niah_single_1: repeated noise), niah_multikey, niah_multivalue,
niah_multiquery (essay-like prose haystacks), vt (variable tracking, with RULER's one-shot
example), cwe (common words, with its one-shot example), fwe (frequent coded words) and qa.
RULER's qa reads SQuAD / HotpotQA paragraphs, which cannot be downloaded here: our qa generates
short documents about people (city, job, pet, one event) from tasks.py's word pools, with RULER's
qa template, and asks about one of them. The essay haystack is tasks.py's generated prose, not
Paul Graham's essays. Our own code throughout; RULER's text (templates, needles, noise) is kept
word for word, its typo "assgined" included, so that prompts read as RULER's do.

Strings and token ids in, strings out: a tokenizer with encode_ordinary / decode (tiktoken's
Encoding, hf.HFTokenizer) is passed in; the chat format also needs render_chat / encode
(hf.HFTokenizer). This file imports no other module of the project but tasks (word pools, prose).

    python -m experiments.ruler --show niah_single --length 512   # one example, the shipped tiny tokenizer
    python -m experiments.evaluate --full-cache --model smollm2 --n 5 --seed 0   # full-cache scores per family
"""

import functools
import os
import random
import re
import string
from dataclasses import dataclass, field

import tasks

# -----------------------------------------------------------------------------
# RULER's constants: noise, needles, generation budgets

FAMILIES = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa"]
FORMATS = ["plain", "chat"]
# RULER's tokens_to_generate per task
MAX_NEW_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                  "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
# stop at the first newline once the answer has started (after its first letter or digit), for the families
# of one answer: asked for several, SmolLM2's chat answers list them one per line ("* 4093680\n* ...")
STOP_AT_NEWLINE = {f: f in ("niah_single", "niah_multikey", "qa") for f in FAMILIES}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 needle depths, percent of the haystack

# key words as RULER's adjective-noun pairs ("quick-banana"), from tasks.py's pools
ADJECTIVES = sorted({a for _, _, adjs in tasks.GRAMMAR.values() for a in adjs})
KEY_WORDS = [f"{a}-{n}" for a in ADJECTIVES for n in tasks.KEYS]
SURNAMES = ("Moreno Fischer Novak Silva Tanaka Okafor Larsen Rossi Dubois Kowalski Haddad Ivanova Costa "
            "Brennan Lindqvist Mendes Sato Keller Varga Nakamura Duarte Hughes Petrov Abara Quinlan Berger "
            "Ortega Walsh Horvat Sousa").split()


def _real_words():
    pools = tasks.NAMES + tasks.CITIES + tasks.JOBS + tasks.PETS + tasks.OBJECTS + tasks.DAYS + tasks.KEYS + \
        tasks.CWE_WORDS + list(tasks.VERBS) + tasks.PREPS + tasks.SCENERY
    return sorted({w.lower() for w in pools + [w for g in tasks.GRAMMAR.values() for part in g for w in part]})


REAL_WORDS = _real_words()  # 417 distinct English words


def pseudo_words(n):
    """n pronounceable pseudo-words ("bab", "babal", ...) for word lists longer than REAL_WORDS."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words = (c1 + v1 + c2 + v2 + c3 for c1 in consonants for v1 in vowels for c2 in consonants
             for v2 in vowels for c3 in "lmnrst")
    return [next(words) for _ in range(n)]


@dataclass
class Example:
    """One prompt: the model reads shots + context, then question + answer_prefix, and should write references.

    context is what a query-agnostic method may compress before the question arrives (instructions
    and haystack); shots are earlier (user, assistant) turns (cwe's one-shot example), part of the
    context too. The prompt of `fmt`, template included, takes n_tokens <= length tokens.
    """
    family: str
    seed: int
    index: int
    length: int
    fmt: str
    context: str
    question: str
    answer_prefix: str
    references: list
    shots: list = field(default_factory=list)
    n_tokens: int = 0
    max_new_tokens: int = 0


# -----------------------------------------------------------------------------
# the families: each builds its texts from n haystack units (sentences, noise lines, words, documents)


def insert_at_depths(units, inserts, depths):
    """Insert each of inserts before unit int(len(units) * depth / 100), keeping the order of inserts."""
    out = list(units)
    for offset, (pos, s) in enumerate(sorted(((len(units) * d // 100, i) for i, d in enumerate(depths)))):
        out.insert(pos + offset, inserts[s])
    return out


def essay_sentences(seed, n):
    """The first n sentences of a long essay-like prose stream (tasks.py's generator), the same for every n."""
    rng, out = random.Random(f"{seed}/essay"), []
    while len(out) < n:
        out += tasks.prose_sentences(rng, 400)[0]
    return out[:n]


def niah(seed, n, n_keys, n_values, n_queries, haystack):
    """RULER's needle family: needles "One of the special magic numbers for KEY is: VALUE." in a haystack."""
    rng = random.Random(f"{seed}/needles")
    keys = rng.sample(KEY_WORDS, n_keys)
    values = {k: [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in range(n_values)] for k in keys}
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
    rng.shuffle(needles)
    depths = rng.sample(DEPTHS, len(needles))
    queries = rng.sample(keys, n_queries)
    if haystack == "repeat":
        context = "\n".join(insert_at_depths([NOISE] * n, needles, depths))
    else:
        context = " ".join(insert_at_depths(essay_sentences(seed, n), needles, depths))
    query = queries[0] if n_queries == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if n_values * n_queries == 1:  # RULER's singular wording
        intro = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the number afterwards.\n")
        question = f"\nWhat is the special magic number for {query} mentioned in the provided text?"
        prefix = f" The special magic number for {query} mentioned in the provided text is"
    else:
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f" The special magic numbers for {query} mentioned in the provided text are"
    return intro + context, question, prefix, [v for k in queries for v in values[k]], []


def vt_texts(seed, n, n_hops=4):
    """(context, question, answer prefix, variables) of one variable-tracking chain in n noise lines."""
    rng = random.Random(f"{seed}/chain")
    names = set()
    while len(names) < n_hops + 1:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = rng.sample(sorted(names), n_hops + 1)
    value = rng.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    depths = sorted(rng.sample(range(101), len(chain)))
    context = " ".join(insert_at_depths([NOISE + "\n"] * n, chain, depths)).replace(". \n", ".\n")
    context = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" + context
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {n_hops + 1} "
              f"variables are assgined the value {value}, they are:")
    return context, question, prefix, names


def vt(seed, n):
    """RULER's variable tracking (1 chain, 4 hops) after its one-shot example (RULER sizes it to 500 tokens;
    ours has 5 noise lines, so that short prompts fit)."""
    shot_context, shot_question, shot_prefix, shot_answer = vt_texts(f"{seed}/shot", 5)
    shot = shot_context + shot_question + shot_prefix + " " + " ".join(shot_answer) + "\n\n"
    context, question, prefix, names = vt_texts(seed, n)
    return shot + context, question, prefix, names, []


def cwe_texts(rng, words, n_common, common_repeats, rare_repeats):
    """A numbered word list: the first n_common words repeated common_repeats times, the rest rare_repeats."""
    common = words[:n_common]
    listed = common * common_repeats + words[n_common:] * rare_repeats
    rng.shuffle(listed)
    context = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)))
    return context, "\nQuestion: What are the 10 most common words in the above list?", \
        " Answer: The top 10 words that appear most often in the list are:", common


def cwe(seed, n, long_context):
    """RULER's common words (10 common words, n rare ones): 30 vs 3 repeats from 4096 tokens on, 6 vs 1 below,
    after a one-shot example (a previous turn of 20 or 40 words). The shot's and the common words do not
    depend on n; rare words run on into pseudo-words when the 417 real ones are used up."""
    rng = random.Random(f"{seed}/words")
    real = rng.sample(REAL_WORDS, len(REAL_WORDS))
    shot_words, common, rare = real[:40], real[40:50], (real[50:] + pseudo_words(max(0, n + 50 - len(real))))[:n]
    shot_repeats, repeats = ((10, 3), (30, 3)) if long_context else ((3, 1), (6, 1))
    shot_context, shot_question, shot_prefix, shot_answer = cwe_texts(rng, shot_words[:40 if long_context else 20],
                                                                      10, *shot_repeats)
    shot_reply = shot_prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
    context, question, prefix, _ = cwe_texts(rng, common + rare, 10, *repeats)
    return context, question, prefix, common, [(shot_context + shot_question, shot_reply)]


@functools.lru_cache
def zeta_function(alpha):
    """Riemann's zeta(alpha) = sum of k^-alpha (RULER takes scipy's), to 1e-6 for alpha 2."""
    return sum(k ** -alpha for k in range(1, 10 ** 6))


def fwe(seed, n, length, alpha=2.0):
    """RULER's frequent words: n coded words of 6 letters, the k-th most frequent int(n k^-alpha / zeta(alpha))
    times; the most frequent is the noise "...", and the next three are the answer."""
    rng = random.Random(f"{seed}/coded")
    vocab = set()
    while len(vocab) < max(8, length // 50):  # RULER's vocabulary: a word per 50 tokens
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = rng.sample(sorted(vocab), len(vocab))
    vocab[0] = "..."
    zeta = zeta_function(alpha)
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -alpha / zeta))]
    rng.shuffle(words)
    context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
               "frequently appeared coded words. " + " ".join(words))
    question = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return context, question, prefix, vocab[1:4], []


def person_document(rng, name):
    """A short document about one person: three facts and an event, among grammar sentences, shuffled."""
    city, job, pet = rng.choice(tasks.CITIES), rng.choice(tasks.JOBS), rng.choice(tasks.PETS)
    verb, obj, day = rng.choice(list(tasks.VERBS)), rng.choice(tasks.OBJECTS), rng.choice(tasks.DAYS)
    sentences = [f"{name} lives in {city}.", f"{name} works as a {job}.", f"{name} has a {pet}.",
                 f"On {day}, {name} {tasks.VERBS[verb]} a {obj}."]
    sentences += [tasks.grammar_sentence(rng) for _ in range(rng.randint(1, 3))]
    rng.shuffle(sentences)
    questions = [(f"Where does {name} live?", city), (f"What is the job of {name}?", job),
                 (f"Which pet does {name} have?", pet), (f"What did {name} {verb} on {day}?", obj)]
    return " ".join(sentences), questions


def qa(seed, n):
    """Our qa (RULER reads SQuAD / HotpotQA): n generated documents about different people, one question
    about one of them, with RULER's qa template; the gold document sits at one of RULER's depths. The gold
    person, question and answer do not depend on n."""
    rng = random.Random(f"{seed}/people")
    people = rng.sample([f"{a} {b}" for a in tasks.NAMES for b in SURNAMES], len(tasks.NAMES) * len(SURNAMES))
    gold_text, questions = person_document(random.Random(f"{seed}/doc/{people[0]}"), people[0])
    question, answer = rng.choice(questions)
    others = [person_document(random.Random(f"{seed}/doc/{p}"), p)[0] for p in people[1:n]]
    texts = insert_at_depths(others, [gold_text], [rng.choice(DEPTHS)])
    rule = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    docs = "\n\n".join(f"Document {i + 1}:\n{text}" for i, text in enumerate(texts))
    context = f"{rule}\n\nThe following are given documents.\n\n{docs}"
    return context, f"\n\n{rule}\n\nQuestion: {question}", " Answer:", [answer], []


def build(family, seed, n, length):
    """(context, question, answer prefix, references, shots) of one family with n haystack units."""
    if family == "niah_single":
        return niah(seed, n, 1, 1, 1, "repeat")
    if family == "niah_multikey":
        return niah(seed, n, 4, 1, 1, "essay")
    if family == "niah_multivalue":
        return niah(seed, n, 1, 4, 1, "essay")
    if family == "niah_multiquery":
        return niah(seed, n, 4, 1, 4, "essay")
    if family == "vt":
        return vt(seed, n)
    if family == "cwe":
        return cwe(seed, n, long_context=length >= 4096)
    if family == "fwe":
        return fwe(seed, n, length)
    return qa(seed, n)


MIN_UNITS = {"fwe": 100}  # fewer coded words could tie the third and fourth most frequent


# -----------------------------------------------------------------------------
# prompts: plain text or the model's chat template, as token ids


def prompt_parts(example, tokenizer, fmt=None):
    """(context ids, question ids) of the prompt: a query-agnostic method compresses the first before it sees
    the second. plain: [BOS if the tokenizer asks for one] shots + context | question + answer prefix. chat: the
    template's user turn(s) hold shots, context and question (and BOS, if the template writes it), and the
    assistant turn starts with the answer prefix (the answer primed)."""
    fmt = fmt or example.fmt
    if fmt == "plain":
        shots = "".join(user + reply + "\n" for user, reply in example.shots)
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) else []  # Llama wants one
        return (bos + tokenizer.encode_ordinary(shots + example.context),
                tokenizer.encode_ordinary(example.question + example.answer_prefix))
    if fmt != "chat":
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {FORMATS}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the chat format needs a tokenizer with a chat template (hf.HFTokenizer of a chat model); "
                         "this one has none: use fmt='plain'")
    messages = [m for user, reply in example.shots for m in ({"role": "user", "content": user},
                                                              {"role": "assistant", "content": reply.strip()})]
    messages.append({"role": "user", "content": example.context + example.question})
    text = tokenizer.render_chat(messages, add_generation_prompt=True)
    if example.context + example.question not in text:
        raise ValueError("the chat template changed the user's text (it must appear verbatim in the rendered chat)")
    cut = text.rindex(example.context + example.question) + len(example.context)
    return tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:] + example.answer_prefix.lstrip())


def prompt_ids(example, tokenizer, fmt=None):
    """The whole prompt as token ids (context ids + question ids); it fits example.length in example.fmt."""
    context, question = prompt_parts(example, tokenizer, fmt)
    return context + question


def make_example(family, tokenizer, length, seed=0, index=0, fmt="plain"):
    """One example whose whole prompt in fmt takes at most `length` tokens of this tokenizer, and close to it:
    the haystack grows (doubling, then bisection over its units) while the prompt still fits. The same
    (family, seed, index, length) gives the same example; its needles and answers are the same in both formats
    (the haystack differs by the template's length) and, but for fwe and cwe, at every length."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {FORMATS}")
    key = f"ruler/{family}/{seed}/{index}"

    def example(n):
        context, question, prefix, references, shots = build(family, key, n, length)
        ex = Example(family, seed, index, length, fmt, context, question, prefix, references, shots,
                     max_new_tokens=MAX_NEW_TOKENS[family])
        ex.n_tokens = len(prompt_ids(ex, tokenizer))
        return ex

    fits = example(MIN_UNITS.get(family, 1))
    if fits.n_tokens > length:
        raise ValueError(f"length {length} is too small for {family}: its template, needles and answer prefix with "
                         f"the smallest haystack take {fits.n_tokens} tokens in the {fmt} format; ask for at least "
                         f"{fits.n_tokens}")
    n, step = MIN_UNITS.get(family, 1), 1
    while True:  # doubling: n fits, n + step might
        trial = example(n + step)
        if trial.n_tokens > length or n + step > 4 * length:
            break
        fits, n, step = trial, n + step, 2 * step
    lo, hi = n, n + step  # lo fits, hi does not (or is past any sensible size)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = example(mid)
        if trial.n_tokens <= length:
            fits, lo = trial, mid
        else:
            hi = mid
    return fits


# -----------------------------------------------------------------------------
# generation rules and scoring (RULER's string_match_all / string_match_part)


def stop_ids(tokenizer):
    """Token ids that end an answer: the model's end of turn and end of text (hf.HFTokenizer.stop_ids, or
    tiktoken's <|endoftext|>)."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is not None:
        return list(ids)
    eot = getattr(tokenizer, "eot_token", None)
    return [eot] if eot is not None else []


def answer_done(family, text):
    """Whether generated text is finished by the newline rule: a newline after the answer's first letter or digit
    (a newline after a bare ":" is only the list starting)."""
    started = re.search(r"\w", text)
    return STOP_AT_NEWLINE[family] and started is not None and "\n" in text[started.start():]


def clean(prediction):
    """RULER's post-processing: control characters become newlines, and the ends are stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def score(family, prediction, references):
    """RULER's score in [0, 1]: qa takes string_match_part (1 if any reference appears in the prediction),
    the others string_match_all (the share of references that appear); case-insensitive substrings."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    if not references:
        raise ValueError("score needs at least one reference answer")
    pred = clean(prediction).lower()
    hits = [r.lower() in pred for r in references]
    return float(max(hits)) if family == "qa" else sum(hits) / len(hits)


# -----------------------------------------------------------------------------
# the suite: these families as tasks.Item lists for lukv.run_example (tasks.Suite's interface)


class RulerSuite:
    """RULER-style families for a real model, in one prompt format ("plain" or "chat").

    The context (instructions, haystack, shots) is what a query-agnostic method compresses; the
    question and the answer prefix come after it. Answers stop at the model's end of turn or, but
    for cwe, at a newline once the answer has started; they are scored as RULER scores them. The
    generation budget is RULER's, capped at twice the references' tokens + 16 (the answers are a few
    tokens; a rambling compressed cache would otherwise cost RULER's full 128 steps on a CPU)."""

    families = FAMILIES

    def __init__(self, enc, fmt="plain"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown prompt format {fmt!r}; expected one of {FORMATS}")
        self.enc, self.fmt = enc, fmt
        self.stop_ids = set(stop_ids(enc))  # may be empty: then answers end by budget or newline rule

    def items(self, family, n, length, seed):
        out = []
        for i in range(n):
            ex = make_example(family, self.enc, length, seed, i, self.fmt)
            context, question = prompt_parts(ex, self.enc)
            budget = min(ex.max_new_tokens, 2 * len(self.enc.encode_ordinary(" ".join(ex.references))) + 16)
            out.append(tasks.Item(family, i, context, question, ex.references, budget))
        return out

    def done(self, item):
        return lambda ids: answer_done(item.family, self.enc.decode(ids))

    def answer(self, ids):
        return self.enc.decode(ids)

    def score(self, item, answer):
        return score(item.family, answer, item.references)


def parse(argv=None):
    """(parser, args), every argument checked before any work."""
    parser = tasks.ArgumentParser(description=__doc__)
    parser.add_argument("--show", choices=FAMILIES, required=True, help="print one example of this family")
    parser.add_argument("--length", type=int, default=1024, help="prompt length in tokens (>= 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tasks.check_range(parser, "--length", args.length, 64)
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    enc = tasks.load_tokenizer(os.path.join(tasks.ROOT, "checkpoints", "tiny.tiktoken"))
    try:
        ex = make_example(args.show, enc, args.length, args.seed, 0, "plain")
    except ValueError as e:  # a length too short for this family's template and needles
        parser.error(str(e))
    context, question = prompt_parts(ex, enc)
    print(enc.decode(context) + "\033[1m" + enc.decode(question) + "\033[0m")
    print(f"\n-- {len(context)} + {len(question)} = {ex.n_tokens} tokens of {ex.length}; references "
          f"{ex.references}; up to {ex.max_new_tokens} new tokens")
