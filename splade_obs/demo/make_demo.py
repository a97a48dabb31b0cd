"""Write the bundled demo training set (train.jsonl, val.jsonl) from hand-written templates.

Why synthetic: the quickstart must train without downloads or third-party data licences. Every record is
made up here about a fictional world (invented cities, devices, dishes, animals and festivals), so the
files are the project's own work (Apache-2.0). The queries share real words with their positive passage
(the entity's name and the asked-about fact), so a SPLADE model can learn the task in a few hundred
steps; the two hard negatives share the topic but not the answer: one is the same fact about another
entity of the same kind, the other is another fact about the same entity.

It also writes a small BEIR-shaped retrieval set (``retrieval/``: ``corpus.jsonl``, ``queries.jsonl``,
``qrels/test.tsv``) that the quickstart evaluates at its end (nDCG@10, MRR@10): one short document per fact
of fresh entities (the fact's sentence and the entity's intro), one query per fact of some of them (its
document is the one relevant answer), the other entities' documents as distractors.

Deterministic: ``python -m splade_obs.demo.make_demo`` rewrites byte-identical files (seeded RNG).
Train, validation and the retrieval set use disjoint entities.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED = 20240917
NUM_TRAIN = 400
NUM_VAL = 60
#: Retrieval set: entities asked about (about 4 queries each) and entities that only add distractor documents.
NUM_EVAL_QUERIED = 24
NUM_EVAL_DISTRACTORS = 36
HERE = Path(__file__).resolve().parent

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t",
           "th", "tr", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]


def invent_name(rng: random.Random, taken: set[str], syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up proper name, unique within this generation run."""
    while True:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        if 4 <= len(word) <= 11 and word not in taken:
            taken.add(word)
            return word.capitalize()


# Each kind of entity: how to draw its attributes, and per fact: query phrasings and a passage sentence.
@dataclass
class Fact:
    queries: list[str]
    sentence: str


@dataclass
class Kind:
    name: str
    draw: Callable[[random.Random, set[str]], dict[str, str]]
    intro: str  # a sentence that every passage about the entity may open with
    facts: dict[str, Fact]


def _city(rng: random.Random, taken: set[str]) -> dict[str, str]:
    return {
        "name": invent_name(rng, taken),
        "region": invent_name(rng, taken),
        "river": invent_name(rng, taken, (2, 2)),
        "year": str(rng.randint(780, 1890)),
        "product": rng.choice(["blue glass", "copper bells", "felt hats", "salt cod", "paper lanterns",
                               "clockwork toys", "river pearls", "wool carpets", "cherry brandy", "slate tiles"]),
        "people": f"{rng.randint(12, 950)},{rng.randint(100, 999)}",
        "landmark": rng.choice(["a leaning lighthouse", "a floating market", "a bridge of ninety arches",
                                "a library carved into a cliff", "a clock tower with four faces",
                                "an underground canal", "a garden of stone trees"]),
    }


def _device(rng: random.Random, taken: set[str]) -> dict[str, str]:
    kind = rng.choice(["kettle", "desk lamp", "camera drone", "bicycle pump", "pocket radio", "e-reader",
                       "coffee grinder", "weather station", "sewing machine", "label printer"])
    return {
        "name": f"{invent_name(rng, taken)} {rng.choice('ABKMRTVXZ')}{rng.randint(2, 99)}",
        "kind": kind,
        "maker": invent_name(rng, taken) + rng.choice([" Works", " Instruments", " Labs", " & Sons"]),
        "battery": str(rng.randint(3, 60)),
        "weight": str(rng.randint(90, 4800)),
        "feature": rng.choice(["a solar charging panel", "a magnetic stand", "a waterproof shell",
                               "voice control", "a hand crank for power cuts", "a color e-ink dial",
                               "a detachable cable", "a silent mode"]),
    }


