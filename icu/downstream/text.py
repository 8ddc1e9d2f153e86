"""String handling for the downstream tasks: prompt pieces, normalisation and token F1.

Pure functions over strings, so the prompt construction can be tested without a model.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Optional, Sequence

DIALOG_STOP = "\nUser "

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 between the normalised prediction and reference.

    Two empty strings agree (1.0); one empty string against a non-empty one scores 0.0.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred)
    recall = common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------- dialogs

# " .my" / " ,really": the mark belongs to the word before, and a new word follows it.
_DETACHED_PUNCT = re.compile(r"\s+([.,!?;:])(?=[A-Za-z])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
# "colour.What" -> "colour. What"; lower-case before / upper-case after keeps "U.S." and
# "e.g." and "3.5" as they are.
_GLUED_SENTENCE = re.compile(r"(?<=[a-z])([.!?])(?=[A-Z])")
_GLUED_COMMA = re.compile(r"(?<=[A-Za-z]),(?=[A-Za-z])")
_SPLIT_CONTRACTION = re.compile(r"\s+(['\u2019](?:s|t|re|ve|ll|d|m)\b)", re.IGNORECASE)
_LONE_I = re.compile(r"(?<![\w'\u2019])i(?=$|[\s'\u2019,.!?;:])")
# A new sentence after a word of two or more lower-case letters or digits: "U.S. in" and
# "e.g. the" are left alone.
_SENTENCE_START = re.compile(r"(?<=[a-z0-9]{2})([.!?]\s+)([a-z])")
_FINAL = ".!?\"')\u201d\u2019"


def normalize_turn(turn: str) -> str:
    """Tidy one dialog turn: whitespace, spacing around punctuation, capitals, final period.

    Crowd-sourced dialog turns come with "colour.What", " ,", "i 'm" and no final stop; a
    model reads a cleaner transcript, and the reply it is compared with is tidied the same way.
    """
    text = " ".join(str(turn).split())
    if not text:
        return text
    text = _DETACHED_PUNCT.sub(r"\1 ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    text = _SPLIT_CONTRACTION.sub(r"\1", text)
    text = _GLUED_SENTENCE.sub(r"\1 ", text)
    text = _GLUED_COMMA.sub(", ", text)
    text = _LONE_I.sub("I", text)
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    text = text[0].upper() + text[1:]
    if text[-1] not in _FINAL:
        text += "."
    return text


def speaker_tag(index: int) -> str:
    """Turns alternate between "User 1" (even index) and "User 2" (odd index)."""
    return f"User {1 + index % 2}:"


def dialog_prompt(turns: Sequence[str]) -> Optional[tuple[str, str]]:
    """(prompt, reply) for a dialog: all turns but the last as a transcript, the last as reply.

    The prompt ends with the tag of the speaker of the held-out turn, so the model continues as
    that speaker. Returns None when fewer than two non-empty turns remain.
    """
    clean = [normalize_turn(t) for t in turns]
    clean = [t for t in clean if t]
    if len(clean) < 2:
        return None
    history, reply = clean[:-1], clean[-1]
    lines = [f"{speaker_tag(i)} {t}\n" for i, t in enumerate(history)]
    return "".join(lines) + speaker_tag(len(history)), reply


def cut_reply(generated: str, stop: str = DIALOG_STOP) -> str:
    """The generated reply up to the next speaker tag, without surrounding whitespace."""
    return generated.split(stop, 1)[0].strip()


# ---------------------------------------------------------------------- multiple choice pieces


def split_winogrande(sentence: str, option1: str, option2: str) -> tuple[str, list[str]]:
    """(context, choices) for a Winogrande sentence with a blank ``_``.

    The context is the text before " _"; each choice is " " + option + the text after the blank.
    """
    if " _" in sentence:
        before, after = sentence.split(" _", 1)
    elif "_" in sentence:  # a blank at the very start has no space before it
        before, after = sentence.split("_", 1)
        before = before.rstrip()
    else:
        raise ValueError(f"no blank '_' in the sentence {sentence!r}")
    return before, [f" {option1}{after}", f" {option2}{after}"]


_MATH_QA_LETTERS = "abcde"


def parse_math_qa_options(options: str) -> list[str]:
    """The five option texts of a MathQA ``options`` string.

    Handles "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these" and the
    list-looking variant "['a ) 38', 'b ) 27.675', ...]" some rows use. Commas inside an option
    ("1,200") are kept: an option ends only where the next letter marker starts.
    """
    text = str(options)
    starts: list[tuple[int, int]] = []  # (marker start, text start) per letter
    pos = 0
    for letter in _MATH_QA_LETTERS:
        marker = re.compile(rf"(?:^|(?<=[\s,\['\"]))\s*{letter}\s*\)\s*")
        m = marker.search(text, pos)
        if m is None:
            raise ValueError(f"option '{letter} )' not found in {options!r}")
        starts.append((m.start(), m.end()))
        pos = m.end()
    parsed = []
    for i, (_, begin) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        parsed.append(text[begin:end].strip(" ,[]'\""))
    return parsed


def split_lambada(text: str) -> tuple[str, str]:
    """(context, target): every word but the last, and " " + the last word."""
    body = str(text).rstrip()
    if " " not in body:
        raise ValueError("a LAMBADA passage needs at least two words")
    context, last = body.rsplit(" ", 1)
    return context, " " + last
