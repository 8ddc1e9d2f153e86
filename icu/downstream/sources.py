"""Where each task's rows come from: a local file (csv, json, jsonl, parquet) or the hub.

Precedence for a task: ``--task_file task=PATH``, then ``--task_hub task=SPEC``, then a file
found under ``--data_dir``, then the task's default hub dataset. Local files use the hub schema
(the column names of the hub dataset); the files the reference shipped (lambada.csv,
pubmed_qa.csv, the dialog JSONs, piqa's dev.jsonl + dev-labels.lst ...) load as they are.

Hub datasets are read with ``datasets.load_dataset`` (parquet repositories; dataset scripts are
not run). The hub is probed once (:func:`icu.models.hub_reachable`): when it cannot be reached,
``datasets`` is switched to offline mode, so a cached copy loads at once and a missing one fails
at once with a message that says to pass a local file, instead of waiting for retries.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import IcuError
from ..models import hub_reachable
from .tasks import TASK_NAMES, TASKS, Example, HubSource, Task

logger = logging.getLogger("icu")

LOCAL_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_FILE_NAMES = ("validation", "valid", "val", "dev", "test")
LABELS_SUFFIX = "-labels.lst"  # PIQA ships its labels beside the data: dev.jsonl + dev-labels.lst


@dataclass(frozen=True)
class LocalSource:
    path: str

    def describe(self) -> str:
        return self.path


Source = Union[LocalSource, HubSource]


@dataclass
class TaskData:
    """A task's examples, ready to score."""

    task: Task
    source: str
    examples: list[Example]
    skipped: int = 0  # rows that make no example (a dialog with fewer than two turns)


# ------------------------------------------------------------------------------- arguments


def unknown_task_error(name: str, where: str) -> IcuError:
    return IcuError(f"unknown task {name!r} in {where}; known tasks: {', '.join(TASK_NAMES)}")


