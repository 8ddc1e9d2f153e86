"""Per-example records of a scored task, for ``valid.py --log_samples``.

One JSON object per example (one per chunk or window for the perplexity tasks), so a number in
valid_result.csv can be traced to the examples behind it and opened with pandas
(``pd.read_json(path, lines=True)``):

* multiple choice: context, choices, per-choice summed log-likelihood, prediction, gold, correct;
* lambada: context, target, the greedy continuation (decoded), its log-likelihood, loss, F1,
  ``exact`` (greedy tokens == target tokens) and ``correct`` (the ``lambada`` column's rule);
* dialog: prompt, generated output, reference reply, F1;
* perplexity: per chunk (or strided window) its mean token loss and scored tokens.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .sources import TaskData
from .suite import TaskResult
from .tasks import CHOICE, DIALOG, LAMBADA, PERPLEXITY


def _number(value: float) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return float(value) if math.isfinite(value) else None


def sample_records(data: TaskData, result: TaskResult) -> list[dict[str, Any]]:
    """One dict per example of a successfully scored task (``result.details`` in order)."""
    family = data.task.family
    if family == PERPLEXITY:
        (ppl,) = result.details
        return [{"chunk": i, "loss": _number(loss), "tokens": n}
                for i, (loss, n) in enumerate(zip(ppl.losses, ppl.scored))]
    records = []
    for i, (ex, d) in enumerate(zip(data.examples, result.details)):
        if family == CHOICE:
            record = {"context": ex.context, "choices": list(ex.choices),
                      "loglikelihoods": [_number(s) for s in d.scores], "prediction": d.pred,
                      "gold": d.gold, "correct": d.pred == d.gold}
        elif family == LAMBADA:
            record = {"context": ex.context, "target": ex.target, "prediction": d.prediction,
                      "loglikelihood": _number(d.score.logprob), "loss": _number(d.loss),
                      "exact": d.exact, "correct": d.correct, "f1": d.f1}
        elif family == DIALOG:
            record = {"prompt": ex.prompt, "output": d.generated, "reference": d.reply, "f1": d.f1}
        else:  # pragma: no cover - the registry only holds the four families
            raise ValueError(f"unknown task family {family!r}")
        records.append({"index": i, **record})
    return records


def samples_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
