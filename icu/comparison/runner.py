"""compare.py's work: check everything, then per method train (or reuse), evaluate, and report.

    for method in --methods:            (original = the untrained model, nothing to train)
        {dir}/{method}/train   the trainer's run (reused when finished, --resume when cut short)
        {dir}/{method}/eval    eval.py on the final model (the same forget-set evaluation)
        {dir}/{method}/valid   valid.py on the chosen tasks (with --tasks)
        held-out LM loss       (with --heldout)
        {dir}/{method}/row.json  the method's numbers, written after every step
    {dir}/comparison.csv|md, tradeoff.png, results.json  rewritten after every method
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..cli import setup_logging
from ..errors import IcuError, check_writable_dir, disk_errors
from ..report import write_json
from .config import ORIGINAL, flag_tokens, load_method_config, parse_methods, resolve_methods
from .report import write_report
from .steps import (
    MethodDir,
    check_step,
    eval_command,
    read_json,
    run_step,
    train_state,
    trainer_command,
    valid_command,
)

logger = logging.getLogger("icu")


@dataclass
class Plan:
    """What a comparison will do, decided (and checked) before anything runs."""

    methods: list[str]
    params: dict[str, dict[str, Any]]  # the trainer flags of every trained method
    parser: argparse.ArgumentParser
    thresholds: dict[str, float]
    tasks: list[str] = field(default_factory=list)
    heldout: Optional[np.ndarray] = None
    heldout_key: Optional[str] = None


def trainer_parser(trainer: str) -> argparse.ArgumentParser:
    from ..trainer import build_parser

    return build_parser(distributed=trainer == "deepspeed")


def check_model(name: str) -> None:
    """The model must load its config (a local folder, or a hub id reachable or cached)."""
    from transformers import AutoConfig

    from ..models import hub_reachable

    try:
        # only the local cache when the hub is out of reach (no retries on an offline machine)
        AutoConfig.from_pretrained(name, local_files_only=not (os.path.isdir(name) or hub_reachable()))
    except Exception:  # OSError, ValueError, HFValidationError...: all mean "not loadable"
        where = "folder" if os.path.exists(name) else "model"
        raise IcuError(
            f"--model_name {name!r}: {where} not loadable (no local folder with config.json, not "
            "reachable on the hub); `python -m icu.toy --out datasets/toy` builds the offline toy "
            "model in datasets/toy/model"
        ) from None


def check_split(data_dir: str, exp: str) -> None:
    from ..data import load_experiment

    try:
        load_experiment(data_dir, exp)
    except IcuError as exc:
        raise IcuError(
            f"{exc}. For the toy world: python data_prep.py --train_file datasets/toy/train_dataset.npy "
            f"--exp_dir {data_dir} --exps {exp} --embedder builtin:all-MiniLM-L6-v2 --gpt2_name builtin:gpt2"
        ) from None


def check_tasks(args: argparse.Namespace) -> list[str]:
    if not args.tasks:
        return []
    from ..downstream import parse_assignments, parse_task_list, resolve_sources

    names = parse_task_list(args.tasks)
    try:
        resolve_sources(names, args.task_dir, parse_assignments(args.task_file, "--task_file"), None)
    except IcuError as exc:
        raise IcuError(str(exc).replace("--data_dir", "--task_dir")) from None
    return names


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b):
        return os.path.normpath(a) == os.path.normpath(b)
    return a == b


def expected_run_args(args: argparse.Namespace, method: str, params: dict[str, Any]) -> dict:
    return {"method": method, "exp": args.exp, "data_dir": args.data_dir, "model_name": args.model_name,
           "batch_size": args.batch_size, "prefix_length": args.prefix_length,
           "suffix_length": args.suffix_length, "target_length": args.target_length, **params}


def check_existing_runs(args: argparse.Namespace, plan: Plan) -> None:
    """A run already in --dir made with other settings is never reused nor overwritten."""
    for method, params in plan.params.items():
        train_dir = MethodDir(os.path.join(args.dir, method)).train
        _, run = train_state(train_dir)
        if not run:
            continue
        old = run.get("args") or {}
        expected = expected_run_args(args, method, params)
        diffs = [f"{k} {old[k]!r} -> {v!r}" for k, v in expected.items() if k in old and not _same(old[k], v)]
        if diffs:
            raise IcuError(
                f"{train_dir} holds a {method} run with other settings ({'; '.join(diffs)}); delete "
                f"{os.path.join(args.dir, method)} to rerun it, or choose another --dir"
            )


def use_threshold_file(cfg, path: str, user_file: Optional[str]) -> None:
    """``--thresholds``: every method's trainer gets ``--thresholds path``; the shipped config's
    acc / el give way to it (they would win as explicit trainer flags), a user file's do not."""
    from ..thresholds import load_thresholds
    from .config import read_config_file

    load_thresholds(path)  # a missing or malformed file fails now, before any training
    user_common = read_config_file(user_file).common if user_file else {}
    for key in ("acc", "el"):
        if key not in user_common:
            cfg.common.pop(key, None)
    cfg.common["thresholds"] = path


