"""compare.py's work: check everything, tune learning rates on other targets (with an lr grid),
then per run and method train (or reuse), evaluate, and report.

    tuning (with --lr_grid or lr lists in the config; needs --tune_exp):
        {dir}/tuning/{method}/lr{lr}/train   each grid lr on the tuning split (seed --tune_seed,
                                             default the first of --seeds)
        {dir}/tuning.csv|json                every grid result and the lr chosen per method
    for run in --exp x --seeds:         (one run without --seeds: the folders sit in {dir}/)
      for method in --methods:          (original = the untrained model, nothing to train)
        .../{method}/train   the trainer's run (reused when finished, --resume when cut short);
                             with --heldout its held-out loss at every validation
        .../{method}/eval    the forget-set evaluation of the final model: the run's last
                             validation when it is eval.py's computation, else eval.py
        .../{method}/valid   valid.py on the chosen tasks (with --tasks)
        .../{method}/row.json  the method's numbers, written after every step
    {dir}/comparison.csv|md, runs.csv, trajectories.csv, differences.csv|md, tradeoff.png,
    results.json          rewritten after every method
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
from ..data import atomic_write_text
from ..report import write_json
from .config import ORIGINAL, flag_tokens, load_method_config, parse_methods, resolve_methods
from .report import plot_tuning, write_report
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
    every_run_tasks: list[str] = field(default_factory=list)  # of tasks, those scored past --task_runs
    heldout: Optional[np.ndarray] = None
    heldout_key: Optional[str] = None
    runs: list["RunKey"] = field(default_factory=list)
    multi: bool = False  # several runs: folders under {dir}/runs/
    grids: dict[str, list[float]] = field(default_factory=dict)  # method -> lrs to tune
    unseen: Optional[np.ndarray] = None  # membership-inference negatives


@dataclass(frozen=True)
class RunKey:
    """One repetition of the comparison: a split and the trainers' --seed (None: their default)."""

    exp: str
    seed: Optional[int] = None

    @property
    def label(self) -> str:
        return self.exp if self.seed is None else f"{self.exp}/seed{self.seed}"


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


