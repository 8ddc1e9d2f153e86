"""Gather eval.py outputs of several policies into one ``results.json`` for judging.

Each ``--policy name=path`` points at the ``unlearn.csv`` that eval.py wrote for one model
(the original model, a baseline, ours ...). Rows are aligned by target id; every run must
cover the same targets with the same prefix and reference, otherwise the comparison between
policies would be meaningless and we stop with an error instead of guessing.

``results.json`` looks like::

    {"version": 1,
     "policies": ["original", "ours"],
     "sources": {"original": "runs/orig/unlearn.csv", "ours": "runs/ours/unlearn.csv"},
     "targets": [{"id": 17, "prefix": "...", "reference": "...",
                  "candidates": {"original": "...", "ours": "..."}}, ...]}

Usage::

    python -m evaluation.convert --policy original=runs/orig/unlearn.csv \
        --policy ours=runs/ours/unlearn.csv --out results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

if __package__ in (None, ""):
    # Run as ``python evaluation/convert.py``: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.errors import InputError  # noqa: E402  (re-exported: callers catch convert.InputError)
from evaluation.files import check_output_file, write_text_atomic  # noqa: E402

RESULTS_VERSION = 1
DEFAULT_MARKERS: tuple[str, ...] = ("<|endoftext|>",)
REQUIRED_COLUMNS = ("id", "prefix", "reference", "candidate")

# Generations can be long and eval.py may have stored whole documents; the stdlib default
# field limit (128 KiB) would make such files fail with an obscure csv error.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------
def clean_candidate(text: str, markers: Iterable[str] = DEFAULT_MARKERS) -> str:
    """Return the continuation as the model meant it: up to its first end-of-text marker.

    Batched generation pads finished sequences with the end-of-text token, so a candidate
    can look like ``"text<|endoftext|><|endoftext|>..."``. Leading markers (left padding that
    leaked into the decoded continuation) are dropped; everything from the first marker after
    real text onwards is padding and is cut.
    """
    markers = [m for m in markers if m]
    # Drop leading markers (possibly separated by whitespace) first.
    changed = True
    while changed:
        changed = False
        stripped = text.lstrip()
        for m in markers:
            if stripped.startswith(m):
                text = stripped[len(m):]
                changed = True
    cut = min((i for i in (text.find(m) for m in markers) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    return text


def clean_context(text: str, markers: Iterable[str] = DEFAULT_MARKERS) -> str:
    """Remove every marker from a prefix or reference (they are padding there, not content)."""
    for m in markers:
        if m:
            text = text.replace(m, "")
    return text


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
def _parse_id(raw: str, path: Path, line: int) -> int:
    try:
        value = float(raw.strip())
    except ValueError:
        raise InputError(f"{path}: line {line}: id {raw!r} is not an integer") from None
    if not value.is_integer():
        raise InputError(f"{path}: line {line}: id {raw!r} is not an integer")
    return int(value)


def read_run(path: str | Path, markers: Iterable[str] = DEFAULT_MARKERS) -> dict[int, dict[str, str]]:
    """Read one eval.py ``unlearn.csv`` into ``{id: {prefix, reference, candidate}}`` (cleaned)."""
    path = Path(path)
    markers = tuple(markers)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows: dict[int, dict[str, str]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(missing)} "
                    f"(expected eval.py's unlearn.csv with {', '.join(REQUIRED_COLUMNS)})"
                )
            reader.fieldnames = header  # tolerate stray spaces in the header
            for row in reader:
                line = reader.line_num
                if any(row.get(c) is None for c in REQUIRED_COLUMNS):
                    raise InputError(f"{path}: line {line}: row has too few fields")
                tid = _parse_id(row["id"], path, line)
                if tid in rows:
                    raise InputError(f"{path}: line {line}: id {tid} appears twice")
                rows[tid] = {
                    "prefix": clean_context(row["prefix"], markers),
                    "reference": clean_context(row["reference"], markers),
                    "candidate": clean_candidate(row["candidate"], markers),
                }
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _preview(ids: Iterable[int], limit: int = 5) -> str:
    ids = sorted(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def align_runs(runs: dict[str, dict[int, dict[str, str]]], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge per-policy runs into the results structure; raise InputError if they disagree."""
    if not runs:
        raise InputError("no policies given (use --policy name=path)")
    names = list(runs)
    first = names[0]
    base = runs[first]
    for name in names[1:]:
        other = runs[name]
        only_first = base.keys() - other.keys()
        only_other = other.keys() - base.keys()
        if only_first or only_other:
            parts = []
            if only_first:
                parts.append(f"ids only in '{first}': {_preview(only_first)}")
            if only_other:
                parts.append(f"ids only in '{name}': {_preview(only_other)}")
            raise InputError(f"runs '{first}' and '{name}' cover different targets ({'; '.join(parts)})")
        for tid in sorted(base):
            for field in ("prefix", "reference"):
                if base[tid][field] != other[tid][field]:
                    raise InputError(
                        f"runs '{first}' and '{name}' disagree on the {field} of target {tid} "
                        "(were they evaluated on the same split?)"
                    )
    targets = [
        {
            "id": tid,
            "prefix": base[tid]["prefix"],
            "reference": base[tid]["reference"],
            "candidates": {name: runs[name][tid]["candidate"] for name in names},
        }
        for tid in sorted(base)
    ]
    return {
        "version": RESULTS_VERSION,
        "policies": names,
        "sources": dict(sources or {}),
        "targets": targets,
    }