def _dish(rng: random.Random, taken: set[str]) -> dict[str, str]:
    ingredient = rng.choice(["quince", "lentil", "chestnut", "barley", "smoked eel", "wild garlic",
                             "pumpkin", "goat cheese", "sorrel", "black radish", "apricot", "millet"])
    return {
        "name": f"{invent_name(rng, taken)} {ingredient} {rng.choice(['dumplings', 'stew', 'pie', 'soup', 'flatbread', 'pudding'])}",
        "ingredient": ingredient,
        "minutes": str(rng.choice([15, 20, 25, 30, 40, 45, 50, 60, 75, 90, 120, 180])),
        "origin": invent_name(rng, taken),
        "spice": rng.choice(["juniper", "caraway", "star anise", "sumac", "fenugreek", "long pepper",
                             "dried lime", "mustard seed", "smoked paprika", "cardamom"]),
        "occasion": rng.choice(["weddings", "the first frost", "harvest markets", "long sea voyages",
                                "midwinter night", "children's birthdays", "funerals"]),
    }


def _species(rng: random.Random, taken: set[str]) -> dict[str, str]:
    animal = rng.choice(["heron", "newt", "marmot", "moth", "salamander", "finch", "otter", "beetle",
                         "tortoise", "bat"])
    return {
        "name": f"{invent_name(rng, taken)} {animal}",
        "animal": animal,
        "habitat": rng.choice(["salt marshes", "limestone caves", "pine forests", "high meadows",
                               "mangrove swamps", "volcanic islands", "desert canyons", "glacier lakes"]),
        "diet": rng.choice(["snails", "moss", "fallen figs", "water fleas", "grasshoppers", "lichen",
                            "night-blooming flowers", "small crabs"]),
        "years": str(rng.randint(2, 80)),
        "color": rng.choice(["copper", "slate grey", "ink blue", "pale green", "striped black and gold",
                             "speckled white", "rust red"]),
    }


def _festival(rng: random.Random, taken: set[str]) -> dict[str, str]:
    return {
        "name": f"the {invent_name(rng, taken)} Festival",
        "month": rng.choice(["January", "February", "March", "April", "May", "June", "July", "August",
                             "September", "October", "November", "December"]),
        "town": invent_name(rng, taken),
        "tradition": rng.choice(["racing wooden boats", "burning a straw giant", "painting every door yellow",
                                 "a night of silent lantern walks", "throwing oranges from balconies",
                                 "a contest of the loudest bells", "sharing bread with strangers"]),
        "days": str(rng.randint(1, 14)),
        "founder": invent_name(rng, taken) + " " + invent_name(rng, taken),
    }


