"""Synthetic English-like documents in families of near-duplicates, for the offline toy world.

A family shares a topic: its own few names, places, nouns and verbs, and a base document of
template sentences. Each member keeps most of the base sentences and rewrites the rest from the
family's words, so members of one family are each other's nearest neighbours in embedding space
(what data_prep's retain-set step needs), while families differ from each other. Everything is
drawn from one ``random.Random(seed)``: the same seed gives the same corpus.
"""

from __future__ import annotations

import random

NAMES = (
    "Alice Bruno Carmen Dmitri Elena Farid Greta Hiro Ines Jonas Keiko Lars Maya Nadia Oscar "
    "Priya Quentin Rosa Samir Tomas Uma Viktor Wanda Yusuf Zoe Anton Beatrix Cyrus Delia Emil "
    "Freya Gustav Helena Igor Julia Kofi Lena Marco Nina Otto Paula Rafael Sofia Theo Vera"
).split()
PLACES = (
    "Lisbon Oslo Nairobi Kyoto Quebec Dublin Lima Cairo Helsinki Porto Geneva Hanoi Austin Perth "
    "Bergen Seville Krakow Tallinn Valparaiso Marrakesh Auckland Ghent Bologna Salzburg Tromso "
    "Cusco Zanzibar Reykjavik Tbilisi Yerevan Lyon Turin Leeds Bristol Halifax Denver Tucson"
).split()
NOUNS = (
    "river garden library engine harbor market bridge tower forest island museum orchard "
    "factory village castle station theater valley canal meadow school hospital kitchen "
    "workshop lighthouse vineyard bakery observatory archive council committee festival "
    "journal survey project budget report network system program platform database server "
    "license module package compiler kernel driver protocol sensor battery satellite telescope "
    "glacier volcano desert canyon reef lagoon prairie tundra marsh delta plateau summit "
    "harvest recipe painting novel symphony concert sculpture portrait manuscript chronicle"
).split()
ADJECTIVES = (
    "quiet ancient modern bright narrow broad famous hidden northern southern eastern western "
    "busy remote coastal rural urban fragile sturdy curious careful generous patient restless "
    "silent golden silver crimson emerald dusty frozen humid windy sunny stormy gentle vast "
    "tiny sudden gradual rare common formal informal public private local global"
).split()
VERBS = (
    "built visited repaired described measured painted studied designed opened closed moved "
    "restored mapped recorded photographed explored funded managed planned tested published "
    "reviewed translated archived replaced expanded protected observed collected shared "
    "announced launched questioned celebrated defended inspected improved renamed"
).split()
TIMES = (
    "in the spring of 1998|last winter|during the war|after the long drought|in early March|"
    "before the election|every summer|in the autumn of 2011|at dawn|late one evening|"
    "over three decades|in the following years|shortly after midnight|in the nineteenth century"
).split("|")
CONNECTIVES = ("However", "Meanwhile", "Later", "In fact", "As a result", "Still", "Then",
               "Afterwards", "Even so", "Eventually")

TEMPLATES = (
    "{name} {verb} the {adj} {noun} near {place} {time}.",
    "The {noun} in {place} was {verb} by {name} {time}.",
    "{conn}, {name} {verb} a {adj} {noun2} beside the {noun}.",
    "Nobody in {place} had {verb} the {noun} since {name} arrived.",
    "According to {name}, the {adj} {noun} of {place} is older than the {noun2}.",
    "{conn}, the {adj} {noun2} was {verb} and the {noun} was left to {name}.",
    "\"We {verb} the {noun} together,\" {name} said, \"and the {noun2} will follow.\"",
    "{name} wrote that the {noun} near {place} looked {adj} {time}.",
    "The {adj} {noun} and the {adj2} {noun2} were {verb} by the people of {place}.",
    "{conn}, a report on the {noun} was {verb} by {name} and {name2}.",
    "In {place}, {name2} {verb} the {noun2} while {name} waited by the {noun}.",
    "The story of the {adj} {noun} is told in {place} {time}.",
    "By {year}, {num} {noun}s had been {verb} in {place}.",
    "{name} counted {num} {adj} {noun2}s and {num2} {noun}s {time}.",
    "The {noun} cost {num} dollars in {year}, {name2} recalled.",
    "Section {num2} of the {noun2} notes that {name} {verb} it in {year}.",
)


def _family_vocab(rng: random.Random) -> dict[str, list[str]]:
    return {
        "name": rng.sample(NAMES, 4),
        "place": rng.sample(PLACES, 3),
        "noun": rng.sample(NOUNS, 10),
        "adj": rng.sample(ADJECTIVES, 8),
        "verb": rng.sample(VERBS, 8),
        "time": rng.sample(TIMES, 5),
    }


def _sentence(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    template = rng.choice(TEMPLATES)
    nouns = rng.sample(vocab["noun"], 2)
    names = rng.sample(vocab["name"], 2)
    adjs = rng.sample(vocab["adj"], 2)
    return template.format(
        name=names[0], name2=names[1], place=rng.choice(vocab["place"]), noun=nouns[0],
        noun2=nouns[1], adj=adjs[0], adj2=adjs[1], verb=rng.choice(vocab["verb"]),
        time=rng.choice(vocab["time"]), conn=rng.choice(CONNECTIVES),
        num=rng.randint(2, 9999), num2=rng.randint(2, 99), year=rng.randint(1800, 2023),
    )


def generate_families(
    num_docs: int, family_size: int, seed: int, sentences_per_doc: int = 16, keep: float = 0.65
) -> list[tuple[int, str]]:
    """``num_docs`` (family index, text) pairs; each text is long enough for 200 GPT-2 tokens."""
    rng = random.Random(seed)
    docs: list[tuple[int, str]] = []
    family = 0
    while len(docs) < num_docs:
        vocab = _family_vocab(rng)
        base = [_sentence(rng, vocab) for _ in range(sentences_per_doc)]
        for _ in range(min(family_size, num_docs - len(docs))):
            sentences = [s if rng.random() < keep else _sentence(rng, vocab) for s in base]
            # Paragraph breaks in different places so members differ in layout too.
            text = ""
            for s in sentences:
                sep = "" if not text else ("\n\n" if rng.random() < 0.15 else " ")
                text += sep + s
            docs.append((family, text))
        family += 1
    return docs
