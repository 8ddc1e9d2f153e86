"""The 15 downstream tasks: their hub defaults, local file names, schemas and prompt building.

Each task turns one row of its data (in the Hugging Face hub schema, which the local files
share) into one example:

* ``choice``: a :class:`ChoiceExample` (context, choices, gold index), scored by the summed
  log-probability of each choice's tokens after the context;
* ``lambada``: a :class:`LambadaExample` (context, target word);
* ``dialog``: a :class:`DialogExample` (transcript prompt, true reply);
* ``perplexity``: a text; the texts are joined with "\\n\\n" before scoring.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .text import dialog_prompt, parse_math_qa_options, split_lambada, split_winogrande

CHOICE, LAMBADA, DIALOG, PERPLEXITY = "choice", "lambada", "dialog", "perplexity"


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, loaded with ``datasets.load_dataset``."""

    repo: str
    config: Optional[str] = None
    split: str = "validation"
    revision: Optional[str] = None

    def describe(self) -> str:
        text = self.repo
        if self.config:
            text += f":{self.config}"
        text += f"@{self.split}"
        if self.revision:
            text += f"#{self.revision}"
        return text


@dataclass(frozen=True)
class ChoiceExample:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class LambadaExample:
    context: str
    target: str


@dataclass(frozen=True)
class DialogExample:
    prompt: str
    reply: str


Example = Union[ChoiceExample, LambadaExample, DialogExample, str]
# A required column, or a tuple of alternatives of which one must be present.
ColumnSpec = Union[str, tuple[str, ...]]


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    columns: tuple[ColumnSpec, ...]
    build: Callable[[dict], Optional[Example]]
    hub: Optional[HubSource]
    aliases: tuple[str, ...] = ()
    note: str = ""

    def missing_columns(self, present: Sequence[str]) -> list[str]:
        """The required columns (or "a or b" alternatives) that ``present`` lacks."""
        have = set(present)
        missing = []
        for spec in self.columns:
            options = (spec,) if isinstance(spec, str) else spec
            if not any(col in have for col in options):
                missing.append(" or ".join(repr(c) for c in options))
        return missing

    def schema(self) -> str:
        return ", ".join(c if isinstance(c, str) else "/".join(c) for c in self.columns)


# ------------------------------------------------------------------------------ value helpers