def parse_task_list(text: Optional[str]) -> list[str]:
    """``--tasks a,b,c`` -> validated names in the suite's order; None or "all" -> all 15."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(TASK_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in TASKS:
            raise unknown_task_error(name, "--tasks")
    return [t for t in TASK_NAMES if t in set(names)]


def parse_assignments(values: Optional[Iterable[str]], flag: str) -> dict[str, str]:
    """``["piqa=path", ...]`` -> {"piqa": "path"}, with the task names checked."""
    out: dict[str, str] = {}
    for value in values or ():
        name, sep, rest = value.partition("=")
        name, rest = name.strip(), rest.strip()
        if not sep or not name or not rest:
            raise IcuError(f"{flag} expects TASK=VALUE, got {value!r}")
        if name not in TASKS:
            raise unknown_task_error(name, flag)
        out[name] = rest
    return out


def parse_limits(text: Optional[str], flag: str = "--limit") -> dict[Optional[str], int]:
    """``"100,wikitext=5,pile=20"`` -> {None: 100, "wikitext": 5, "pile": 20}: rows per task, a bare
    number for every task not named (none: all rows). Task names are checked."""
    out: dict[Optional[str], int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        name = name.strip() if sep else None
        if name and name not in TASKS:
            raise unknown_task_error(name, flag)
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1 or name == "":
            raise IcuError(f"{flag} expects N or TASK=N items (N >= 1), comma-separated, e.g. 100,wikitext=5; "
                           f"got {item!r}")
        out[name] = n
    return out


def parse_hub_spec(spec: str, default_split: str = "validation") -> HubSource:
    """``REPO[:CONFIG][@SPLIT][#REVISION]`` -> a :class:`HubSource`."""
    text, _, revision = spec.partition("#")
    text, _, split = text.partition("@")
    repo, _, config = text.partition(":")
    if not repo.strip():
        raise IcuError(f"--task_hub: no repository in {spec!r} (use REPO[:CONFIG][@SPLIT][#REVISION])")
    return HubSource(repo.strip(), config.strip() or None, split.strip() or default_split,
                     revision.strip() or None)


def find_local(task: Task, data_dir: str) -> Optional[str]:
    """The first file for ``task`` under ``data_dir``: ``{name}.{ext}`` or ``{name}/{split}.{ext}``
    for the task's name and aliases (e.g. piqa/dev.jsonl, copa/val.jsonl, lambada.csv)."""
    for name in (task.name, *task.aliases):
        for ext in LOCAL_EXTENSIONS:
            path = os.path.join(data_dir, name + ext)
            if os.path.isfile(path):
                return path
        for split in SPLIT_FILE_NAMES:
            for ext in LOCAL_EXTENSIONS:
                path = os.path.join(data_dir, name, split + ext)
                if os.path.isfile(path):
                    return path
    return None


def resolve_sources(
    names: Sequence[str],
    data_dir: Optional[str] = None,
    task_files: Optional[dict[str, str]] = None,
    task_hubs: Optional[dict[str, str]] = None,
) -> dict[str, Source]:
    """Pick each task's source (see the module docstring for the order)."""
    task_files, task_hubs = task_files or {}, task_hubs or {}
    if data_dir is not None and not os.path.isdir(data_dir):
        raise IcuError(f"--data_dir {data_dir!r} is not a directory")
    sources: dict[str, Source] = {}
    for name in names:
        task = TASKS[name]
        if name in task_files:
            path = task_files[name]
            if not os.path.isfile(path):
                raise IcuError(f"--task_file {name}={path}: file not found")
            sources[name] = LocalSource(path)
        elif name in task_hubs:
            default_split = task.hub.split if task.hub else "validation"
            sources[name] = parse_hub_spec(task_hubs[name], default_split)
        elif data_dir is not None and (found := find_local(task, data_dir)):
            sources[name] = LocalSource(found)
        elif task.hub is not None:
            sources[name] = task.hub
        else:
            where = f" (nothing for it in {data_dir})" if data_dir else ""
            raise IcuError(
                f"task {name} has no hub source{where}; {task.note}. Pass --data_dir DIR with "
                f"{name}.json/.jsonl/.csv/.parquet in it, or --task_file {name}=PATH "
                f"(columns: {task.schema()})"
            )
    return sources


# ------------------------------------------------------------------------------- local files


def _json_rows(obj: Any, path: str) -> list[dict]:
    if isinstance(obj, list):
        if not all(isinstance(r, dict) for r in obj):
            raise IcuError(f"{path}: a JSON list must hold one object per row")
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, (dict, list)) for v in obj.values()):
        # Column-oriented, as pandas writes it: {"text": {"0": [...], "1": [...]}} (the
        # reference's dialog files) or {"col": [v0, v1, ...]}.
        columns = list(obj)
        first = obj[columns[0]]
        keys = list(first) if isinstance(first, dict) else list(range(len(first)))
        rows = []
        for key in keys:
            row = {}
            for col in columns:
                values = obj[col]
                try:
                    row[col] = values[key]
                except (KeyError, IndexError):
                    raise IcuError(f"{path}: column {col!r} has no entry for row {key!r}") from None
            rows.append(row)
        return rows
    raise IcuError(
        f"{path}: unsupported JSON layout; use a list of row objects, or columns "
        '{"column": {row_id: value}} like the reference\'s dialog files'
    )


def _columns_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def read_table(path: str) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a csv / json / jsonl / parquet file."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".csv":
            import pandas as pd

            # Everything as text: pandas would turn "" into NaN and ids into floats.
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            return df.to_dict("records"), [str(c) for c in df.columns]
        if ext == ".parquet":
            import pandas as pd

            df = pd.read_parquet(path)
            return df.to_dict("records"), [str(c) for c in df.columns]
        if ext == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise IcuError(f"{path}:{lineno}: each line must be a JSON object")
                    rows.append(row)
            return rows, _columns_of(rows)
        if ext == ".json":
            with open(path, encoding="utf-8") as fh:
                rows = _json_rows(json.load(fh), path)
            return rows, _columns_of(rows)
    except IcuError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise IcuError(f"{path}: cannot read it as {ext[1:]} ({str(exc).splitlines()[0][:160]})") from None
    raise IcuError(f"{path}: unsupported file type {ext or '(none)'}; use csv, json, jsonl or parquet")


