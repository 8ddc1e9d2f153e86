"""Running tasks on a scorer and writing ``valid_result.csv``.

A task's number (the CSV column of the same name):

* multiple choice (hellaswag, winogrande, copa, arc_easy, arc_challenge, piqa, math_qa,
  pubmed_qa): accuracy, the share of examples whose gold choice has the highest summed
  log-probability (ties go to the first choice);
* lambada: accuracy, an example counting when the greedy tokens equal the target's tokens or the
  decoded greedy tokens equal the target word after normalisation (a target that normalises to
  "" matches only by its tokens; an empty target never); ``lambada_acc_exact`` counts the token
  equality alone (lm-evaluation-harness's ``acc``); ``lambada_loss`` is the mean over examples
  of the target's mean token loss (nats), ``lambada_f1`` the mean token F1 of the decoded greedy
  tokens against the target;
* dialogs: mean token F1 of the generated reply against the true last turn;
* wikitext, pile: perplexity.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..errors import IcuError
from .scoring import BatchedScorer, PerplexityResult, TokenScore
from .sources import TaskData
from .tasks import CHOICE, DIALOG, EXTRA_COLUMNS, LAMBADA, PERPLEXITY, TASK_NAMES
from .text import normalize_answer, token_f1

logger = logging.getLogger("icu")


@dataclass(frozen=True)
class ChoiceOutcome:
    scores: tuple[float, ...]
    pred: int
    gold: int


@dataclass(frozen=True)
class LambadaOutcome:
    score: TokenScore
    prediction: str
    correct: bool  # exact, or the normalised words agree
    f1: float
    loss: float
    exact: bool = False  # the greedy tokens are the target's tokens


def lambada_match(score: TokenScore, prediction: str, target: str) -> tuple[bool, bool]:
    """(exact, correct) for one LAMBADA example; see the module docstring."""
    exact = bool(score.target) and score.is_greedy
    wanted = normalize_answer(target)
    return exact, exact or (wanted != "" and normalize_answer(prediction) == wanted)


@dataclass(frozen=True)
class DialogOutcome:
    generated: str
    reply: str
    f1: float


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    seconds: float = 0.0
    details: list[Any] = field(default_factory=list)
    error: Optional[str] = None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_task(
    data: TaskData,
    scorer: BatchedScorer,
    *,
    max_new_tokens: int = 32,
    ppl_stride: Optional[int] = None,
    progress: bool = False,
) -> TaskResult:
    """Score one task's examples; raises on failure (see :func:`run_suite` for isolation)."""
    name, family, examples = data.task.name, data.task.family, data.examples
    desc = name if progress else None
    result = TaskResult(name, examples=len(examples))
    if family == CHOICE:
        pairs = [(ex.context, choice) for ex in examples for choice in ex.choices]
        scores = scorer.loglikelihood(pairs, desc, greedy=False)
        pos = 0
        for ex in examples:
            values = tuple(s.logprob for s in scores[pos: pos + len(ex.choices)])
            pos += len(ex.choices)
            result.details.append(ChoiceOutcome(values, max(range(len(values)), key=values.__getitem__), ex.gold))
        result.metrics[name] = _mean([float(d.pred == d.gold) for d in result.details])
    elif family == LAMBADA:
        scores = scorer.loglikelihood([(ex.context, ex.target) for ex in examples], desc)
        for ex, score in zip(examples, scores):
            prediction = scorer.tokenizer.decode(list(score.greedy))
            exact, correct = lambada_match(score, prediction, ex.target)
            loss = -score.logprob / max(len(score.target), 1)
            result.details.append(
                LambadaOutcome(score, prediction, correct, token_f1(prediction, ex.target), loss, exact))
        result.metrics[name] = _mean([float(d.correct) for d in result.details])
        result.metrics["lambada_loss"] = _mean([d.loss for d in result.details])
        result.metrics["lambada_f1"] = _mean([d.f1 for d in result.details])
        result.metrics["lambada_acc_exact"] = _mean([float(d.exact) for d in result.details])
    elif family == DIALOG:
        generated = scorer.generate([ex.prompt for ex in examples], max_new_tokens, desc=desc)
        for ex, text in zip(examples, generated):
            result.details.append(DialogOutcome(text, ex.reply, token_f1(text, ex.reply)))
        result.metrics[name] = _mean([d.f1 for d in result.details])
    elif family == PERPLEXITY:
        ppl: PerplexityResult = scorer.perplexity(examples, stride=ppl_stride, desc=desc)
        result.details.append(ppl)
        result.metrics[name] = ppl.ppl
    else:  # pragma: no cover - the registry only holds the four families
        raise ValueError(f"unknown task family {family!r}")
    return result


