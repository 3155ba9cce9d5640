"""
Calibration sets for LU-KV's offline profiling (arXiv 2602.08585, "Offline profiling and use"): the
texts a model prefills, the questions appended to them, and how each set is used (a Protocol).

The oracle importance of a context token is the attention that the future pays it: the question
plus the model's own answer. Three protocols, each a maker and fixed settings in PROTOCOLS:
  paper      our own English story in seven chapters, about 30 questions (details, foreshadowing,
             structure per chapter, a few on the whole text); raw text, no chat template, the model's
             64-token answer sampled at temperature 0.7: the shape of the official novel.jsonl
             (one Chinese story, 30 open questions), with our own text
  mixed      our own design: contexts that mix recipes, letters, dialogues, how-to guides, news,
             price lists, diaries and short tales, asked for details, counts, orders, comparisons
  documents  the project's default: short documents about people, a question on each; the
             calibration of the shipped SmolLM2 tables, token for token
None of them uses an evaluation family's shape (needles, variable chains, word lists, RULER's qa),
and the story and mixed texts share no name or town with tasks.py's pools. A user's own file (the
official novel.jsonl included) is read with read_calibration_file.

Lengths are in the given tokenizer's tokens (anything with encode_ordinary): a context plus any one
of its questions, in its protocol's question format, fits `length`; the answer comes on top.

    python -m experiments.calibration --protocol paper --length 4096 --show   # the story, tiny tokenizer
    python -m experiments.calibration --protocol mixed --length 1024 --out mixed.jsonl
"""

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import solver
import tasks
from experiments import ruler  # person_document: the documents protocol's texts

PLAIN_QUESTION = "\n\nQuestion: {q}\nAnswer:"  # the paper's and mixed's question and answer cue


@dataclass
class Calibration:
    name: str
    contexts: list  # [(context text, [question text, ...])]
    answers: list = None  # [[reference answer per question]]: answerability checks (the oracle uses the model's own)
    kinds: list = None  # [[question kind per question]], e.g. "ch3/foreshadowing", "recipe/order"
    meta: dict = field(default_factory=dict)


def count_tokens(tokenizer, text):
    return len(tokenizer.encode_ordinary(text))


def question_reserve(tokenizer, questions, fmt=PLAIN_QUESTION):
    """Tokens the longest question takes in its format: the context gets what is left of the length."""
    return max(count_tokens(tokenizer, fmt.format(q=q)) for q in questions)


def capitalise(sentence):
    return sentence[0].upper() + sentence[1:]


