"""Forgetting thresholds measured on text the model never saw, as pure functions.

The rule (Knowledge Unlearning's): a target counts as forgotten when the model reproduces it no
better than text it never trained on. ``eval.py --calibrate`` scores MA, EL_n and the generation
check on unseen rows and writes ``thresholds.json`` with :func:`build_thresholds`; the trainers
read it back with :func:`load_thresholds` and :func:`choose_thresholds`.

Statistics: the stop rule compares the forget set's MEAN MA / EL_n with a threshold, so its
thresholds are the means over unseen rows (a set-level number against a set-level number). The
flag rule decides per target, so its thresholds are a high quantile (default 0.95) of the
per-row BERTScore F1 and BLEU on unseen rows: a target stays flagged only while its generation
looks more like the truth than 95% of unseen rows' generations do. The mean would keep about
half of the targets flagged even once they are as forgotten as unseen text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import IcuError
from .metrics import el_column, el_definition

THRESHOLDS_FILE = "thresholds.json"
CALIBRATION_CSV = "calibration.csv"
SCHEMA_VERSION = 1
FLAG_QUANTILE = 0.95
REQUIRED_KEYS = ("ma", "el", "el_start", "f1", "bleu", "model", "n_rows")
# trainer flag (argparse dest) <- key in thresholds.json
FLAG_KEYS = {"acc": "ma", "f1": "f1", "bleu": "bleu"}


# --------------------------------------------------------------------------- building the file


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, std, and two 95% intervals of per-row values (NaN rows skipped): ``interval95``
    holds 95% of the rows (2.5% and 97.5% quantiles), ``mean_ci95`` is the normal-approximation
    confidence interval of the mean (how precisely the threshold itself is known)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "interval95": None, "mean_ci95": None}
    mean, std = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = 1.96 * std / np.sqrt(v.size)
    return {
        "n": int(v.size),
        "mean": mean,
        "std": std,
        "interval95": [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))],
        "mean_ci95": [mean - half, mean + half],
    }


def flag_threshold(values: Sequence[float], quantile: float = FLAG_QUANTILE) -> float:
    """The ``quantile`` of the per-row scores (NaN skipped): the flag rule's suggested threshold."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise IcuError("no unseen row has a finite generation score; cannot suggest a flag threshold")
    return float(np.quantile(v, quantile))


def build_thresholds(
    per_row: Mapping[str, Sequence[float]],
    el_ns: Sequence[int],
    el_start: int,
    *,
    quantile: float = FLAG_QUANTILE,
    meta: Optional[dict] = None,
) -> dict[str, Any]:
    """thresholds.json's content from per-row scores.

    ``per_row``: columns ``ma``, ``el_column(n, el_start)`` for each n, ``F1`` and ``bleu``
    (one value per unseen row). ``meta``: model, tokenizer, bert_name, versions, ... merged in.
    """
    el_cols = {str(n): el_column(n, el_start) for n in el_ns}
    ma = spread(per_row["ma"])
    if ma["mean"] is None:
        raise IcuError("no unseen row could be scored for MA (all rows are padding?)")
    out: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "ma": ma["mean"],
        "el": {n: spread(per_row[c])["mean"] for n, c in el_cols.items()},
        "el_start": int(el_start),
        "el_definition": el_definition(el_start),
        "el_columns": el_cols,
        "f1": flag_threshold(per_row["F1"], quantile),
        "bleu": flag_threshold(per_row["bleu"], quantile),
        "n_rows": int(len(per_row["ma"])),
        "statistic": {
            "ma": "mean over unseen rows",
            "el": "mean over unseen rows",
            "f1": f"{quantile:g} quantile over unseen rows",
            "bleu": f"{quantile:g} quantile over unseen rows",
        },
        "flag_quantile": float(quantile),
        "spread": {
            "ma": ma,
            **{c: spread(per_row[c]) for c in el_cols.values()},
            "f1": spread(per_row["F1"]),
            "bleu": spread(per_row["bleu"]),
        },
    }
    out.update(meta or {})
    return out


# --------------------------------------------------------------------------- reading the file


def validate_thresholds(th: Any, source: str) -> dict[str, Any]:
    """Check a parsed thresholds file; IcuError naming the first missing or bad key."""
    if not isinstance(th, dict):
        raise IcuError(f"{source}: expected a JSON object, got {type(th).__name__}; rerun eval.py --calibrate")
    for key in REQUIRED_KEYS:
        if key not in th:
            raise IcuError(f"{source}: missing key {key!r}; rerun eval.py --calibrate to write a complete file")
    for key in ("ma", "f1", "bleu"):
        _check_unit(th[key], f"{source}: key {key!r}")
    if not isinstance(th["el"], dict) or not th["el"]:
        raise IcuError(f"{source}: key 'el' must map n to a value, e.g. {{\"10\": 0.03}}")
    for n, value in th["el"].items():
        if not str(n).isdigit() or int(n) < 1:
            raise IcuError(f"{source}: key 'el' has n {n!r}; n must be a positive integer")
        _check_unit(value, f"{source}: key 'el'[{n!r}]")
    if isinstance(th["el_start"], bool) or not isinstance(th["el_start"], int) or th["el_start"] < 1:
        raise IcuError(f"{source}: key 'el_start' must be a positive integer (got {th['el_start']!r})")
    return th


