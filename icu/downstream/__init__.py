"""The downstream suite valid.py runs: 15 tasks that show what general ability a model kept.

Modules, leaves first: ``text`` (prompt pieces, normalisation, token F1), ``tasks`` (the
registry: hub defaults, schemas, row -> example), ``sources`` (local files and the hub),
``progress`` (the progress bar), ``generation`` (greedy dialog replies, mixed into the scorers),
``scoring`` (batched and one-at-a-time scoring), ``suite`` (task metrics and the result CSV),
``samples`` (per-example records for ``--log_samples``).
"""

from .scoring import BatchedScorer, PerplexityResult, SequentialScorer, TokenScore, model_window
from .sources import (
    LocalSource,
    TaskData,
    load_task,
    load_tasks,
    parse_assignments,
    parse_limits,
    parse_hub_spec,
    parse_task_list,
    resolve_sources,
)
from .samples import sample_records, samples_jsonl
from .suite import TaskResult, evaluate_task, read_result_row, result_columns, results_csv, run_suite
from .tasks import EXTRA_COLUMNS, TASK_NAMES, TASKS, HubSource

__all__ = [
    "BatchedScorer", "SequentialScorer", "TokenScore", "PerplexityResult", "model_window",
    "LocalSource", "HubSource", "TaskData", "load_task", "load_tasks", "parse_assignments", "parse_limits",
    "parse_hub_spec", "parse_task_list", "resolve_sources", "TaskResult", "evaluate_task",
    "result_columns", "results_csv", "read_result_row", "run_suite", "sample_records", "samples_jsonl", "EXTRA_COLUMNS", "TASK_NAMES", "TASKS",
]