def report_thresholds(common: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, float]:
    """The MA / EL stop thresholds every method runs with, for the table and the plot: ``acc`` /
    ``el`` under ``common:`` win, as on the trainer's command line, then a calibrated
    ``thresholds:`` file (eval.py --calibrate), then the trainer's defaults."""
    out = {k: float(parser.get_default(k)) for k in ("acc", "el")}
    if common.get("thresholds"):
        from ..thresholds import load_thresholds

        th = load_thresholds(str(common["thresholds"]))
        el_n = str(common.get("el_n", parser.get_default("el_n"))).split(",")[0]
        out["acc"] = float(th["ma"])
        if el_n in th["el"]:
            out["el"] = float(th["el"][el_n])
    out.update({k: float(common[k]) for k in ("acc", "el") if k in common})
    return out


def make_plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no model run: methods, config, split, model, tasks, held-out rows,
    output folder, earlier runs in it. Raises IcuError; nothing has been written yet."""
    parser = trainer_parser(args.trainer)
    methods = parse_methods(args.methods)
    cfg = load_method_config(args.config, parser)
    if args.thresholds:
        use_threshold_file(cfg, args.thresholds, args.config)
    params = resolve_methods(cfg, methods, parser, args.config)
    thresholds = report_thresholds(cfg.common, parser)
    if args.trainer == "deepspeed" and shutil.which("deepspeed") is None:
        raise IcuError("--trainer deepspeed: the `deepspeed` launcher is not on PATH; pip install deepspeed")
    check_split(args.data_dir, args.exp)
    check_model(args.model_name)
    plan = Plan(methods, params, parser, thresholds, tasks=check_tasks(args))
    if args.heldout:
        from ..heldout import load_heldout

        plan.heldout = load_heldout(args.heldout)
        plan.heldout_key = hashlib.sha1(np.ascontiguousarray(plan.heldout).tobytes()).hexdigest()[:16]
    check_writable_dir(args.dir, "--dir")
    check_existing_runs(args, plan)
    return plan


# ----------------------------------------------------------------------------- one method


def train(args: argparse.Namespace, plan: Plan, method: str, md: MethodDir) -> dict:
    """The trainer's run for ``method`` (reused when finished). Returns its train info."""
    state, run = train_state(md.train)
    trained = state != "finished"
    if not trained:
        logger.info("%s: reusing the finished run in %s (%s epochs)", method, md.train, run.get("epochs"))
    else:
        mode = {"partial": "resume", "stale": "overwrite", "empty": None}[state]
        if mode == "resume":
            logger.info("%s: resuming the unfinished run in %s", method, md.train)
        cmd = trainer_command(args, method, flag_tokens(plan.params[method], plan.parser), md.train, mode)
        failure = check_step(run_step(cmd, md.out_file("train"), method), md.out_file("train"), f"{method}: the trainer")
        if failure:
            return {"failed": failure}
        state, run = train_state(md.train)
        if state != "finished":
            return {"failed": f"{method}: the trainer ended without a saved model; see {md.out_file('train')}"}
    return {"model_dir": run["model_dir"], "epochs": run.get("epochs"), "seconds": run.get("seconds"),
            "stop_reason": run.get("stop_reason"), "trained": trained}


