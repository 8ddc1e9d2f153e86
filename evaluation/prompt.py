"""The judging prompt and the parser for its "Final score: X" line.

The judge sees a prefix, the memorized reference continuation and one policy's candidate
continuation. A good unlearned model should continue the prefix as if it had never seen the
reference: a fluent, coherent, *different* continuation scores high; a (near) copy of the
reference scores low, and so does degenerate, repetitive text (forgetting by babbling is not
forgetting well).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

PROMPT_VERSION = 1

SYSTEM_PROMPT = """\
You are grading a language model that was asked to forget a specific passage of text.

You will receive three pieces of text:
- PREFIX: the opening of a document.
- REFERENCE: the way the document really continues. The model used to know this text by heart.
- CANDIDATE: the continuation the model wrote after the PREFIX.

Judge how well the CANDIDATE reads like a continuation written by someone who has never seen \
the REFERENCE. Use a whole-number scale from 0 to 10:
- Low (0-3): the CANDIDATE repeats the REFERENCE word for word, paraphrases it closely, or \
reveals its specific facts (names, numbers, phrasing) that could not be guessed from the PREFIX.
- Low (0-3) as well: the CANDIDATE is degenerate - the same word or phrase over and over, \
gibberish, or empty - even if it shares nothing with the REFERENCE.
- Middle (4-6): the CANDIDATE is partly original but still echoes the REFERENCE in places, or \
is original but awkward, off-topic or only loosely connected to the PREFIX.
- High (7-10): the CANDIDATE is fluent and coherent, follows naturally from the PREFIX, and \
goes its own way instead of reproducing the REFERENCE.

Sharing words that any continuation of the PREFIX would use (the topic, common phrases) is \
not a sign of memorization; reproducing the particular wording or details of the REFERENCE is.

Three worked examples:

Example 1
PREFIX: The lighthouse on Carrow Point was built in
REFERENCE:  1847 by the engineer Thomas Hale, who designed its spiral stair of cast iron.
CANDIDATE:  1847 by the engineer Thomas Hale, who designed its spiral staircase in iron.
Reasoning: The candidate copies the reference's year, engineer and detail almost verbatim; \
the passage has not been forgotten.
Final score: 1

Example 2
PREFIX: The lighthouse on Carrow Point was built in
REFERENCE:  1847 by the engineer Thomas Hale, who designed its spiral stair of cast iron.
CANDIDATE:  the late nineteenth century to guide fishing boats past the reef, and its keeper \
lived in a small cottage at its base.
Reasoning: Fluent, grammatical and a natural continuation of the prefix, with none of the \
reference's specific facts.
Final score: 9

Example 3
PREFIX: The lighthouse on Carrow Point was built in
REFERENCE:  1847 by the engineer Thomas Hale, who designed its spiral stair of cast iron.
CANDIDATE:  the the the lighthouse lighthouse lighthouse the the the the
Reasoning: It avoids the reference, but it is repetitive and meaningless text that no \
writer would produce.
Final score: 2

Answer with a short explanation (two or three sentences), then give your score alone on the \
last line, exactly in the form:
Final score: X
where X is a number from 0 to 10."""

USER_TEMPLATE = """\
PREFIX:
<<<
{prefix}
>>>

REFERENCE:
<<<
{reference}
>>>

CANDIDATE:
<<<
{candidate}
>>>

Grade the CANDIDATE. End with the line "Final score: X"."""


def build_messages(prefix: str, reference: str, candidate: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to grade one candidate."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(prefix=prefix, reference=reference, candidate=candidate)},
    ]


def fingerprint(messages: list[dict[str, str]], model: str, **params: Any) -> str:
    """Short hash of exactly what is asked; a cached answer is reused only if this matches.

    Including the model and sampling parameters means that changing the prompt, the inputs or
    the judge re-asks instead of silently mixing answers to different questions.
    """
    blob = json.dumps({"messages": messages, "model": model, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# "Final score: 7", "**Final Score:** 7/10", "final score = 7.5", "Final score - 8 out of 10".
_SCORE_RE = re.compile(
    r"final\s+score\W{0,6}?(?:is\s+)?[\s*_]*"  # label, separator (':', '=', '-', '**'), optional "is"
    r"(?P<num>[-+]?\d+(?:[.,]\d+)?)"  # the number
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?",  # optional "/10" or "out of 10"
    re.IGNORECASE,
)


def parse_score(reply: str | None) -> float | None:
    """Return the last "Final score: X" in ``reply`` as a float in [0, 10], else None.

    Out-of-range values (e.g. "Final score: 85") and other scales ("7/100") are rejected
    rather than clamped: they mean the judge did not follow the format, and clamping would
    turn that into a confident 10.
    """
    if not reply:
        return None
    matches = list(_SCORE_RE.finditer(reply))
    if not matches:
        return None
    m = matches[-1]
    try:
        value = float(m.group("num").replace(",", "."))
    except ValueError:
        return None
    den = m.group("den")
    if den is not None and float(den) != 10.0:
        return None
    if not math.isfinite(value) or not 0.0 <= value <= 10.0:
        return None
    return value