def with_article(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# -----------------------------------------------------------------------------
# the story (paper): seven chapters, an object found early that opens the hiding place late

FEMALE = "Marguerite Elinor Rosalind Philippa Henrietta Winifred Josephine Beatrix Imogen Harriet Cordelia Maude"
FEMALE = FEMALE.split()
MALE = "Tobias Casimir Ambrose Leopold Barnaby Cornelius Desmond Rupert Silas Jasper Edmund Gideon".split()
FAMILY = "Hale Ashdown Pennick Carrow Mortlake Fairweather Quill Thistlewood Brannock Lovell Greaves Ellery".split()
TRADES = "clockmaker librarian glassblower bookbinder beekeeper mapmaker lamplighter herbalist stonemason printer"
TRAITS = "stubborn patient curious careful restless quiet cheerful proud".split()  # after "a": no vowel first
TOWNS = "Port Alder|Wexmoor|Saltmere|Briarwick|Fenwold|Dunmore Bay|Kestrel Cove|Ashby Marsh".split("|")
PLACES = ("the harbour wall|the old mill|the lighthouse|the covered market|the chapel on the hill|the railway station|"
          "the public library|the boathouse|the bell tower|the museum|the town hall|the orchard behind the inn")
PLACES = PLACES.split("|")
LOST = [("the great lens", "the lighthouse"), ("the harbour ledger", "the town hall"),
        ("the bronze bell", "the bell tower"), ("the silver chalice", "the chapel on the hill"),
        ("the founder's portrait", "the museum"), ("the oldest town chronicle", "the public library")]
# (object, how it looks, how it opens the hiding place)
OBJECTS = [("brass key", "with a crooked tooth", "the brass key turned in its lock with a dry click"),
           ("wooden token", "stamped with the number seven", "the wooden token fitted a slot in its lid"),
           ("glass marble", "with a green swirl inside", "the glass marble dropped into a slot and the lock gave way"),
           ("silver locket", "engraved with a heron", "the silver locket held a paper with the numbers of its lock")]
WARNINGS = ["Be wary of anyone who offers help before it is asked for",
            "A helpful hand in a hurry is seldom an honest one",
            "Keep it close, because someone will come looking for it", "Whoever finds a lock will want its key"]
CLUES = [("wore a long red scarf", "red scarf", "a thread of red wool caught on the latch"),  # (looks, clue, trace)
         ("had fingers stained with blue ink", "blue ink", "blue ink smudged on the frame"),
         ("wore boots caked with white chalk", "white chalk", "white chalk footprints on the sill"),
         ("smelled faintly of pipe smoke", "pipe smoke", "the stale smell of pipe smoke")]
RELATIONS = [("grandmother", "grandfather"), ("aunt", "uncle"), ("godmother", "godfather"), ("old teacher",) * 2]
HIDINGS = ["iron chest", "locked cupboard", "sealed crate", "tin trunk"]
TRANSPORTS = ["evening ferry", "morning train", "mail coach", "last bus"]
TOOLS = ["lantern", "spade", "crowbar", "coil of rope"]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
ORDINALS = "One Two Three Four Five Six Seven".split()

# a chapter: its title, its core sentences (the facts the questions ask for), its (kind, question, answer)s
CHAPTERS = [
    ("The {Obj}", ["{hero_full} was a {trait} {hero_job} in {town}.",
                   "One {day1} morning {hero} found a {obj} {detail} at {place1}.",
                   "{hero} showed it to {hher} friend {friend_full}, a {friend_job}, and then hid it in a drawer."],
     [("details", "Where does {hero} find the {obj}?", "{place1}"),
      ("details", "What is the job of {friend}?", "{friend_job}"),
      ("foreshadowing", "Which object found in Chapter One turns out to matter at the end?", "{obj}"),
      ("structure", "What does {hero} do with the {obj} right after showing it to {friend}?", "hid it in a drawer")]),
    ("The Warning", ["That evening {hero} visited {hher} {rel} {elder_full} beside {place2}.",
                     "{elder} looked at the {obj} for a long time and said, \"{warning}.\"",
                     "The next morning {town} woke to the news that {lost} had vanished from {home}."],
     [("details", "Where does {elder} live?", "{place2}"),
      ("details", "What vanishes from {home}?", "{lost}"),
      ("foreshadowing", "What warning does {elder} give {hero}?", "{warning}"),
      ("structure", "In which chapter does {lost} vanish?", "Chapter Two")]),
    ("A Helpful Stranger", ["A stranger named {rival_full}, who said {rshe} was a {rival_job}, came to {town} on the "
                            "{transport}.",
                            "{rival} {looks} and offered to help with the search before anyone asked."],
     [("details", "How does {rival} arrive in {town}?", "the {transport}"),
      ("details", "What does {rival} say {rshe} works as?", "{rival_job}"),
      ("foreshadowing", "What detail of {rival}'s appearance matters later in the story?", "{clue}"),
      ("structure", "In which chapter does {rival} first appear?", "Chapter Three")]),
    ("The Storm", ["On {day4} a storm closed the roads, and someone broke into {hero}'s house.",
                   "The {obj} was safe, sewn into the lining of {hher} coat after the warning, but {friend} found "
                   "{trace} by the window."],
     [("details", "Where is the {obj} when the house is searched?", "the lining of {hher} coat"),
      ("details", "On which day does the storm close the roads?", "{day4}"),
      ("foreshadowing", "What clue by the window later points to the thief?", "{trace}"),
      ("structure", "What happens right after the storm closes the roads?", "someone broke into {hero}'s house")]),
    ("In the Dark", ["{hero} remembered that {rival} {looks}, and the clue by the window made sense.",
                     "That night {hero} and {friend} followed {rival}, who carried a {tool}, to {place4}."],
     [("details", "Where do {hero} and {friend} follow {rival}?", "{place4}"),
      ("details", "What does {rival} carry that night?", "a {tool}"),
      ("foreshadowing", "Which earlier detail does {hero} connect to the clue by the window?", "{clue}"),
      ("structure", "In which chapter do {hero} and {friend} follow {rival}?", "Chapter Five")]),
    ("The Hiding Place", ["Behind a loose board {hero} found a {hiding}, and {payoff}.",
                          "Inside lay {lost}, and {friend} fetched the constable before {rival} could run."],
     [("details", "What does {hero} find behind the loose board?", "a {hiding}"),
      ("details", "Who fetches the constable?", "{friend}"),
      ("foreshadowing", "Which object from the first chapter opens the {hiding}?", "{obj}"),
      ("structure", "What lies inside the {hiding} once it is open?", "{lost}")]),
    ("Home Again", ["On {day7} {lost} was back in {home}, and {rival} left {town} on the {transport}.",
                    "{elder} said {eshe} had known all along, and {hero} kept the {obj} on a cord around {hher} neck."],
     [("details", "Where does {hero} keep the {obj} at the end?", "on a cord around {hher} neck"),
      ("details", "On which day is {lost} back in {home}?", "{day7}"),
      ("foreshadowing", "Who says at the end that {eshe} had known all along?", "{elder}"),
      ("structure", "In which chapter is {lost} back in {home}?", "Chapter Seven")]),
]
WHOLE = [("Who is the main character of the story?", "{hero_full}"),
         ("In which town does the story take place?", "{town}"),
         ("Who took {lost}?", "{rival_full}"),
         ("How does the story end?", "{lost} was back in {home}")]

# filler: prose that adds no plot facts, composed from parts; a chapter uses each part once, so that a long
# story repeats no sentence and no clause within a chapter
OPENERS = ["Some time later", "Before long", "For a while", "Meanwhile", "After that", "Now and then",
           "Not long after", "All the while", "Outside", "Beyond the windows"]
CALM = ["a thin rain drifted in from the sea", "gulls wheeled and cried above the harbour",
        "the sun came and went behind ragged clouds", "the air smelled of salt and wood smoke",
        "fog gathered in the low streets", "a cold wind came down from the hills", "the streetlamps came on one by one",
        "smoke rose straight up from the chimneys", "the tide crept in over the mud flats",
        "swallows skimmed low over the rooftops", "the light turned soft and grey", "a cart rattled over the cobbles"]
ROUGH = ["the rain came down in sheets", "the wind tore at the shutters", "thunder rolled somewhere out at sea",
         "water ran ankle deep in the gutters", "a slate slid from a roof and shattered in the lane",
         "the lamps guttered in the wind", "the sea threw spray high over the rocks", "clouds hid the moon",
         "branches cracked and groaned in the dark", "a gate banged again and again in the wind"]
ACTIONS = ["poured two cups of strong tea", "stood at the window for a long time", "walked home the long way round",
           "wrote a few lines in {ph} notebook and crossed them out", "bought a warm loaf from the baker's cart",
           "lit the stove and waited for the kettle", "sat on the harbour steps to watch the boats",
           "read the same page of a book three times", "tidied the workbench out of habit",
           "listened to the rain drumming on the roof", "ate a late supper of bread and cheese",
           "fed the grey cat that wandered in from the yard", "mended a torn sleeve by candlelight",
           "counted the coins in {ph} pocket twice", "wound the clock on the mantelpiece",
           "polished {ph} boots by the fire", "opened a window to let in the cold air",
           "sorted a drawer full of old buttons", "watered the geraniums on the sill", "swept the kitchen floor",
           "hung {ph} wet coat by the stove", "made a list of everything that had to be done",
           "cut a slice of bread and forgot to eat it", "leaned on the gate to watch the road",
           "brushed the mud from {ph} trousers", "put another log on the fire", "folded the washing into a basket",
           "rubbed {ph} eyes and yawned", "wrote a short note and left it on the table", "locked the back door twice"]
MANNERS = ["", "", "", " without quite knowing why", ", lost in thought", " to pass the time", " and said nothing",
           " slowly", " as quietly as possible"]
LINES = ["We should eat something before it gets dark", "I have a bad feeling about all this",
         "Nobody in this town ever locks a door", "You look as if you have not slept at all",
         "It will all seem simpler in the morning", "I used to play here when I was small",
         "Let us not tell anyone yet", "Sometimes I think this town never changes",
         "There is more to this than we can see", "I wish the rain would stop",
         "My mother always said that trouble comes in threes", "Tomorrow I will go and ask around",
         "Nothing good ever happens after midnight", "I keep thinking we have missed something",
         "We cannot go on like this for long", "The kettle has been cold for an hour"]
SAYS = ['"{line}," said {p}.', '"{line}," {p} said quietly.', '{p} sighed. "{line}."', '"{line}," {p} muttered.']
EXCHANGES = [("Do you think it will ever turn up?", "Give it time"), ("Are you cold?", "Only my hands"),
             ("Did you sleep at all?", "Not much"), ("Shall I make some tea?", "Please do"),
             ("What would you do in my place?", "Exactly what you are doing"), ("Have you eaten today?", "I forgot to"),
             ("Is it always this quiet here?", "Only in winter"), ("Do you trust anyone in this town?", "A few people"),
             ("Where did you put the lamp?", "On the shelf by the door"), ("Should we wait until morning?", "No")]
ASKS = ['"{q}" asked {p}. "{a}," said {o}.', '"{q}" {p} asked. {o} shrugged. "{a}."']
WHERE = ["Down by the water", "In the lane outside", "Across the square", "At the corner of the street",
         "Further along the road", "Under the bridge"]
FOLK = [("an old fisherman", "was mending a net|was smoking a short clay pipe"),
        ("a baker's boy", "was carrying a tray of loaves|was whistling a tune"),
        ("a woman with a basket", "was haggling over the price of eggs|was calling to a friend"),
        ("a dog with one torn ear", "was barking at the gulls|was asleep in a doorway"),
        ("a tired postman", "was sorting letters on a wall|was pushing a bicycle uphill"),
        ("two boys", "were throwing stones into the water|were racing paper boats in the gutter")]
THINK = ["kept thinking about", "could not stop thinking about", "thought for a while about",
         "lay awake thinking about"]
THOUGHTS = [(0, "how quiet the house had become"), (0, "the long winter ahead"), (0, "the summer the harbour froze"),
            (0, "the years {ps} had spent in {town}"), (0, "{ph} mother's kitchen"),  # (from chapter, thought)
            (1, "the strange weight of the {obj}"), (2, "what {elder} had said"), (2, "the empty place in {home}"),
            (3, "the face of {rival}")]


def make_person(rng, used_names, trades):
    female = rng.random() < 0.5
    first = rng.choice([n for n in (FEMALE if female else MALE) if n not in used_names])
    used_names.add(first)
    return dict(name=first, full=f"{first} {rng.choice(FAMILY)}", job=trades.pop(), she="she" if female else "he",
                her="her" if female else "his", female=female)


def story_plot(rng):
    """The slots of one story: cast, places, the object, the warning, the clue."""
    names, trades = set(), rng.sample(TRADES.split(), 4)
    hero, friend, elder, rival = (make_person(rng, names, trades) for _ in range(4))
    lost, home = rng.choice(LOST)
    place1, place2, place4 = rng.sample([p for p in PLACES if p != home], 3)
    obj, detail, payoff = rng.choice(OBJECTS)
    looks, clue, trace = rng.choice(CLUES)
    day1, day4, day7 = rng.sample(DAYS, 3)
    slots = dict(hero=hero["name"], hero_full=hero["full"], hero_job=hero["job"], hher=hero["her"],
                 trait=rng.choice(TRAITS), friend=friend["name"], friend_full=friend["full"], friend_job=friend["job"],
                 elder=elder["name"], elder_full=elder["full"], eshe=elder["she"],
                 rel=rng.choice(RELATIONS)[0 if elder["female"] else 1], rival=rival["name"],
                 rival_full=rival["full"], rival_job=rival["job"], rshe=rival["she"], town=rng.choice(TOWNS),
                 lost=lost, home=home, place1=place1, place2=place2, place4=place4, obj=obj, Obj=obj.title(),
                 detail=detail, payoff=payoff, warning=rng.choice(WARNINGS), looks=looks, clue=clue, trace=trace,
                 transport=rng.choice(TRANSPORTS), tool=rng.choice(TOOLS), hiding=rng.choice(HIDINGS),
                 day1=day1, day4=day4, day7=day7)
    return slots, [hero, friend, elder, rival]


def filler_sentence(rng, people, slots, chapter, used):
    """A new sentence of atmosphere for a chapter about people met in earlier chapters (names, not pronouns,
    so no reader wonders who "she" is), or None when the chapter has used every part."""
    for _ in range(300):  # random tries: a chapter closes when almost every part is used
        p, o = rng.sample(people, 2) if len(people) > 1 else (people[0], None)
        pattern = rng.choice(["scene", "action", "action", "say", "ask", "folk", "think"])
        if pattern == "scene":
            parts = [rng.choice(OPENERS), rng.choice(ROUGH if chapter in (3, 4) else CALM)]  # the storm, the night
            s = f"{parts[0]}, {parts[1]}."
        elif pattern == "action":
            action = rng.choice(ACTIONS)
            manner = rng.choice([m for m in MANNERS if " and " not in action or " and " not in m])
            parts = [action, manner] if manner else [action]  # each manner once a chapter too
            s = f"{p['name']} {action}{manner}.".format(ph=p["her"])
        elif pattern == "say" and o:
            parts = [rng.choice(LINES)]
            s = rng.choice(SAYS).format(line=parts[0], p=p["name"])
        elif pattern == "ask" and o:
            question, answer = rng.choice(EXCHANGES)
            parts = [question]
            s = rng.choice(ASKS).format(q=question, a=answer, p=p["name"], o=o["name"])
        elif pattern == "folk":
            folk, doings = rng.choice(FOLK)
            parts = [rng.choice(WHERE), f"{folk} {rng.choice(doings.split('|'))}"]
            s = f"{parts[0]}, {parts[1]}."
        elif pattern == "think":
            thoughts = [t for first, t in THOUGHTS if first <= chapter]
            parts = [rng.choice(thoughts).format(ps=p["she"], ph=p["her"], **slots)]
            s = f"{p['name']} {rng.choice(THINK)} {parts[0]}."
        else:
            continue
        if not used.intersection(parts):
            used.update(parts)
            return s
    return None


def render_story(seed, title, chapters, fillers):
    """The story text: a title, then per chapter its heading and paragraphs; each core sentence opens a
    paragraph and its share of the filler follows it (the split depends on the seed and the counts)."""
    parts = [title]
    for c, ((heading, core), fill) in enumerate(zip(chapters, fillers)):
        rng = random.Random(f"story-{seed}/layout/{c}/{len(fill)}")
        cuts = sorted(rng.randint(0, len(fill)) for _ in core[1:])
        paragraphs = []
        for sentence, lo, hi in zip(core, [0] + cuts, cuts + [len(fill)]):
            body = [sentence] + fill[lo:hi]
            while body:
                n = rng.randint(2, 5)
                paragraphs.append(" ".join(body[:n]))
                body = body[n:]
        parts.append(f"Chapter {ORDINALS[c]}: {heading}\n\n" + "\n\n".join(paragraphs))
    return "\n\n".join(parts) + "\n"


def story(seed, length, tokenizer):
    """The paper's protocol with our own text: one story in seven chapters, filled to about `length` tokens."""
    rng = random.Random(f"story-{seed}")
    slots, cast = story_plot(rng)
    chapters = [(h.format(**slots), [capitalise(s.format(**slots)) for s in core]) for h, core, _ in CHAPTERS]
    qa = [(f"ch{c + 1}/{kind}", q.format(**slots), a.format(**slots))
          for c, (_, _, qs) in enumerate(CHAPTERS) for kind, q, a in qs]
    qa += [("whole", q.format(**slots), a.format(**slots)) for q, a in rng.sample(WHOLE, rng.randint(2, 4))]
    title = f"The {slots['Obj']} of {slots['town']}"
    budget = length - question_reserve(tokenizer, [q for _, q, _ in qa])
    fillers = [[] for _ in chapters]
    need = count_tokens(tokenizer, render_story(seed, title, chapters, fillers))
    if need > budget:
        raise ValueError(f"the story's plot alone takes {need} tokens of this tokenizer and its longest question "
                         f"{length - budget}; ask for a length of at least {need + length - budget}, got {length}")
    # one filler sentence per chapter in turn until the next does not fit; the friend is met in chapter 1,
    # the elder in 2, the rival in 3, and a chapter's filler names only people met before it
    fill_rng, used, order = random.Random(f"story-{seed}/filler"), [set() for _ in chapters], []
    open_chapters = list(range(7))
    while open_chapters:
        c = open_chapters[len(order) % len(open_chapters)]
        s = filler_sentence(fill_rng, cast[:1 + min(c, 3)], slots, c, used[c])
        if s is None:
            open_chapters.remove(c)
            continue
        cost = count_tokens(tokenizer, " " + s)
        if need + cost > budget:
            break
        fillers[c].append(s)
        order.append(c)
        need += cost
    text = render_story(seed, title, chapters, fillers)
    while count_tokens(tokenizer, text) > budget:  # the estimate is off by a few tokens at joins: drop the last
        fillers[order.pop()].pop()
        text = render_story(seed, title, chapters, fillers)
    return Calibration("paper", [(text, [q for _, q, _ in qa])], [[a for _, _, a in qa]], [[k for k, _, _ in qa]],
                       dict(seed=seed, length=length, tokens=count_tokens(tokenizer, text)))


# -----------------------------------------------------------------------------
# mixed: everyday texts of many kinds, questions of detail, count, order and comparison

RECIPES = {"plum crumble": "plums:600 g|flour:150 g|butter:100 g|brown sugar:80 g|oats:50 g|cinnamon:1 teaspoon|"
                           "raisins:60 g",
           "lentil stew": "red lentils:250 g|onions:2|carrots:3|tinned tomatoes:400 g|stock:800 ml|cumin:2 teaspoons|"
                          "garlic:3 cloves",
           "onion tart": "pastry:300 g|onions:5|butter:40 g|eggs:3|cream:200 ml|thyme:1 sprig|cheese:80 g",
           "lemon barley soup": "pearl barley:120 g|stock:1200 ml|lemons:2|leeks:2|carrots:2|parsley:1 handful|"
                                "salt:1 pinch",
           "pear cake": "pears:4|flour:200 g|butter:150 g|sugar:150 g|eggs:3|ground ginger:2 teaspoons|almonds:60 g",
           "oat biscuits": "oats:200 g|flour:100 g|butter:120 g|honey:3 spoons|sugar:50 g|raisins:80 g|salt:1 pinch"}
STIR = ["stir", "whisk", "mix", "fold", "beat", "simmer"]
GOODS = ("tea towel|candle|ball of string|jar of honey|box of matches|tin of polish|notebook|bar of soap|sewing kit|"
         "pocket torch|umbrella|pair of socks|roll of tape|packet of seeds|oil lamp|egg cup").split("|")
SHOPS = ["Pennick's Hardware", "The Corner Store", "Lovell and Daughters", "Quill's General Goods", "The Harbour Shop"]
GUIDES = {"repot a houseplant": "water the plant an hour before|choose a pot one size larger|"
                                "put stones over the drainage hole|ease the plant out by the base of the stem|"
                                "loosen the roots with your fingers|set it in the new pot and fill with compost|"
                                "water it well and keep it out of strong sun",
          "patch a bicycle tyre": "take the wheel off the frame|lever the tyre off the rim|"
                                  "find the hole by listening for air|roughen the rubber around the hole|"
                                  "spread a thin layer of glue|press the patch on for a minute|"
                                  "put the tube back and pump it up",
          "clean a cast-iron pan": "let the pan cool a little|scrub it with hot water and a stiff brush|"
                                   "scrape off any burnt bits with salt|dry it on a low flame|"
                                   "rub in a few drops of oil|wipe away the extra oil with a cloth",
          "sharpen a kitchen knife": "soak the whetstone for ten minutes|set the stone on a damp towel|"
                                     "hold the blade at a shallow angle|draw it across the coarse side ten times|"
                                     "turn the knife over and repeat|finish on the fine side|rinse and dry the blade"}
EVENTS = ["the new footbridge", "the spring flower show", "the restored market hall", "the harbour regatta",
          "the winter lantern parade", "the village fete"]
ACTIVITIES = ["planted beans", "painted the gate", "baked bread", "walked to the lighthouse", "went to the dentist",
              "wrote to my sister", "cleaned the windows", "mended the fence", "visited the market",
              "sorted old letters"]
MONTHS = "March April May June September October".split()
DESTINATIONS = ["Wexmoor", "Saltmere", "Briarwick", "Fenwold", "Kestrel Cove"]
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
PEOPLE = [f"{first} {family}" for first in FEMALE + MALE for family in FAMILY]  # 288: a long context never runs out


def pick(rng, pool, avoid):
    """A pool item this context has not used yet (so no two texts of one context share a name a question uses)."""
    free = [x for x in pool if x not in avoid]
    if not free:
        raise LookupError("pool exhausted")
    return rng.choice(free)


# each kind: (rng, size, names to avoid) -> (text, [(question kind, question, answer)], names it used)
def recipe(rng, size, avoid):
    dish = pick(rng, list(RECIPES), avoid)
    items = [x.split(":") for x in RECIPES[dish].split("|")][:size + 2]  # [(ingredient, amount)]
    minutes = rng.sample(range(1, 16), len(items))
    lines = [f"Recipe: {dish} (serves {rng.randint(2, 6)})", "Ingredients:"]
    lines += [f"- {amount} {i}" for i, amount in items] + ["Method:"]
    lines += [f"{k + 1}. Add the {i} and {rng.choice(STIR)} for {m} minutes."
              for k, ((i, _), m) in enumerate(zip(items, minutes))]
    x, y = rng.sample(range(len(items)), 2)
    k = rng.randrange(len(items) - 1)
    return "\n".join(lines), [
        ("detail", f"How much {items[x][0]} goes into the {dish}?", items[x][1]),
        ("count", f"How many ingredients does the {dish} need?", str(len(items))),
        ("order", f"In the {dish} method, which ingredient is added right after the {items[k][0]}?", items[k + 1][0]),
        ("comparison", f"In the {dish} method, which takes longer: the {items[x][0]} step or the {items[y][0]} step?",
         f"the {items[x if minutes[x] > minutes[y] else y][0]} step")], [dish]


def letter(rng, size, avoid):
    sender, to = pick(rng, PEOPLE, avoid), rng.choice(FEMALE + MALE)
    trees, hens, date = rng.randint(2, 9), rng.randint(3, 12), f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
    street = f"{rng.choice(FAMILY)} Street"
    news = [f"We have moved at last, to a narrow house on {street}.",
            f"The garden has {trees} apple trees and a shed full of broken chairs.",
            f"Our neighbour keeps {hens} hens and leaves eggs on the wall for us.",
            "The roof leaked twice last month, but it is mended now.",
            f"I have taken up the {rng.choice(['violin', 'piano', 'flute'])} again, badly.",
            "The children at the school on the corner sing every morning.",
            "The baker here makes a seed cake that you would like.",
            "I walk by the river most evenings when the weather allows."]
    body = news[:3] + rng.sample(news[3:], min(size, 5))
    rng.shuffle(body)
    text = f"A letter\nDear {to},\n\n{' '.join(body)} I will come to see you on {date}. Write soon.\n\n" \
           f"With love,\n{sender}"
    return text, [("detail", f"On what date will {sender} visit {to}?", date),
                  ("detail", f"On which street is {sender}'s new house?", street),
                  ("comparison", f"Are there more apple trees or hens at {sender}'s new home?",
                   "hens" if hens > trees else "apple trees"),
                  ("count", f"How many apple trees are in {sender}'s garden?", str(trees))], [sender]


def dialogue(rng, size, avoid):
    name, dest = pick(rng, PEOPLE, avoid), pick(rng, DESTINATIONS, avoid)
    n, price, platform = rng.randint(2, 5), rng.randint(3, 19), rng.randint(1, 9)
    hour = f"{rng.randint(6, 11)}.{rng.choice(['05', '20', '35', '50'])}"
    lines = [("Clerk", "Good morning. Where are you travelling today?"),
             (name, f"To {dest}, please. {capitalise(NUMBER_WORDS[n])} single tickets."),
             ("Clerk", f"That is {price} pounds each."), (name, "Which platform does it leave from?"),
             ("Clerk", f"Platform {platform}, at {hour}. You have a little time."),
             (name, "Is there somewhere to buy tea?"), ("Clerk", "The kiosk by the clock sells tea and buns."),
             (name, "Thank you. Is the train usually on time?"), ("Clerk", "Mostly, unless the wind is up."),
             (name, "Then I hope it stays calm."), ("Clerk", "Mind the gap when you board."),
             (name, "I will. Good day to you.")][:6 + size]
    return "A conversation at the ticket office\n" + "\n".join(f"{who}: {said}" for who, said in lines), [
        ("detail", f"From which platform does the train to {dest} leave?", str(platform)),
        ("count", f"How many tickets to {dest} does {name} buy?", str(n)),
        ("detail", f"At what time does the train to {dest} leave?", hour)], [name, dest]


def howto(rng, size, avoid):
    task = pick(rng, list(GUIDES), avoid)
    steps = GUIDES[task].split("|")
    k, j = rng.randrange(len(steps) - 1), rng.randrange(len(steps))
    text = f"How to {task}\n" + "\n".join(f"Step {i + 1}: {capitalise(s)}." for i, s in enumerate(steps))
    return text, [("order", f"In the guide on how to {task}, what comes right after \"{steps[k]}\"?", steps[k + 1]),
                  ("count", f"How many steps does the guide on how to {task} have?", str(len(steps))),
                  ("detail", f"What is step {j + 1} of the guide on how to {task}?", steps[j])], [task]


def news(rng, size, avoid):
    event, town = pick(rng, EVENTS, avoid), rng.choice(TOWNS)
    mayor = f"{rng.choice(FEMALE + MALE)} {rng.choice(FAMILY)}"
    now, before, cost = rng.randrange(300, 3000, 10), rng.randrange(300, 3000, 10), rng.randrange(2, 90)
    day = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
    body = [f"{capitalise(event)} opened in {town} on {day}, and {now} people came to see it.",
            f"The mayor, {mayor}, cut the ribbon and thanked the volunteers.", f"Last year the crowd was {before}.",
            f"The organisers spent {cost} thousand pounds, most of it raised in the town.",
            "A brass band played until the light went.", "Stalls sold pies, cider and paper flags.",
            "Several visitors came by boat from along the coast.", "Children were allowed to ring the old handbell.",
            "The council promised to hold the event again next year."][:3 + size]
    return f"The {town} Courier, {day}\n" + " ".join(body), [
        ("detail", f"Who cut the ribbon at {event}?", mayor), ("detail", f"When did {event} open?", day),
        ("comparison", f"Did more people come to {event} this year or last year?",
         "this year" if now > before else "last year"),
        ("count", f"How many people came to {event}?", str(now))], [event]


def prices(rng, size, avoid):
    shop, goods = pick(rng, SHOPS, avoid), rng.sample(GOODS, size + 2)
    cost = rng.sample(range(40, 990, 5), len(goods))  # pence
    rows = [f"{g} | {c / 100:.2f} pounds | {rng.randint(0, 40)} in stock" for g, c in zip(goods, cost)]
    x, y = rng.sample(range(len(goods)), 2)
    limit = rng.choice([2, 3, 4, 5])
    return f"{shop}: prices this week\nitem | price | stock\n" + "\n".join(rows), [
        ("detail", f"What does {with_article(goods[x])} cost at {shop}?", f"{cost[x] / 100:.2f} pounds"),
        ("comparison", f"Which is cheaper at {shop}: the {goods[x]} or the {goods[y]}?",
         goods[x] if cost[x] < cost[y] else goods[y]),
        ("count", f"How many items at {shop} cost more than {limit} pounds?", str(sum(c > 100 * limit for c in cost)))
    ], [shop]


def diary(rng, size, avoid):
    writer = pick(rng, PEOPLE, avoid)
    acts, start, month = rng.sample(ACTIVITIES, size + 2), rng.randrange(len(DAYS)), rng.choice(MONTHS)
    rain = [rng.random() < 0.4 for _ in acts]
    dates = [f"{DAYS[(start + i) % 7]} {3 + i} {month}" for i in range(len(acts))]
    entries = [f"{d}. {'Rain all day.' if wet else 'Dry and bright.'} I {act}."
               for d, act, wet in zip(dates, acts, rain)]
    k = rng.randrange(len(acts) - 1)
    return f"From the diary of {writer}\n" + "\n".join(entries), [
        ("detail", f"On which day did {writer} write \"I {acts[k]}\"?", dates[k]),
        ("count", f"On how many days of {writer}'s diary did it rain?", str(sum(rain))),
        ("order", f"What did {writer} do on the day after the entry \"I {acts[k]}\"?", acts[k + 1])], [writer]


def tale(rng, size, avoid):
    hero = pick(rng, PEOPLE, avoid)
    first = hero.split()[0]
    helper = rng.choice([n for n in FEMALE + MALE if n != first])
    thing, where = rng.choice(GOODS), rng.choice(PLACES)
    found = rng.choice(["a flowerpot", "a coat pocket", "the bread bin", "a boot"])
    story = [f"{hero} lost {with_article(thing)} somewhere near {where}.",
             f"{first} searched all afternoon and asked everyone who passed.",
             f"At last {helper} suggested looking at home, and {first} found the {thing} in {found}.",
             f"{first} had to laugh.", f"That evening {first} baked a cake for {helper}.",
             "The rain held off until dark.", "It was not the first thing lost that year.",
             "Nobody mentioned it again."][:3 + size]
    return "A short tale\n" + " ".join(story), [
        ("detail", f"Where did {hero} finally find the {thing}?", found),
        ("detail", f"Who told {hero} to look at home?", helper),
        ("order", f"What did {hero} do right after searching all afternoon?", "asked everyone who passed")
    ], [hero]


TEXT_KINDS = {"recipe": recipe, "letter": letter, "dialogue": dialogue, "howto": howto, "news": news,
              "prices": prices, "diary": diary, "tale": tale}


def mixed_context(seed, c, length, tokenizer):
    """Texts of every kind, in an order of this context's own, until no kind has a text that fits."""
    rng = random.Random(f"mixed-{seed}/{c}")
    order, used, pieces, qa, total, reserve, misses = list(TEXT_KINDS), set(), [], [], 0, 0, 0
    rng.shuffle(order)
    for i in range(200):
        kind, placed = order[i % len(order)], False
        for size in range(rng.randint(2, 6), 0, -1):  # shrink a text that does not fit
            try:
                text, qs, keys = TEXT_KINDS[kind](random.Random(f"mixed-{seed}/{c}/{i}"), size, frozenset(used))
            except LookupError:
                break  # this kind has used all its names in this context
            cost, r = count_tokens(tokenizer, text + "\n\n"), question_reserve(tokenizer, [q for _, q, _ in qs])
            if total + cost + max(reserve, r) <= length:
                pieces.append(text)
                qa += [(f"{kind}/{k}", q, a, len(pieces)) for k, q, a in qs]  # (kind, question, answer, text no.)
                used |= set(keys)
                total, reserve, placed = total + cost, max(reserve, r), True
                break
        misses = 0 if placed else misses + 1
        if misses == len(order):
            break
    while pieces and count_tokens(tokenizer, "\n\n".join(pieces) + "\n") + reserve > length:  # off by a few at joins
        qa = [x for x in qa if x[3] < len(pieces)]
        pieces.pop()
    return "\n\n".join(pieces) + "\n", qa


def mixed(seed, length, tokenizer, n_contexts=8, n_questions=4):
    """Our own design: each context a different mix of everyday texts, its questions of varied kinds."""
    contexts, answers, kinds = [], [], []
    for c in range(n_contexts):
        text, qa = mixed_context(seed, c, length, tokenizer)
        if not qa:
            raise ValueError(f"no mixed text fits {length} tokens of this tokenizer; ask for a longer length")
        rng, picked, per_kind, per_text = random.Random(f"mixed-{seed}/{c}/questions"), [], {}, {}
        rng.shuffle(qa)
        for _ in range(min(n_questions, len(qa))):  # spread the questions over question kinds, then texts
            best = min((x for x in qa if x not in picked),
                       key=lambda x: (per_kind.get(x[0].split("/")[1], 0), per_text.get(x[3], 0)))
            picked.append(best)
            per_kind[best[0].split("/")[1]] = per_kind.get(best[0].split("/")[1], 0) + 1
            per_text[best[3]] = per_text.get(best[3], 0) + 1
        contexts.append((text, [q for _, q, _, _ in picked]))
        answers.append([a for _, _, a, _ in picked])
        kinds.append([k for k, _, _, _ in picked])
    return Calibration("mixed", contexts, answers, kinds, dict(seed=seed, length=length))


# -----------------------------------------------------------------------------
# documents: the project's default protocol, the calibration of the shipped SmolLM2 tables


def documents(seed, length, tokenizer, n_contexts=8, n_questions=8):
    """Documents about people (ruler.person_document) under a rule line, n_questions of their questions (one drawn
    per document): the calibration of the shipped SmolLM2 tables, token for token (tests/test_calibration.py)."""
    contexts, answers = [], []
    for c in range(n_contexts):
        rng = random.Random(f"calibration-{seed}/{c}")
        people = rng.sample([f"{a} {b}" for a in tasks.NAMES for b in ruler.SURNAMES], 200)
        docs, questions, n_tokens = [], [], 0
        for p in people:
            text, qs = ruler.person_document(random.Random(f"calibration-{seed}/{c}/{p}"), p)
            doc = f"Document {len(docs) + 1}:\n{text}\n\n"
            n_tokens += count_tokens(tokenizer, doc)
            if n_tokens > length - 40:
                break
            docs.append(doc)
            questions.append(rng.choice(qs))  # (question, answer): the oracle reads the question
        picked = rng.sample(questions, min(n_questions, len(questions)))
        rule = "Answer the question based on the given documents. Only give me the answer."
        contexts.append((f"{rule}\n\nThe following are given documents.\n\n" + "".join(docs), [q for q, _ in picked]))
        answers.append([a for _, a in picked])
    return Calibration("documents", contexts, answers, None, dict(seed=seed, length=length))


# -----------------------------------------------------------------------------
# protocols: how each set is used, fixed per protocol


@dataclass(frozen=True)
class Protocol:
    maker: Callable  # (seed, length, tokenizer) -> Calibration
    horizon: int  # answer tokens the model generates at most: the oracle's future after the question
    temperature: float  # 0.0: greedy
    answer_only: bool  # the oracle's future is the answer alone (the official code's), not question + answer
    question_format: str  # how a question and its answer cue follow the context ({q})
    protected: dict  # scorer -> (sink, window) that every head keeps while profiling
    snap_window: int  # SnapKV: the last context positions that observe
    snap_kernel: int  # SnapKV: pooling width
    snap_pool: str  # SnapKV: "max" or "avg"


# Every protocol prefills raw text (no chat template) and ends an answer at the model's end of text or turn,
# as the official code (model.generate) does and as this project always did.
PAPER_PROTECTED = {"expected_attention": (4, 1), "keydiff": (4, 1), "snapkv": (4, 32)}  # step1 + generate_curve.sh
PROJECT_SCORERS = ("snapkv", "keydiff", "knorm", "streaming", "expected_attention", "oracle")  # lukv.SCORERS
PROTOCOLS = {
    # the official run: one story raw, the model's 64 sampled tokens, SnapKV's 32-token window max-pooled by 7
    "paper": Protocol(story, horizon=64, temperature=0.7, answer_only=True, question_format=PLAIN_QUESTION,
                      protected=PAPER_PROTECTED, snap_window=32, snap_kernel=7, snap_pool="max"),
    # ours, used as the paper's: the answers are short facts, so 32 sampled tokens hold the answer and a
    # sentence after it at half the paper's decode cost; 0.7 and the paper's sink/window, comparable with it
    "mixed": Protocol(mixed, horizon=32, temperature=0.7, answer_only=True, question_format=PLAIN_QUESTION,
                      protected=PAPER_PROTECTED, snap_window=32, snap_kernel=7, snap_pool="max"),
    # the project's protocol until now: greedy answers of at most 16 tokens, question + answer as the future, 4:16
    "documents": Protocol(documents, horizon=16, temperature=0.0, answer_only=False,
                          question_format="Question: {q}\nAnswer:", protected={s: (4, 16) for s in PROJECT_SCORERS},
                          snap_window=16, snap_kernel=5, snap_pool="avg"),
}


# -----------------------------------------------------------------------------
# a user's text: contexts cut from its token stream, the continuation as the one "question"


def read_documents(path):
    """The text of a file, or of every file in a folder (sorted, recursive, hidden ones skipped)."""
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = sorted(os.path.join(root, name) for root, dirs, names in os.walk(path) for name in names)
        paths = [p for p in paths if not any(part.startswith(".") for part in os.path.relpath(p, path).split(os.sep))]
    else:
        raise FileNotFoundError(f"no text file or folder at {path!r}")
    if not paths:
        raise ValueError(f"the folder {path} holds no files; expected plain-text files")
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not UTF-8 text; give a folder of plain-text files") from None


def generated_prose(seed=0, n_words=400):
    """An endless stream of tasks.py's prose documents (text to calibrate on when none is given)."""
    rng = random.Random(f"calibration-text-{seed}")
    while True:
        yield " ".join(tasks.prose_sentences(rng, n_words)[0])


def text_contexts(tokenizer, documents, n_contexts, length, horizon):
    """Up to n_contexts (context ids, [continuation ids]) of length and horizon tokens, cut in order from the
    documents' token stream (documents joined by a blank line): the text's own continuation is the question."""
    if length < 1 or horizon < 1 or n_contexts < 1:
        raise ValueError(f"expected length, horizon and n_contexts >= 1, got {length}, {horizon}, {n_contexts}")
    need, stream, contexts, seen = length + horizon, [], [], 0
    for doc in documents:
        ids = tokenizer.encode_ordinary(doc + "\n\n")
        stream += ids
        seen += len(ids)
        while len(stream) >= need and len(contexts) < n_contexts:
            contexts.append((stream[:length], [stream[length:need]]))
            stream = stream[need:]
        if len(contexts) == n_contexts:
            break
    if not contexts:
        raise ValueError(f"the text has {seen} tokens, but one calibration context needs {need} "
                         f"(length {length} + horizon {horizon}); give more text or a smaller length")
    return contexts


# -----------------------------------------------------------------------------
# files: one JSON object per line, {"context": str, "questions": [str, ...]} (+ "answers", "kinds")

EXPECTED_LINE = 'a JSON object {"context": str, "questions": [str, ...]} (optional "answers": [str, ...])'


def line_problem(obj):
    """What is wrong with one parsed line, or None."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not isinstance(obj.get("context"), str):
        return 'no "context" string'
    if not isinstance(obj.get("questions"), list) or not obj["questions"]:
        return 'no "questions" list' if not isinstance(obj.get("questions"), list) else "an empty questions list"
    if not all(isinstance(q, str) and q for q in obj["questions"]):
        return "a question that is not a non-empty string"
    for key in ("answers", "kinds"):  # optional, one string per question
        if key in obj and not (isinstance(obj[key], list) and len(obj[key]) == len(obj["questions"])
                               and all(isinstance(x, str) for x in obj[key])):
            return f'"{key}" that is not a list of strings, one per question'
    return None


def read_calibration_file(path):
    """A JSONL calibration file (the official novel.jsonl's format) as a Calibration; blank lines are skipped."""
    contexts, answers, kinds = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); expected {EXPECTED_LINE}") from None
            problem = line_problem(obj)
            if problem:
                raise ValueError(f"{path}, line {n}: got {problem}; expected {EXPECTED_LINE}")
            contexts.append((obj["context"], obj["questions"]))
            answers.append(obj.get("answers"))
            kinds.append(obj.get("kinds"))
    if not contexts:
        raise ValueError(f"{path} holds no calibration contexts; expected one line per context, {EXPECTED_LINE}")
    return Calibration(os.path.basename(path), contexts, answers if any(answers) else None,
                       kinds if any(kinds) else None, dict(path=path))


def write_calibration_file(path, calibration):
    """Write a Calibration as JSONL, atomically (solver.write_atomic)."""
    lines = []
    for i, (context, questions) in enumerate(calibration.contexts):
        obj = {"context": context, "questions": list(questions)}
        for key in ("answers", "kinds"):
            if getattr(calibration, key) and getattr(calibration, key)[i] is not None:
                obj[key] = list(getattr(calibration, key)[i])
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    solver.write_atomic(path, lambda f: f.write("".join(lines).encode("utf-8")))


# -----------------------------------------------------------------------------
# the command line

MIN_LENGTH = 256  # below this not even one mixed text and its question fit (the story needs about 1,000)

def parse(argv=None):
    """(parser, args), every argument checked before any work."""
    parser = tasks.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", default="paper", choices=list(PROTOCOLS))
    parser.add_argument("--length", type=int, default=4096, help=f"tokens of a context plus one question (>= {MIN_LENGTH})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=os.path.join(tasks.ROOT, "checkpoints", "tiny.tiktoken"),
                        help="a tiktoken rank file (default: the shipped tiny tokenizer)")
    parser.add_argument("--show", action="store_true", help="print every context, its questions and answers")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl", help="write it as read_calibration_file reads")
    args = parser.parse_args(argv)
    tasks.check_range(parser, "--length", args.length, MIN_LENGTH)
    if not os.path.isfile(args.tokenizer):
        parser.error(f"--tokenizer {args.tokenizer}: no such rank file")
    if args.out:
        tasks.check_output(parser, args.out, ".jsonl")
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    tokenizer = tasks.load_tokenizer(args.tokenizer)
    try:
        cal = PROTOCOLS[args.protocol].maker(args.seed, args.length, tokenizer)
    except ValueError as e:
        parser.error(str(e))
    for i, (context, questions) in enumerate(cal.contexts):
        if args.show:
            print(context)
        print(f"[{cal.name} context {i}: {count_tokens(tokenizer, context)} tokens, {len(questions)} questions]")
        answers = cal.answers[i] if cal.answers else [None] * len(questions)
        kinds = cal.kinds[i] if cal.kinds else [""] * len(questions)
        for q, a, k in zip(questions, answers, kinds) if args.show else []:
            print(f"  ({k}) {q} -> {a}")
    if args.out:
        write_calibration_file(args.out, cal)
        print(f"wrote {args.out}")