def evaluate(args: argparse.Namespace, plan: Plan, method: str, md: MethodDir, row: dict, tokenizer: Optional[str]) -> None:
    """eval.py, held-out loss and valid.py for ``row['model_dir']``; steps already in ``row``
    for the same model are kept. Updates ``row`` (and row.json) after each step."""
    model_dir = row["model_dir"]
    cmd = eval_command(args, model_dir, tokenizer, md.eval)
    # eval.py's outputs are reused only when made with the same settings (model, lengths, EL n...)
    key = [a for i, a in enumerate(cmd[1:]) if a != "--dir" and cmd[i] != "--dir"]
    done = "eval" in row and row.get("eval_command", key) == key
    if not done or not os.path.isfile(os.path.join(md.eval, "unlearn.csv")):
        failure = check_step(run_step(cmd, md.out_file("eval"), method), md.out_file("eval"), f"{method}: eval.py")
        if failure:
            row["failed"] = failure
            return
        row["eval"] = pd.read_csv(os.path.join(md.eval, "eval.csv")).iloc[0].to_dict()
        row["eval_command"] = key
        save_row(md, row)
    if plan.heldout is not None and (row.get("heldout") or {}).get("key") != plan.heldout_key:
        from ..cli import resolve_device
        from ..heldout import mean_lm_loss

        t0 = time.time()
        loss = mean_lm_loss(model_dir, plan.heldout, batch_size=args.eval_batch_size or args.batch_size,
                            gpt2_name=args.gpt2_name, tokenizer_name=tokenizer,
                            device=resolve_device(args.device), dtype=args.dtype)
        row["heldout"] = {"key": plan.heldout_key, "rows": len(plan.heldout), "loss": loss, "file": args.heldout}
        logger.info("%s: held-out LM loss %.4f on %d rows (%.1f s)", method, loss, len(plan.heldout), time.time() - t0)
        save_row(md, row)
    want = {"names": plan.tasks, "limit": args.task_limit}
    if plan.tasks and {k: (row.get("tasks") or {}).get(k) for k in want} != want:
        cmd = valid_command(args, model_dir, tokenizer, plan.tasks, md.valid)
        rc = run_step(cmd, md.out_file("valid"), method)
        failure = check_step(rc, md.out_file("valid"), f"{method}: valid.py")
        values = pd.read_csv(os.path.join(md.valid, "valid_result.csv")).iloc[0].to_dict() if os.path.isfile(
            os.path.join(md.valid, "valid_result.csv")) else {}
        row["tasks"] = {**want, "values": values}
        if failure:
            row["failed"] = failure
        save_row(md, row)


def save_row(md: MethodDir, row: dict) -> None:
    if read_json(md.row_file) == json.loads(json.dumps(row, default=str)):
        return  # unchanged: a reused method leaves its files untouched
    with disk_errors(md.row_file):
        write_json(md.row_file, row)


def run_method(args: argparse.Namespace, plan: Plan, method: str) -> dict:
    """Train (unless original) and evaluate one method; returns its row.json content."""
    md = MethodDir(os.path.join(args.dir, method))
    os.makedirs(md.root, exist_ok=True)
    if method == ORIGINAL:
        info = {"model_dir": args.model_name, "epochs": 0, "seconds": 0.0, "stop_reason": "untrained"}
        tokenizer = args.tokenizer_name
    else:
        info = train(args, plan, method, md)
        tokenizer = None  # the trainer saves the tokenizer with the model
        if "failed" in info:
            logger.error("%s", info["failed"])
            row = {"method": method, **info}
            save_row(md, row)
            return row
    old = read_json(md.row_file) or {}
    # Measurements of another model (trained again, or resumed to its end) are not this model's.
    fresh = info.pop("trained", False) or old.get("model_dir") != info["model_dir"]
    row = {} if fresh else old
    row.pop("failed", None)
    row.update(method=method, **info)
    evaluate(args, plan, method, md, row, tokenizer)
    save_row(md, row)
    return row


def run_comparison(args: argparse.Namespace) -> int:
    """The whole comparison; returns the exit code (0, or 1 when a method failed)."""
    plan = make_plan(args)
    setup_logging(os.path.join(args.dir, "compare.log"))
    logger.info("comparing %s on %s/%s with %s (output %s)", ",".join(plan.methods), args.data_dir,
                args.exp, args.model_name, args.dir)
    rows: list[dict] = []
    t0 = time.time()
    for i, method in enumerate(plan.methods, 1):
        logger.info("== [%d/%d] %s", i, len(plan.methods), method)
        t_method = time.time()
        rows.append(run_method(args, plan, method))
        table = write_report(args.dir, rows, plan.tasks, args.el_n, plan.thresholds)  # after each method
        logger.info("%s: done in %.1f s", method, time.time() - t_method)
    logger.info("comparison finished in %.1f s; wrote %s", time.time() - t0,
                ", ".join(os.path.join(args.dir, f) for f in ("comparison.csv", "comparison.md", "tradeoff.png",
                                                                 "results.json")))
    print(table)
    failed = [r["method"] for r in rows if r.get("failed")]
    if failed:
        logger.error("failed: %s (see their rows' stop_reason)", ", ".join(failed))
        return 1
    return 0