def _attach_labels_file(path: str, rows: list[dict], columns: list[str]) -> None:
    """Add a ``label`` column from ``{stem}-labels.lst`` (one integer a line) when present."""
    labels_path = os.path.splitext(path)[0] + LABELS_SUFFIX
    if "label" in columns or not os.path.isfile(labels_path):
        return
    with open(labels_path, encoding="utf-8") as fh:
        labels = [line.strip() for line in fh if line.strip()]
    if len(labels) != len(rows):
        raise IcuError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows in {path}")
    for row, label in zip(rows, labels):
        row["label"] = label
    columns.append("label")


# ------------------------------------------------------------------------------------- hub


def _go_offline() -> None:
    """Put ``datasets`` (and the hub client under it) in offline mode for this process.

    Both read their offline flag from the environment at import time; setting the module
    constants is what makes an already imported library stop trying the network.
    """
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_hub_rows(
    task: Task, source: HubSource, cache_dir: Optional[str], limit: Optional[int]
) -> tuple[list[dict], list[str]]:
    """(rows, columns) of a hub dataset split; IcuError with the fix when it cannot be loaded."""
    online = hub_reachable()
    if not online:
        _go_offline()
    import datasets

    try:
        ds = datasets.load_dataset(
            source.repo, source.config, split=source.split, revision=source.revision,
            cache_dir=cache_dir,
        )
    except Exception as exc:  # noqa: BLE001 - any failure here has the same fix for the user
        fix = (
            f"pass a local file in the hub schema ({task.schema()}) with --task_file "
            f"{task.name}=PATH or --data_dir DIR, or another repository with --task_hub "
            f"{task.name}=REPO[:CONFIG][@SPLIT][#REVISION]"
        )
        if not online:
            raise IcuError(
                f"task {task.name}: the Hugging Face hub is not reachable and "
                f"{source.describe()} is not in the datasets cache; {fix}"
            ) from None
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise IcuError(f"task {task.name}: loading {source.describe()} failed ({reason}); {fix}") from None
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds.to_list(), list(ds.column_names)


# ---------------------------------------------------------------------------------- examples


def load_task(
    name: str, source: Source, cache_dir: Optional[str] = None, limit: Optional[int] = None
) -> TaskData:
    """Read a task's rows from ``source``, check the schema and build its examples."""
    task = TASKS[name]
    if isinstance(source, LocalSource):
        rows, columns = read_table(source.path)
        _attach_labels_file(source.path, rows, columns)
        if limit is not None:
            rows = rows[:limit]
    else:
        rows, columns = load_hub_rows(task, source, cache_dir, limit)
    where = source.describe()
    missing = task.missing_columns(columns)
    if missing:
        hint = ""
        if "'label'" in missing:
            hint = f" (or put the labels, one a line, in a {LABELS_SUFFIX} file beside it)"
        raise IcuError(
            f"task {name}: {where} lacks the required column(s) {', '.join(missing)}{hint}; "
            f"found: {', '.join(columns) or 'none'}; expected: {task.schema()}"
        )
    examples: list[Example] = []
    skipped = 0
    for i, row in enumerate(rows):
        try:
            example = task.build(row)
        except (ValueError, KeyError, TypeError) as exc:
            raise IcuError(f"task {name}: row {i} of {where}: {exc}") from None
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        raise IcuError(f"task {name}: {where} has no usable rows")
    return TaskData(task, where, examples, skipped)


def load_tasks(
    sources: dict[str, Source], cache_dir: Optional[str] = None,
    limit: Optional[int | dict[Optional[str], int]] = None,
) -> dict[str, TaskData]:
    """Load every task up front, so bad input fails before a model is loaded. ``limit``: rows per
    task, one number or :func:`parse_limits`' {task or None: N}."""
    limits = limit if isinstance(limit, dict) else {None: limit}
    out = {}
    for name, source in sources.items():
        data = load_task(name, source, cache_dir, limits.get(name, limits.get(None)))
        extra = f", {data.skipped} rows skipped" if data.skipped else ""
        logger.info("task %s: %d examples from %s%s", name, len(data.examples), data.source, extra)
        out[name] = data
    return out