def run_suite(
    datas: dict[str, TaskData],
    scorer: BatchedScorer,
    *,
    max_new_tokens: int = 32,
    ppl_stride: Optional[int] = None,
    progress: bool = False,
    on_result: Optional[Callable[[TaskResult], None]] = None,
) -> list[TaskResult]:
    """Evaluate every task; a task that raises is recorded with its error and the rest go on."""
    results = []
    for name, data in datas.items():
        start = time.perf_counter()
        try:
            result = evaluate_task(
                data, scorer, max_new_tokens=max_new_tokens, ppl_stride=ppl_stride, progress=progress
            )
        except Exception as exc:  # noqa: BLE001 - one task's failure must not cost the others
            result = TaskResult(name, examples=len(data.examples), error=f"{type(exc).__name__}: {exc}")
            logger.error("task %s failed: %s\n%s", name, result.error, traceback.format_exc().rstrip())
        result.seconds = time.perf_counter() - start
        if result.error is None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
            logger.info("task %s: %s (%d examples, %.1f s)", name, shown, result.examples, result.seconds)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def result_columns(names: Sequence[str]) -> list[str]:
    """valid_result.csv's columns for the chosen tasks: the tasks in the suite's order, then
    the extra columns (lambada_loss, lambada_f1)."""
    chosen = [t for t in TASK_NAMES if t in set(names)]
    extras = [c for t in chosen for c in EXTRA_COLUMNS.get(t, ())]
    return chosen + extras


def task_columns(name: str) -> tuple[str, ...]:
    """The columns one task fills: its own and its extra ones."""
    return (name, *EXTRA_COLUMNS.get(name, ()))


def results_csv(
    names: Sequence[str], results: Sequence[TaskResult], earlier: Optional[dict[str, str]] = None
) -> str:
    """One header line and one row of numbers; a failed or not yet run task is left empty.

    ``earlier`` (a previous row, see :func:`read_result_row`) is merged in: its tasks that this
    run did not (yet) score keep their cells; a task scored now replaces all its columns, a
    failed one leaves them empty. Columns keep the suite's order; unknown earlier columns go last.
    """
    earlier = dict(earlier or {})
    cells: dict[str, str] = {}
    for result in results:
        for column in task_columns(result.name):
            earlier.pop(column, None)
            value = result.metrics.get(column)
            cells[column] = "" if value is None or math.isnan(value) else repr(float(value))
    tasks = set(names) | {c for c in earlier if c in TASK_NAMES}
    columns = result_columns(sorted(tasks))
    columns += [c for c in earlier if c not in columns]
    row = [cells.get(c, earlier.get(c, "")) for c in columns]
    return ",".join(columns) + "\n" + ",".join(row) + "\n"


def read_result_row(path: str) -> dict[str, str]:
    """The one row of an existing valid_result.csv ({} when there is none); IcuError when the
    file is not such a CSV, so a rerun never replaces what it cannot read."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IcuError(f"{path}: cannot read the earlier results ({exc}); move it away or choose another --dir") from None
    if len(rows) == 2 and rows[1] == []:  # a single empty cell reads as an empty row
        rows[1] = [""] * len(rows[0])
    if len(rows) != 2 or len(rows[0]) != len(rows[1]) or len(set(rows[0])) != len(rows[0]):
        raise IcuError(
            f"{path}: not a valid_result.csv (one header line and one row of numbers); move it away "
            "or choose another --dir"
        )
    return dict(zip(rows[0], rows[1]))