def check_tasks(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--tasks and, of them, --every_run_tasks, checked."""
    every = comma_items(args.every_run_tasks)
    if not args.tasks:
        if every:
            raise IcuError("--every_run_tasks needs --tasks: it names which of them are scored on every run")
        return [], []
    from ..downstream import parse_assignments, parse_task_list, resolve_sources

    names = parse_task_list(args.tasks)
    extra = [t for t in every if t not in names]
    if extra:
        raise IcuError(f"--every_run_tasks {','.join(extra)}: not among --tasks {','.join(names)}; "
                       "name tasks that --tasks scores")
    try:
        resolve_sources(names, args.task_dir, parse_assignments(args.task_file, "--task_file"), None)
    except IcuError as exc:
        raise IcuError(str(exc).replace("--data_dir", "--task_dir")) from None
    return names, [t for t in names if t in every]


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
    """A run already in --dir made with other settings is never reused nor overwritten (the lr
    of a tuned method is checked once tuning has chosen it)."""
    for key in plan.runs:
        for method, params in plan.params.items():
            params = {k: v for k, v in run_params(params, key).items() if not (k == "lr" and method in plan.grids)}
            check_existing_run(run_args(args, key), method, params, method_dir(args, plan, key, method).train)


def check_existing_run(args: argparse.Namespace, method: str, params: dict[str, Any], train_dir: str) -> None:
    """IcuError when ``train_dir`` holds a ``method`` run made with settings other than these."""
    _, run = train_state(train_dir)
    if not run:
        return
    old = run.get("args") or {}
    expected = expected_run_args(args, method, params)
    diffs = [f"{k} {old[k]!r} -> {v!r}" for k, v in expected.items() if k in old and not _same(old[k], v)]
    if diffs:
        raise IcuError(
            f"{train_dir} holds a {method} run with other settings ({'; '.join(diffs)}); delete "
            f"{os.path.dirname(train_dir)} to rerun it, or choose another --dir"
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


def parse_seeds(text: Optional[str]) -> list[Optional[int]]:
    """``--seeds 0,1,2`` -> [0, 1, 2]; no flag -> [None] (the trainers' default seed)."""
    if text is None:
        return [None]
    try:
        seeds = list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise IcuError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2")
    return seeds


def parse_lrs(value, where: str) -> list[float]:
    """A grid of learning rates from ``"1e-4,5e-5"`` or a config list; IcuError when not all > 0."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        lrs = list(dict.fromkeys(float(str(x).strip()) for x in items if str(x).strip()))
    except ValueError:
        lrs = []
    if not lrs or min(lrs) <= 0:
        raise IcuError(f"{where}: expected learning rates > 0, e.g. 1e-4,5e-5,2e-5 (got {value!r})")
    return lrs


def take_lr_grids(cfg, args: argparse.Namespace, methods: list[str]) -> dict[str, list[float]]:
    """Per trained method, the lrs to tune: ``--lr_grid`` for every method, else an ``lr:`` list
    in its config section (removed there: the section then holds one value per flag)."""
    grids: dict[str, list[float]] = {}
    for name in methods:
        section = cfg.methods.get(name, {})
        if isinstance(section.get("lr"), list):
            grids[name] = parse_lrs(section["lr"], f"config methods.{name}.lr")
            section["lr"] = grids[name][0]  # a placeholder until tuning chooses
    if isinstance(cfg.common.get("lr"), list):
        raise IcuError("config common: lr lists belong under methods.<name> (each method is tuned alone)")
    if args.lr_grid:
        grid = parse_lrs(args.lr_grid, "--lr_grid")
        grids = {m: grid for m in methods if m != ORIGINAL}
    return grids


def split_doc_ids(data_dir: str, exp: str) -> set[int]:
    from ..data import load_experiment

    _, ids, _, _ = load_experiment(data_dir, exp, need_learn=False)
    return set(int(i) for i in ids)


def check_tuning(args: argparse.Namespace, grids: dict, exps: list[str]) -> None:
    """An lr grid runs on --tune_exp only, which must share no target with the reported splits."""
    if args.tune_seed is not None and (not args.tune_exp or args.tune_seed < 0):
        raise IcuError(f"--tune_seed {args.tune_seed}: give a seed >= 0, together with --tune_exp")
    if grids and not args.tune_exp:
        raise IcuError("an lr grid (--lr_grid or an lr list in the config) needs --tune_exp: a split of "
                       "tuning targets that are not the reported ones")
    if not args.tune_exp:
        return
    if not grids:
        raise IcuError("--tune_exp without an lr grid: give --lr_grid 1e-4,5e-5,... or lr lists in the config")
    check_split(args.data_dir, args.tune_exp)
    tune_ids = split_doc_ids(args.data_dir, args.tune_exp)
    for exp in exps:
        shared = tune_ids & split_doc_ids(args.data_dir, exp)
        if exp == args.tune_exp or shared:
            raise IcuError(f"--tune_exp {args.tune_exp} shares {len(shared) or 'all'} target(s) with the reported "
                           f"split {exp}; tune on targets that are not reported (e.g. python -m icu.realworld's "
                           "tune / test splits)")


def make_plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no model run: methods, config, splits, seeds, lr grids, model,
    tasks, held-out rows, output folder, earlier runs in it. Raises IcuError; nothing has been
    written yet."""
    parser = trainer_parser(args.trainer)
    methods = parse_methods(args.methods)
    cfg = load_method_config(args.config, parser)
    if args.thresholds:
        use_threshold_file(cfg, args.thresholds, args.config)
    grids = take_lr_grids(cfg, args, methods)
    params = resolve_methods(cfg, methods, parser, args.config)
    thresholds = report_thresholds(cfg.common, parser)
    if args.trainer == "deepspeed" and shutil.which("deepspeed") is None:
        raise IcuError("--trainer deepspeed: the `deepspeed` launcher is not on PATH; pip install deepspeed")
    exps = list(dict.fromkeys(e.strip() for e in args.exp.split(",") if e.strip()))
    if not exps:
        raise IcuError("--exp is empty; name a split, e.g. exp0 or exp0,exp1")
    seeds = parse_seeds(args.seeds)
    for exp in exps:
        check_split(args.data_dir, exp)
    check_tuning(args, grids, exps)
    for base in baselines(args.baseline):
        if base not in methods:
            raise IcuError(f"--baseline {base} is not among --methods {','.join(methods)}")
    check_model(args.model_name)
    tasks, every_run_tasks = check_tasks(args)
    plan = Plan(methods, params, parser, thresholds, tasks=tasks, every_run_tasks=every_run_tasks, grids=grids,
                runs=[RunKey(e, s) for e in exps for s in seeds])
    plan.multi = len(plan.runs) > 1 or args.seeds is not None
    if args.heldout:
        from ..heldout import load_heldout

        plan.heldout = load_heldout(args.heldout)
        plan.heldout_key = hashlib.sha1(np.ascontiguousarray(plan.heldout).tobytes()).hexdigest()[:16]
        for p in params.values():  # every validation records the held-out loss (its trajectory)
            p.setdefault("heldout", os.path.abspath(args.heldout))
    if args.tune_heldout:
        from ..heldout import load_heldout

        load_heldout(args.tune_heldout)
    if args.unseen:
        from ..heldout import load_heldout

        plan.unseen = load_heldout(args.unseen)
    if args.eval_batch_size:  # validations batched like eval.py: the last one can stand for it
        for p in params.values():
            p.setdefault("eval_batch_size", args.eval_batch_size)
    check_writable_dir(args.dir, "--dir")
    check_existing_runs(args, plan)
    return plan


def method_dir(args: argparse.Namespace, plan: Plan, run: RunKey, method: str) -> MethodDir:
    """``{dir}/{method}`` for a single run; ``{dir}/runs/{exp}/seed{S}/{method}`` for several
    (``{dir}/runs/{exp}/original``: the untrained model does not depend on the seed)."""
    if not plan.multi:
        return MethodDir(os.path.join(args.dir, method))
    if method == ORIGINAL:
        return MethodDir(os.path.join(args.dir, "runs", run.exp, ORIGINAL))
    return MethodDir(os.path.join(args.dir, "runs", run.exp, f"seed{run.seed}", method))


def run_args(args: argparse.Namespace, run: RunKey) -> argparse.Namespace:
    """compare.py's flags as one run's steps see them: its split."""
    out = argparse.Namespace(**vars(args))
    out.exp = run.exp
    return out


def run_params(params: dict[str, Any], run: RunKey) -> dict[str, Any]:
    return params if run.seed is None else {**params, "seed": run.seed}


# ----------------------------------------------------------------------------- one method


def train(args: argparse.Namespace, plan: Plan, method: str, md: MethodDir, params: dict[str, Any]) -> dict:
    """The trainer's run for ``method`` with ``params`` (reused when finished). Returns its
    train info, with the trajectory of its validations."""
    state, run = train_state(md.train)
    trained = state != "finished"
    if not trained:
        logger.info("%s: reusing the finished run in %s (%s epochs)", method, md.train, run.get("epochs"))
    else:
        mode = {"partial": "resume", "stale": "overwrite", "empty": None}[state]
        if mode == "resume":
            logger.info("%s: resuming the unfinished run in %s", method, md.train)
        cmd = trainer_command(args, method, flag_tokens(params, plan.parser), md.train, mode)
        failure = check_step(run_step(cmd, md.out_file("train"), method), md.out_file("train"), f"{method}: the trainer")
        if failure:
            return {"failed": failure}
        state, run = train_state(md.train)
        if state != "finished":
            return {"failed": f"{method}: the trainer ended without a saved model; see {md.out_file('train')}"}
    return {"model_dir": run["model_dir"], "epochs": run.get("epochs"), "seconds": run.get("seconds"),
            "stop_reason": run.get("stop_reason"), "trained": trained,
            "lr": (run.get("args") or {}).get("lr"), "trajectory": trajectory(md.train)}


def trajectory(train_dir: str) -> list[dict]:
    """The run's validations from its history.csv: epoch, MA, EL, held-out loss and its SE."""
    path = os.path.join(train_dir, "history.csv")
    if not os.path.isfile(path):
        return []
    df = pd.read_csv(path)
    keep = [c for c in df.columns if c in ("epoch", "acc", "heldout_loss", "heldout_se", "flagged")
            or c.startswith("el_")]
    return json.loads(df[keep].to_json(orient="records"))


def equal_forgetting(points: list[dict], acc: float) -> dict:
    """Held-out loss (and its SE) where the trajectory's MA crosses ``acc`` (stats.crossing)."""
    from .stats import crossing

    if not points or "heldout_loss" not in points[0]:
        return {"reached": None}
    ma = [p["acc"] for p in points]
    at = crossing(ma, [p["heldout_loss"] if p["heldout_loss"] is not None else math.nan for p in points], acc)
    se = crossing(ma, [p.get("heldout_se") if p.get("heldout_se") is not None else math.nan for p in points], acc)
    finite = lambda v: None if v is None or math.isnan(v) else float(v)  # row.json holds no NaN
    return {"loss": finite(at["value"]), "se": finite(se["value"]), "epoch": finite(at["epoch"]),
            "reached": at["reached"]}


def reuse_last_validation(args: argparse.Namespace, md: MethodDir, model_dir: str) -> Optional[dict]:
    """eval.py's outputs written from the trainer's last validation, when that validation is
    eval.py's computation on this model: the same split, lengths, batch, EL definition and n,
    dtype, nothing skipped. Returns eval.csv's row, or None when eval.py must run."""
    from ..metrics import EL_START, el_column

    run = read_json(os.path.join(md.train, "run.json")) or {}
    a = run.get("args") or {}
    hist_path = os.path.join(md.train, "history.csv")
    if run.get("model_dir") != model_dir or not os.path.isfile(hist_path):
        return None
    last = pd.read_csv(hist_path).iloc[-1]
    batch = a.get("eval_batch_size") or a.get("batch_size")
    same = (batch == (args.eval_batch_size or args.batch_size) and str(a.get("el_n")) == str(args.el_n)
            and a.get("el_start", EL_START) == EL_START and a.get("dtype") == args.dtype
            and all(a.get(k) == getattr(args, k) for k in ("exp", "prefix_length", "suffix_length", "target_length"))
            and not bool(last.get("el_skipped", False)))
    epoch_csv = os.path.join(md.train, f"epoch{int(last['epoch'])}.csv")
    if not same or not os.path.isfile(epoch_csv):
        return None
    from ..forget_eval import eval_outputs

    el_cols = [el_column(int(n), EL_START) for n in str(args.el_n).split(",") if n.strip()]
    per_sample, summary = eval_outputs(pd.read_csv(epoch_csv, keep_default_na=False, na_values=[""]),
                                       last["val_loss"], el_cols)
    os.makedirs(md.eval, exist_ok=True)
    with disk_errors(md.eval):
        atomic_write_text(os.path.join(md.eval, "unlearn.csv"), per_sample.to_csv(index=False))
        atomic_write_text(os.path.join(md.eval, "eval.csv"), pd.DataFrame([summary]).to_csv(index=False))
        write_json(os.path.join(md.eval, "reused.json"), {"from": epoch_csv, "run": os.path.join(md.train, "run.json")})
    return summary


def evaluate(args: argparse.Namespace, plan: Plan, method: str, md: MethodDir, row: dict, tokenizer: Optional[str]) -> None:
    """Forget-set evaluation (the last validation, else eval.py), held-out loss, membership
    inference and valid.py for ``row['model_dir']``; steps already in ``row`` for the same model
    are kept. Updates ``row`` (and row.json) after each step."""
    model_dir = row["model_dir"]
    cmd = eval_command(args, model_dir, tokenizer, md.eval)
    # eval.py's outputs are reused only when made with the same settings (model, lengths, EL n...)
    key = [a for i, a in enumerate(cmd[1:]) if a != "--dir" and cmd[i] != "--dir"]
    done = "eval" in row and row.get("eval_command", key) == key
    if not done or not os.path.isfile(os.path.join(md.eval, "unlearn.csv")):
        reused = reuse_last_validation(args, md, model_dir) if method != ORIGINAL else None
        if reused is not None:
            logger.info("%s: the forget-set evaluation is the run's last validation (eval.py's computation); "
                        "eval.py not run again", method)
            row["eval"] = reused
        else:
            failure = check_step(run_step(cmd, md.out_file("eval"), method), md.out_file("eval"), f"{method}: eval.py")
            if failure:
                row["failed"] = failure
                return
            row["eval"] = pd.read_csv(os.path.join(md.eval, "eval.csv")).iloc[0].to_dict()
        row["eval_command"] = key
        save_row(md, row)
    in_process_measures(args, plan, method, md, row, tokenizer)
    # valid.py: every task on the first --task_runs runs, only --every_run_tasks on the others
    names = plan.tasks if row.get("with_tasks", True) else plan.every_run_tasks
    want = {"names": names, "limit": args.task_limit}
    have = row.get("tasks") or {}
    # scores of more tasks at the same limits are kept: a later worker asking fewer loses none
    if names and not (have.get("limit") == args.task_limit and set(names) <= set(have.get("names") or ())):
        cmd = valid_command(args, model_dir, tokenizer, names, md.valid)
        rc = run_step(cmd, md.out_file("valid"), method)
        failure = check_step(rc, md.out_file("valid"), f"{method}: valid.py")
        values = pd.read_csv(os.path.join(md.valid, "valid_result.csv")).iloc[0].to_dict() if os.path.isfile(
            os.path.join(md.valid, "valid_result.csv")) else {}
        row["tasks"] = {**want, "values": values}
        if failure:
            row["failed"] = failure
        save_row(md, row)


def in_process_measures(args: argparse.Namespace, plan: Plan, method: str, md: MethodDir, row: dict,
                        tokenizer: Optional[str]) -> None:
    """The held-out loss (from the run's last validation when it recorded one, else one pass
    here) and the membership-inference AUCs of the forget targets against --unseen rows."""
    need_heldout = plan.heldout is not None and (row.get("heldout") or {}).get("key") != plan.heldout_key
    unseen_key = None if plan.unseen is None else hashlib.sha1(np.ascontiguousarray(plan.unseen).tobytes()).hexdigest()[:16]
    need_mia = plan.unseen is not None and (row.get("membership") or {}).get("key") != unseen_key
    if need_heldout:
        last = (row.get("trajectory") or [{}])[-1]
        if last.get("heldout_loss") is not None and (read_json(os.path.join(md.train, "run.json")) or {}).get(
                "args", {}).get("heldout") == os.path.abspath(args.heldout):
            row["heldout"] = {"key": plan.heldout_key, "rows": len(plan.heldout), "loss": last["heldout_loss"],
                              "se": last.get("heldout_se"), "file": args.heldout, "source": "last validation"}
            need_heldout = False
            save_row(md, row)
    if not (need_heldout or need_mia):
        return
    from ..cli import resolve_device
    from ..data import load_experiment
    from ..heldout import encode_heldout, heldout_row_losses, summarize
    from ..models import load_model, load_tokenizer

    t0 = time.time()
    device = resolve_device(args.device)
    gpt2 = load_tokenizer(args.gpt2_name)
    tok = load_tokenizer(tokenizer or row["model_dir"])
    model = load_model(row["model_dir"], dtype=args.dtype, device=device)
    batch = args.eval_batch_size or args.batch_size
    if need_heldout:
        losses = heldout_row_losses(model, encode_heldout(plan.heldout, gpt2, tok), range(len(plan.heldout)), batch)
        h = summarize(losses)
        row["heldout"] = {"key": plan.heldout_key, "rows": h["rows"], "loss": h["loss"],
                          "se": None if math.isnan(h["se"]) else h["se"],
                          "file": args.heldout, "source": "compare.py"}
        logger.info("%s: held-out LM loss %.4f ± %.4f (SE) on %d rows (%.1f s)", method, h["loss"], h["se"],
                    h["rows"], time.time() - t0)
    if need_mia:
        from ..membership import membership_eval

        targets, _, _, _ = load_experiment(args.data_dir, args.exp, need_learn=False)
        per_row, aucs = membership_eval(model, tok, gpt2, targets, plan.unseen, batch_size=batch)
        with disk_errors(md.root):
            atomic_write_text(os.path.join(md.root, "membership.csv"), per_row.to_csv(index=False))
        row["membership"] = {"key": unseen_key, "file": args.unseen, **{k: float(v) for k, v in aucs.items()}}
        logger.info("%s: membership inference AUC (targets vs %d unseen rows): %s", method, len(plan.unseen),
                    "  ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    del model
    save_row(md, row)


def save_row(md: MethodDir, row: dict) -> None:
    if read_json(md.row_file) == json.loads(json.dumps(row, default=str)):
        return  # unchanged: a reused method leaves its files untouched
    with disk_errors(md.row_file):
        write_json(md.row_file, row)


def run_method(args: argparse.Namespace, plan: Plan, run: RunKey, method: str) -> dict:
    """Train (unless original) and evaluate one method in one run; returns its row.json content."""
    md = method_dir(args, plan, run, method)
    args = run_args(args, run)
    os.makedirs(md.root, exist_ok=True)
    if method == ORIGINAL:
        info = {"model_dir": args.model_name, "epochs": 0, "seconds": 0.0, "stop_reason": "untrained"}
        tokenizer = args.tokenizer_name
    else:
        info = train(args, plan, method, md, run_params(plan.params[method], run))
        tokenizer = None  # the trainer saves the tokenizer with the model
        if "failed" in info:
            logger.error("%s", info["failed"])
            row = {"method": method, "exp": run.exp, "seed": run.seed, **info}
            save_row(md, row)
            return row
    old = read_json(md.row_file) or {}
    # Measurements of another model (trained again, or resumed to its end) are not this model's.
    fresh = info.pop("trained", False) or old.get("model_dir") != info["model_dir"]
    row = {} if fresh else old
    row.pop("failed", None)
    row.update(method=method, exp=run.exp, seed=None if method == ORIGINAL else run.seed, **info)
    # the untrained model is one model per split: it counts as its split's first run
    index = plan.runs.index(run) if method != ORIGINAL else min(i for i, r in enumerate(plan.runs) if r.exp == run.exp)
    row["with_tasks"] = args.task_runs is None or index < args.task_runs
    if method != ORIGINAL:
        row["at_threshold"] = equal_forgetting(row.get("trajectory") or [], plan.thresholds["acc"])
    evaluate(args, plan, method, md, row, tokenizer)
    if method == ORIGINAL and row.get("eval") and row.get("heldout"):  # its trajectory: one point
        row["trajectory"] = [{"epoch": 0, "acc": row["eval"].get("ma"), "heldout_loss": row["heldout"]["loss"],
                              "heldout_se": row["heldout"].get("se")}]
    save_row(md, row)
    return row


# ----------------------------------------------------------------------------- tuning


def comma_items(spec: Optional[str]) -> list[str]:
    """"ga, kl" -> ["ga", "kl"] (None or empty: none)."""
    return [b.strip() for b in (spec or "").split(",") if b.strip()]


def baselines(spec: Optional[str]) -> list[str]:
    """--baseline ga,kl -> ["ga", "kl"] (None or empty: no paired differences)."""
    return comma_items(spec)


def tune(args: argparse.Namespace, plan: Plan) -> None:
    """Each grid lr on the tuning split (--tune_exp, --tune_seed or the first seed); per method the lr with the
    lowest held-out loss at equal forgetting among the runs that reached the stop rule becomes
    the lr of every reported run. Writes tuning.csv / tuning.json; never reads the reported splits."""
    from .stats import best_lr

    if not plan.grids:
        return
    seed = plan.runs[0].seed if args.tune_seed is None else args.tune_seed
    key = RunKey(args.tune_exp, seed)
    targs = run_args(args, key)
    heldout = os.path.abspath(args.tune_heldout or args.heldout) if (args.tune_heldout or args.heldout) else None
    results, choices = [], {}
    for method, grid in plan.grids.items():
        rows = []
        for lr in grid:
            md = MethodDir(os.path.join(args.dir, "tuning", method, f"lr{lr:g}"))
            params = {**run_params(plan.params[method], key), "lr": lr}
            if heldout:
                params["heldout"] = heldout
            check_existing_run(targs, method, params, md.train)
            logger.info("== tuning %s: lr %g on %s", method, lr, args.tune_exp)
            info = train(targs, plan, method, md, params)
            at = equal_forgetting(info.get("trajectory") or [], plan.thresholds["acc"])
            stopped = bool(info.get("stop_reason")) and not str(info.get("stop_reason")).startswith("reached --max_epochs")
            rows.append({"method": method, "lr": lr, "exp": args.tune_exp, "seed": seed,
                         "epochs": info.get("epochs"), "stop_reason": info.get("stop_reason") or info.get("failed"),
                         "reached": bool(stopped and at.get("reached")), "score": at.get("loss"),
                         "score_se": at.get("se"), "epoch_at_threshold": at.get("epoch"),
                         "final_ma": (info.get("trajectory") or [{}])[-1].get("acc")})
        best = best_lr(rows)
        if best is None:  # nothing reached the thresholds: the lr that forgot the most
            best = min(rows, key=lambda r: (r["final_ma"] if r["final_ma"] is not None else math.inf, -r["lr"]))
            logger.warning("tuning %s: no grid lr reached the stop rule; taking lr %g (lowest final MA %.4f)",
                           method, best["lr"], best["final_ma"])
            reason = "no grid lr reached the stop rule: the lowest final MA"
        else:
            reason = "lowest held-out loss at equal forgetting among the runs that reached the stop rule"
        choices[method] = {"lr": best["lr"], "why": reason}
        plan.params[method]["lr"] = best["lr"]
        for r in rows:
            r["chosen"] = r["lr"] == best["lr"]
        results += rows
        logger.info("tuning %s: chose lr %g (%s)", method, best["lr"], reason)
        with disk_errors(args.dir):  # after every method: a long tuning shows its progress
            atomic_write_text(os.path.join(args.dir, "tuning.csv"), pd.DataFrame(results).to_csv(index=False))
            write_json(os.path.join(args.dir, "tuning.json"), {
                "tune_exp": args.tune_exp, "seed": seed, "heldout": heldout, "acc": plan.thresholds["acc"],
                "chosen": choices, "grid": results})
            plot_tuning(pd.DataFrame(results), os.path.join(args.dir, "tuning.png"))
    for run in plan.runs:  # the reported runs' folders must match the chosen lrs
        for method in plan.grids:
            check_existing_run(run_args(args, run), method, run_params(plan.params[method], run),
                               method_dir(args, plan, run, method).train)


def run_comparison(args: argparse.Namespace) -> int:
    """The whole comparison; returns the exit code (0, or 1 when a method failed)."""
    plan = make_plan(args)
    setup_logging(os.path.join(args.dir, "compare.log"))
    logger.info("comparing %s on %s/%s with %s (output %s)", ",".join(plan.methods), args.data_dir,
                args.exp, args.model_name, args.dir)
    tune(args, plan)
    rows: list[dict] = []
    t0 = time.time()
    for r, run in enumerate(plan.runs, 1):
        for i, method in enumerate(plan.methods, 1):
            where = f" run {r}/{len(plan.runs)} ({run.label})" if plan.multi else ""
            logger.info("== [%d/%d]%s %s", i, len(plan.methods), where, method)
            t_method = time.time()
            rows.append(run_method(args, plan, run, method))
            table = write_report(args.dir, rows, plan.tasks, args.el_n, plan.thresholds,
                                 baselines=baselines(args.baseline), multi=plan.multi)  # after each method
            logger.info("%s: done in %.1f s", method, time.time() - t_method)
    logger.info("comparison finished in %.1f s; wrote %s", time.time() - t0,
                ", ".join(os.path.join(args.dir, f) for f in ("comparison.csv", "comparison.md", "tradeoff.png",
                                                                 "results.json")))
    print(table)
    failed = [f"{r['method']} ({r['exp']}, seed {r['seed']})" if plan.multi else r["method"]
              for r in rows if r.get("failed")]
    if failed:
        logger.error("failed: %s (see their rows' stop_reason)", ", ".join(failed))
        return 1
    return 0