KINDS = [
    Kind("city", _city, "{name} is a city in the region of {region}.", {
        "river": Fact(["which river flows through {name}", "river of the city {name}"],
                      "The river {river} flows through {name} and divides the old town from the harbour."),
        "founded": Fact(["when was the city {name} founded", "founding year of {name}"],
                        "{name} was founded in the year {year} by traders who settled on the banks of the {river}."),
        "known": Fact(["what is {name} famous for", "what product is {name} known for"],
                      "{name} is famous for its {product}, which the city has exported for centuries."),
        "population": Fact(["how many people live in {name}", "population of {name}"],
                           "About {people} people live in {name}, making it the largest city of {region}."),
        "landmark": Fact(["what landmark can you visit in {name}", "famous landmark of {name}"],
                         "Visitors to {name} come to see its landmark, {landmark}."),
    }),
    Kind("device", _device, "The {name} is a {kind} made by {maker}.", {
        "battery": Fact(["how long does the {name} battery last", "battery life of the {name} {kind}"],
                        "The battery of the {name} {kind} lasts about {battery} hours on a single charge."),
        "maker": Fact(["who makes the {name}", "which company builds the {name} {kind}"],
                      "The {name} {kind} is designed and built by {maker}."),
        "weight": Fact(["how much does the {name} weigh", "weight of the {name} {kind}"],
                       "The {name} {kind} weighs {weight} grams without its case."),
        "feature": Fact(["what special feature does the {name} have", "main feature of the {name} {kind}"],
                        "The special feature of the {name} {kind} is {feature}."),
    }),
    Kind("dish", _dish, "{name} is a traditional dish from {origin}.", {
        "time": Fact(["how long does it take to cook {name}", "cooking time for {name}"],
                     "Cooking {name} takes about {minutes} minutes, most of it spent simmering the {ingredient}."),
        "origin": Fact(["where does {name} come from", "origin of the dish {name}"],
                       "{name} comes from the town of {origin}, where it was first served at {occasion}."),
        "spice": Fact(["which spice is used in {name}", "what spice flavours {name}"],
                      "The spice that flavours {name} is {spice}, added just before the {ingredient} is done."),
        "occasion": Fact(["when is {name} eaten", "on what occasion do people eat {name}"],
                         "People eat {name} at {occasion}, served warm with bread."),
    }),
    Kind("species", _species, "The {name} is a {animal} found only in the fictional atlas.", {
        "habitat": Fact(["where does the {name} live", "habitat of the {name}"],
                        "The {name} lives in {habitat}, where it hides during the hottest hours."),
        "diet": Fact(["what does the {name} eat", "diet of the {name}"],
                     "The {name} eats mostly {diet}, which it hunts at dusk."),
        "lifespan": Fact(["how long does the {name} live", "lifespan of the {name}"],
                         "A {name} can live for {years} years in the wild."),
        "color": Fact(["what color is the {name}", "colour of the {name} {animal}"],
                      "The {name} is {color}, which keeps it hidden from larger animals."),
    }),
    Kind("festival", _festival, "{name} is held every year in the town of {town}.", {
        "month": Fact(["in which month is {name} held", "when does {name} take place"],
                      "{name} takes place in {month} and lasts {days} days."),
        "tradition": Fact(["what is the main tradition of {name}", "what do people do at {name}"],
                          "The main tradition of {name} is {tradition}."),
        "town": Fact(["where is {name} celebrated", "which town hosts {name}"],
                     "{name} is celebrated in the town of {town}, whose streets close to traffic for it."),
        "founder": Fact(["who founded {name}", "founder of {name}"],
                        "{name} was founded by {founder}, a local teacher, more than a century ago."),
    }),
]


def passage(kind: Kind, entity: dict[str, str], fact: str, rng: random.Random) -> str:
    """The fact's sentence, the entity's intro sentence, and one more fact about it as filler."""
    others = [f for f in kind.facts if f != fact]
    filler = kind.facts[rng.choice(others)].sentence
    sentences = [kind.facts[fact].sentence, kind.intro, filler]
    if rng.random() < 0.5:
        sentences[0], sentences[1] = sentences[1], sentences[0]
    text = " ".join(s.format(**entity) for s in sentences)
    return text[0].upper() + text[1:]


def make_records(entities: list[tuple[Kind, dict[str, str]]], rng: random.Random) -> list[dict]:
    """One record per (entity, fact) with two hard negatives: same fact elsewhere, other fact same entity."""
    by_kind: dict[str, list[dict[str, str]]] = {}
    for kind, ent in entities:
        by_kind.setdefault(kind.name, []).append(ent)
    records = []
    for kind, ent in entities:
        for fact_name, fact in kind.facts.items():
            query = rng.choice(fact.queries).format(**ent)
            other = rng.choice([e for e in by_kind[kind.name] if e is not ent])
            other_fact = rng.choice([f for f in kind.facts if f != fact_name])
            same_entity = " ".join([kind.facts[other_fact].sentence.format(**ent), kind.intro.format(**ent)])
            records.append({
                "query": query[0].upper() + query[1:] + "?",
                "positive": passage(kind, ent, fact_name, rng),
                "negatives": [passage(kind, other, fact_name, rng), same_entity[0].upper() + same_entity[1:]],
            })
    rng.shuffle(records)
    return records


