"""valid.py: the downstream suite (15 tasks) that shows what general ability a model kept.

Writes ``{dir}/valid_result.csv`` (one row, one column per task, plus lambada_loss,
lambada_f1 and lambada_acc_exact) and ``{dir}/valid.log``; with ``--log_samples`` also
``{dir}/samples_{task}.jsonl`` (one line per example). A rerun into the same ``--dir`` merges:
tasks it does not score keep their earlier cells. Each task reads a local file (``--data_dir``,
``--task_file``) or its hub dataset (``--task_hub`` to change the default); ``--list_tasks``
shows the tasks, their columns and default sources.

Exit codes: 0 all tasks scored; 1 a task failed while scoring (the others are still written);
2 bad input (unknown task, unreadable or incomplete file, unreachable hub dataset, bad flag).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from icu.cli import DEFAULT_MODEL, add_runtime_args, check_positive, resolve_device, setup_logging
from icu.data import atomic_write_text
from icu.downstream import (
    TASKS,
    BatchedScorer,
    load_tasks,
    parse_assignments,
    parse_limits,
    parse_task_list,
    read_result_row,
    resolve_sources,
    results_csv,
    run_suite,
    sample_records,
    samples_jsonl,
)
from icu.errors import IcuError, check_writable_dir, disk_errors, exit_on_user_error
from icu.models import load_model, load_tokenizer

RESULT_FILE = "valid_result.csv"
LOG_FILE = "valid.log"
SAMPLES_FILE = "samples_{task}.jsonl"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Reword a shared flag's help for this script."""
    next(a for a in p._actions if a.dest == dest).help = text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score a causal LM on the ICU downstream suite (15 tasks).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="hub id or local path of the model")
    p.add_argument("--tokenizer_name", default=None, help="tokenizer (default: --model_name)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype")
    p.add_argument("--prefix_length", type=int, default=512,
                   help="context/prompt tokens kept (the last ones)")
    p.add_argument("--suffix_length", type=int, default=512,
                   help="choice tokens kept; perplexity chunk length")
    add_runtime_args(p)
    p.set_defaults(batch_size=32)
    _set_help(p, "batch_size", "sequences per forward pass (fewer when the logits would exceed 512 MiB)")
    _set_help(p, "num_workers", "unused by valid.py (accepted so the trainers' commands carry over)")
    _set_help(p, "dir", "output folder: valid_result.csv (merged with an earlier one), valid.log, "
                        "samples_*.jsonl")
    p.add_argument("--cache", default=None,
                   help="datasets cache directory for hub datasets (default: the datasets library's)")
    p.add_argument("--tasks", default="all",
                   help="comma-separated subset of: " + ",".join(TASKS))
    p.add_argument("--data_dir", default=None,
                   help="folder of local task files laid out like datasets/validation "
                        "(lambada.csv, piqa/dev.jsonl, copa/val.jsonl, pile.csv, ...; "
                        "default: none, hub datasets)")
    p.add_argument("--task_file", action="append", default=[], metavar="TASK=PATH",
                   help="a local file for one task (csv, json, jsonl, parquet); repeatable")
    p.add_argument("--task_hub", action="append", default=[],
                   metavar="TASK=REPO[:CONFIG][@SPLIT][#REVISION]",
                   help="another hub dataset for one task; repeatable")
    p.add_argument("--limit", default=None,
                   help="rows per task (texts for wikitext/pile): N for every task, and/or TASK=N "
                        "items, comma-separated, e.g. 100,wikitext=5 (default: all)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="dialog reply length (tokens)")
    p.add_argument("--ppl_stride", type=int, default=None,
                   help="perplexity with windows of suffix_length moved by this many tokens "
                        "(default: the reference's non-overlapping chunks)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy "
                        "shared CPU)")
    p.add_argument("--log_samples", action="store_true",
                   help="also write {dir}/samples_{task}.jsonl: per example its inputs, per-choice "
                        "log-likelihoods or output, prediction and gold (per chunk loss for "
                        "perplexity tasks)")
    p.add_argument("--list_tasks", action="store_true", help="list the tasks and exit")
    return p


def list_tasks() -> str:
    lines = []
    for task in TASKS.values():
        source = task.hub.describe() if task.hub else task.note
        lines.append(f"{task.name:22} {task.family:10} columns: {task.schema():38} default: {source}")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    check_positive(args, "prefix_length", "suffix_length", "batch_size", "max_new_tokens")
    args.limits = parse_limits(args.limit)
    for name in ("ppl_stride", "threads"):
        if getattr(args, name) is not None:
            check_positive(args, name)
    if args.num_workers < 0:
        raise IcuError(f"--num_workers must be >= 0 (got {args.num_workers})")


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        print(list_tasks())
        return 0
    check_args(args)
    names = parse_task_list(args.tasks)
    sources = resolve_sources(
        names,
        args.data_dir,
        parse_assignments(args.task_file, "--task_file"),
        parse_assignments(args.task_hub, "--task_hub"),
    )
    check_writable_dir(args.dir, "--dir")
    out_path = os.path.join(args.dir, RESULT_FILE)
    earlier = read_result_row(out_path)  # an unreadable earlier file stops us before any work
    logger = setup_logging(os.path.join(args.dir, LOG_FILE))
    logger.info("valid.py %s", " ".join(sys.argv[1:] if argv is None else argv))
    kept = [c for c in earlier if c in TASKS and c not in names]
    if kept:
        logger.info("%s: keeping the earlier results of %s (tasks not run now)", out_path, ",".join(kept))
    # All data first: a bad file or an unreachable dataset fails before the model is loaded.
    datas = load_tasks(sources, cache_dir=args.cache, limit=args.limits)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name)
    model = load_model(args.model_name, args.dtype, device)
    scorer = BatchedScorer(
        model, tokenizer, batch_size=args.batch_size, prefix_length=args.prefix_length,
        suffix_length=args.suffix_length, device=device,
    )
    logger.info("model %s on %s (%s), window %d tokens, batch %d", args.model_name, device,
                args.dtype, scorer.window, args.batch_size)

    done = []

    def write(result) -> None:
        # Rewritten after every task: a crash or a kill keeps what was scored so far.
        done.append(result)
        with disk_errors(args.dir):
            if args.log_samples and result.error is None:
                path = os.path.join(args.dir, SAMPLES_FILE.format(task=result.name))
                atomic_write_text(path, samples_jsonl(sample_records(datas[result.name], result)))
            atomic_write_text(out_path, results_csv(names, done, earlier))

    start = time.perf_counter()
    results = run_suite(
        datas, scorer, max_new_tokens=args.max_new_tokens, ppl_stride=args.ppl_stride,
        progress=True, on_result=write,
    )
    failed = [r for r in results if r.error is not None]
    logger.info("wrote %s in %.1f s", out_path, time.perf_counter() - start)
    if failed:
        for r in failed:
            print(f"error: task {r.name} failed: {r.error} (see {os.path.join(args.dir, LOG_FILE)})",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