def as_structure(value: Any) -> Any:
    """Lists and dicts as plain Python objects, whatever file format carried them.

    Parquet (through pandas) gives numpy arrays; CSV gives their text form (JSON or a Python
    literal).
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "{"):
            try:
                value = json.loads(text)
            except ValueError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise ValueError(f"cannot parse {text[:60]!r}... as a list or dict") from None
    # Strings nested inside are data (a HellaSwag ending may start with "["), not encodings.
    if isinstance(value, dict):
        return {k: v if isinstance(v, str) else as_structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, str) else as_structure(v) for v in value]
    return value


def as_list(value: Any, what: str) -> list:
    value = as_structure(value)
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return value


def as_text(value: Any, what: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        raise ValueError(f"{what} is empty")
    return str(value)


def label_index(value: Any, n: int, what: str, base: int = 0) -> int:
    """An integer label in [base, base + n) as a 0-based index."""
    try:
        index = int(str(value).strip()) - base
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None
    if not 0 <= index < n:
        raise ValueError(f"{what} {value!r} is out of range (expected {base}..{base + n - 1})")
    return index


# ---------------------------------------------------------------------------------- builders


def _piqa(row: dict) -> ChoiceExample:
    return ChoiceExample(
        as_text(row["goal"], "goal"),
        (" " + as_text(row["sol1"], "sol1"), " " + as_text(row["sol2"], "sol2")),
        label_index(row["label"], 2, "label"),
    )


def _hellaswag(row: dict) -> ChoiceExample:
    endings = [str(e) for e in as_list(row["endings"], "endings")]
    if len(endings) < 2:
        raise ValueError("endings needs at least two entries")
    return ChoiceExample(
        as_text(row["ctx"], "ctx"),
        tuple(" " + e for e in endings),
        label_index(row["label"], len(endings), "label"),
    )


def _winogrande(row: dict) -> ChoiceExample:
    context, choices = split_winogrande(
        as_text(row["sentence"], "sentence"),
        as_text(row["option1"], "option1"),
        as_text(row["option2"], "option2"),
    )
    return ChoiceExample(context, tuple(choices), label_index(row["answer"], 2, "answer", base=1))


def _copa(row: dict) -> ChoiceExample:
    return ChoiceExample(
        as_text(row["premise"], "premise"),
        (" " + as_text(row["choice1"], "choice1"), " " + as_text(row["choice2"], "choice2")),
        label_index(row["label"], 2, "label"),
    )


def _arc(row: dict) -> ChoiceExample:
    choices = as_structure(row["choices"])
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise ValueError("choices must be a dict with 'text' and 'label' lists")
    texts = [str(t) for t in choices["text"]]
    labels = [str(l).strip() for l in choices["label"]]
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return ChoiceExample(as_text(row["question"], "question"), tuple(" " + t for t in texts), labels.index(key))


def _math_qa(row: dict) -> ChoiceExample:
    options = parse_math_qa_options(as_text(row["options"], "options"))
    correct = str(row["correct"]).strip().lower()
    if correct not in "abcde" or len(correct) != 1:
        raise ValueError(f"correct {row['correct']!r} is not one of a, b, c, d, e")
    return ChoiceExample(
        as_text(row["Problem"], "Problem"), tuple(" " + o for o in options), "abcde".index(correct)
    )


PUBMED_ANSWERS = ("yes", "maybe", "no")


def pubmed_abstract(row: dict) -> str:
    """The abstract text: the ``abstract`` column of the reference's CSV, or the hub's
    ``context["contexts"]`` paragraphs joined with spaces."""
    abstract = row.get("abstract")
    if isinstance(abstract, str) and abstract.strip():
        return abstract
    context = row.get("context")
    try:
        context = as_structure(context)
    except ValueError:
        context = None
    if isinstance(context, dict) and "contexts" in context:
        return " ".join(str(c) for c in context["contexts"])
    raise ValueError("no abstract: need an 'abstract' column or a 'context' dict with 'contexts'")


def _pubmed_qa(row: dict) -> ChoiceExample:
    decision = str(row["final_decision"]).strip().lower()
    if decision not in PUBMED_ANSWERS:
        raise ValueError(f"final_decision {row['final_decision']!r} is not yes, maybe or no")
    context = (
        f"Context: {pubmed_abstract(row)}\nQuestion: {as_text(row['question'], 'question')}\nAnswer:"
    )
    return ChoiceExample(context, tuple(" " + a for a in PUBMED_ANSWERS), PUBMED_ANSWERS.index(decision))


def _lambada(row: dict) -> LambadaExample:
    context, target = split_lambada(as_text(row["text"], "text"))
    return LambadaExample(context, target)


def _dialog(row: dict) -> Optional[DialogExample]:
    turns = [str(t) for t in as_list(row["text"], "text (the list of turns)")]
    built = dialog_prompt(turns)
    return None if built is None else DialogExample(*built)


def _text(row: dict) -> str:
    value = row["text"]
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


# ------------------------------------------------------------------------------ the registry

_DIALOG_NOTE = "local only: the reference's dialog JSON {\"text\": {idx: [turn, ...]}}"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("lambada", LAMBADA, ("text",), _lambada,
             HubSource("EleutherAI/lambada_openai", "default", "test")),
        Task("hellaswag", CHOICE, ("ctx", "endings", "label"), _hellaswag,
             HubSource("Rowan/hellaswag", None, "validation")),
        Task("winogrande", CHOICE, ("sentence", "option1", "option2", "answer"), _winogrande,
             HubSource("allenai/winogrande", "winogrande_s", "validation"), ("winogrande_s",)),
        Task("copa", CHOICE, ("premise", "choice1", "choice2", "label"), _copa,
             HubSource("aps/super_glue", "copa", "validation"), ("super_glue_copa",)),
        Task("arc_easy", CHOICE, ("question", "choices", "answerKey"), _arc,
             HubSource("allenai/ai2_arc", "ARC-Easy", "validation"), ("ARC-Easy",)),
        Task("arc_challenge", CHOICE, ("question", "choices", "answerKey"), _arc,
             HubSource("allenai/ai2_arc", "ARC-Challenge", "validation"), ("ARC-Challenge",)),
        Task("piqa", CHOICE, ("goal", "sol1", "sol2", "label"), _piqa,
             HubSource("ybisk/piqa", None, "validation", "refs/convert/parquet")),
        Task("math_qa", CHOICE, ("Problem", "options", "correct"), _math_qa,
             HubSource("regisss/math_qa", None, "validation"), ("mathqa",)),
        Task("pubmed_qa", CHOICE, ("question", "final_decision", ("abstract", "context")), _pubmed_qa,
             HubSource("qiaojin/PubMedQA", "pqa_labeled", "train")),
        Task("wizard_of_wikipedia", DIALOG, ("text",), _dialog, None, note=_DIALOG_NOTE),
        Task("empathetic_dialogues", DIALOG, ("text",), _dialog, None, note=_DIALOG_NOTE),
        Task("blended_skill_talk", DIALOG, ("text",), _dialog, None, note=_DIALOG_NOTE),
        Task("wizard_of_internet", DIALOG, ("text",), _dialog, None, note=_DIALOG_NOTE),
        Task("wikitext", PERPLEXITY, ("text",), _text,
             HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test")),
        Task("pile", PERPLEXITY, ("text",), _text, None,
             note="local only: the reference's 1500-text Pile sample (pile.csv)"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# valid_result.csv: one column per task in this order, then lambada's extra numbers (new ones
# go last, so the first columns stay those of the reference's file).
EXTRA_COLUMNS = {"lambada": ("lambada_loss", "lambada_f1", "lambada_acc_exact")}