def parse_policy(spec: str) -> tuple[str, Path]:
    """Split ``name=path``; the name becomes a column of the summary."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise InputError(f"--policy expects name=path, got {spec!r}")
    return name, Path(path)


def convert(policies: Sequence[tuple[str, str | Path]], markers: Iterable[str] = DEFAULT_MARKERS) -> dict[str, Any]:
    """Read every ``(name, unlearn.csv)`` and return the aligned results structure."""
    markers = tuple(markers)
    runs: dict[str, dict[int, dict[str, str]]] = {}
    sources: dict[str, str] = {}
    for name, path in policies:
        if name in runs:
            raise InputError(f"policy name '{name}' given twice")
        runs[name] = read_run(path, markers)
        sources[name] = str(path)
    return align_runs(runs, sources)


# --------------------------------------------------------------------------------------------
# results.json I/O
# --------------------------------------------------------------------------------------------
def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write JSON via a temp file + rename so a crash never leaves a half-written file.

    Raises InputError when ``path`` is a folder or cannot be written.
    """
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n", "--out")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate ``results.json``; raise InputError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    where = f"{path}: wrong shape:"
    if not isinstance(data, dict):
        raise InputError(f"{where} expected an object with 'policies' and 'targets'")
    policies = data.get("policies")
    targets = data.get("targets")
    if not isinstance(policies, list) or not policies or not all(isinstance(p, str) and p for p in policies):
        raise InputError(f"{where} 'policies' must be a non-empty list of names")
    if len(set(policies)) != len(policies):
        raise InputError(f"{where} 'policies' has duplicates")
    if not isinstance(targets, list) or not targets:
        raise InputError(f"{where} 'targets' must be a non-empty list")
    seen: set[str] = set()
    for i, t in enumerate(targets):
        if not isinstance(t, dict):
            raise InputError(f"{where} targets[{i}] is not an object")
        tid = t.get("id")
        if isinstance(tid, bool) or not isinstance(tid, (int, str)):
            raise InputError(f"{where} targets[{i}] has no integer/string 'id'")
        if str(tid) in seen:
            raise InputError(f"{where} target id {tid} appears twice")
        seen.add(str(tid))
        for key in ("prefix", "reference"):
            if not isinstance(t.get(key), str):
                raise InputError(f"{where} targets[{i}] (id {tid}) has no string '{key}'")
        cands = t.get("candidates")
        if not isinstance(cands, dict):
            raise InputError(f"{where} targets[{i}] (id {tid}) has no 'candidates' object")
        for p in policies:
            if not isinstance(cands.get(p), str):
                raise InputError(f"{where} targets[{i}] (id {tid}) lacks a string candidate for policy '{p}'")
    return data


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.convert",
        description="Align eval.py unlearn.csv runs by target into results.json for GPT judging.",
    )
    p.add_argument(
        "--policy", action="extend", nargs="+", required=True, metavar="NAME=PATH",
        help="a policy name and the unlearn.csv eval.py wrote for it; repeat for each policy",
    )
    p.add_argument("--out", default="results.json", help="where to write results.json (default: %(default)s)")
    p.add_argument(
        "--marker", action="append", default=None, metavar="TEXT",
        help="end-of-text marker to strip; repeatable (default: <|endoftext|>)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    markers = tuple(args.marker) if args.marker else DEFAULT_MARKERS
    try:
        check_output_file(args.out, "--out")  # before reading the runs: fail fast
        policies = [parse_policy(s) for s in args.policy]
        results = convert(policies, markers)
        write_json_atomic(results, args.out)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(results['targets'])} targets x {len(results['policies'])} policies "
          f"({', '.join(results['policies'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