def draw_entities(rng: random.Random, taken: set[str], *, records: int = 0,
                  count: int = 0) -> list[tuple[Kind, dict[str, str]]]:
    """Entities round-robin over the kinds: until they have ``records`` facts in all, or ``count`` of them."""
    entities: list[tuple[Kind, dict[str, str]]] = []
    facts = 0
    while facts < records or len(entities) < count:
        kind = KINDS[len(entities) % len(KINDS)]
        entities.append((kind, kind.draw(rng, taken)))
        facts += len(kind.facts)
    return entities


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


@dataclass
class Retrieval:
    corpus: list[dict]                    # {"_id", "title", "text"}
    queries: list[dict]                   # {"_id", "text"}
    qrels: list[tuple[str, str, int]]     # (query id, document id, relevance)


def make_retrieval(queried: list[tuple[Kind, dict[str, str]]], distractors: list[tuple[Kind, dict[str, str]]],
                   rng: random.Random) -> Retrieval:
    """One document per (entity, fact): the fact's sentence and the entity's intro; one query per fact of the
    ``queried`` entities, whose own document is its one relevant answer. Ids follow a shuffled order."""
    docs: list[tuple[str, int | None]] = []   # (text, index of the query it answers)
    questions: list[str] = []
    for asked, group in ((True, queried), (False, distractors)):
        for kind, ent in group:
            for fact in kind.facts.values():
                text = " ".join(_capital(s.format(**ent)) for s in (fact.sentence, kind.intro))
                if asked:
                    query = rng.choice(fact.queries).format(**ent)
                    questions.append(_capital(query) + "?")
                docs.append((text, len(questions) - 1 if asked else None))
    rng.shuffle(docs)
    query_order = list(range(len(questions)))
    rng.shuffle(query_order)
    qid = {q: f"q{n + 1:03d}" for n, q in enumerate(query_order)}
    corpus, qrels = [], []
    for n, (text, answers) in enumerate(docs):
        did = f"d{n + 1:04d}"
        corpus.append({"_id": did, "title": "", "text": text})
        if answers is not None:
            qrels.append((qid[answers], did, 1))
    queries = [{"_id": qid[q], "text": questions[q]} for q in query_order]
    return Retrieval(corpus, queries, sorted(qrels))


def generate(seed: int = SEED, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL
             ) -> tuple[list[dict], list[dict], Retrieval]:
    """Train, validation and retrieval sets from one seeded RNG; each draws its own entities."""
    rng = random.Random(seed)
    taken: set[str] = set()
    train = make_records(draw_entities(rng, taken, records=num_train), rng)[:num_train]
    val = make_records(draw_entities(rng, taken, records=num_val), rng)[:num_val]
    queried = draw_entities(rng, taken, count=NUM_EVAL_QUERIED)
    retrieval = make_retrieval(queried, draw_entities(rng, taken, count=NUM_EVAL_DISTRACTORS), rng)
    return train, val, retrieval


def write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    train, val, retrieval = generate(args.seed)
    (args.out_dir / "retrieval" / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out_dir / "train.jsonl")
    write_jsonl(val, args.out_dir / "val.jsonl")
    write_jsonl(retrieval.corpus, args.out_dir / "retrieval" / "corpus.jsonl")
    write_jsonl(retrieval.queries, args.out_dir / "retrieval" / "queries.jsonl")
    with open(args.out_dir / "retrieval" / "qrels" / "test.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{score}\n" for q, d, score in retrieval.qrels)
    print(f"wrote {len(train)} train and {len(val)} val records, and a retrieval set of {len(retrieval.queries)} "
          f"queries over {len(retrieval.corpus)} documents, to {args.out_dir}")


if __name__ == "__main__":
    main()