def _check_unit(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise IcuError(f"{what} must be a number in [0, 1] (got {value!r})")


def load_thresholds(path: str) -> dict[str, Any]:
    """Read and validate a thresholds.json written by ``eval.py --calibrate``."""
    if os.path.isdir(path):
        path = os.path.join(path, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        raise IcuError(f"--thresholds {path}: file not found; write it with eval.py --calibrate --dir DIR")
    try:
        with open(path, encoding="utf-8") as fh:
            th = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IcuError(f"--thresholds {path}: not valid JSON ({exc})") from None
    return validate_thresholds(th, f"--thresholds {path}")


# --------------------------------------------------------------------------- applying it


@dataclass
class ThresholdChoice:
    """What a run uses: ``values`` by argparse dest, where each came from, and what to log."""

    values: dict[str, Any]
    source: dict[str, str]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Two model names name the same model (local paths compared after resolving)."""
    if a is None or b is None:
        return a == b
    a, b = a.rstrip("/"), b.rstrip("/")
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def choose_thresholds(
    th: Mapping[str, Any],
    path: str,
    current: Mapping[str, Any],
    explicit: set[str],
    el_n: int,
) -> ThresholdChoice:
    """The run's acc / el / el_start / f1 / bleu: from the file unless typed on the command line.

    ``current``: the parsed flags (dests ``acc el el_start f1 bleu model_name bert_name
    target_length``); ``explicit``: the dests typed (see :func:`icu.cli.explicit_dests`);
    ``el_n``: the n whose calibrated EL becomes ``--el``.
    """
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    notes: list[str] = []
    file_values = {dest: th[key] for dest, key in FLAG_KEYS.items()}
    file_values["el_start"] = th["el_start"]
    if str(el_n) in th["el"]:
        file_values["el"] = th["el"][str(el_n)]
    elif "el" not in explicit:
        raise IcuError(
            f"--thresholds {path}: key 'el' has no value for n={el_n} (it has n = "
            f"{', '.join(sorted(th['el'], key=int))}); calibrate with --el_n {el_n} or pass --el"
        )
    for dest, value in file_values.items():
        if dest in explicit:
            values[dest], source[dest] = current[dest], "command line"
            notes.append(f"--{dest} {current[dest]} given on the command line wins over {value} in {path}")
        else:
            values[dest], source[dest] = value, path
    if "el" in explicit and "el" not in file_values:
        values["el"], source["el"] = current["el"], "command line"
    warnings = _mismatches(th, path, current, values["el_start"])
    return ThresholdChoice(values, source, notes, warnings)


def _mismatches(th: Mapping[str, Any], path: str, current: Mapping[str, Any], el_start: int) -> list[str]:
    """Warnings for a file calibrated under other conditions than the run's."""
    out = []
    if not same_model(th.get("model"), current.get("model_name")):
        out.append(f"{path} was calibrated for model {th.get('model')!r} but this run trains "
                   f"{current.get('model_name')!r}; its thresholds may not fit")
    if int(th["el_start"]) != int(el_start):
        out.append(f"{path} measured EL from prefix {th['el_start']} ({el_definition(th['el_start'])}) but this "
                   f"run uses --el_start {el_start} ({el_definition(el_start)}); the EL threshold compares "
                   "different quantities")
    if th.get("bert_name") and current.get("bert_name") and th["bert_name"] != current["bert_name"]:
        out.append(f"{path} scored F1 with {th['bert_name']!r} but this run uses --bert_name "
                   f"{current['bert_name']!r}; the F1 threshold may not fit")
    if th.get("target_length") and current.get("target_length") and th["target_length"] != current["target_length"]:
        out.append(f"{path} was measured with --target_length {th['target_length']} but this run uses "
                   f"{current['target_length']}")
    return out


# --------------------------------------------------------------------------- unseen rows


def shared_rows(unseen: np.ndarray, forget: np.ndarray) -> np.ndarray:
    """Indices of ``unseen`` rows whose tokens equal some row of ``forget`` (by content)."""
    known = {row.tobytes() for row in np.ascontiguousarray(forget)}
    return np.asarray([i for i, row in enumerate(np.ascontiguousarray(unseen)) if row.tobytes() in known],
                      dtype=np.int64)
