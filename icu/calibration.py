"""``eval.py --calibrate``: the model's MA, EL_n and generation check on rows it never saw, and
the thresholds.json built from them (see :mod:`icu.thresholds` for the statistics).

The unseen rows go through exactly the forget set's path: encoded by :func:`icu.data.encode_rows`
and scored by :func:`icu.forget_eval.evaluate_forget_set`, so a threshold and the number it is
compared with are computed the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Optional

import numpy as np

from .data import atomic_write_text, load_train_array
from .errors import IcuError, disk_errors
from .metrics import el_column
from .thresholds import CALIBRATION_CSV, THRESHOLDS_FILE, build_thresholds, shared_rows

logger = logging.getLogger("icu")

GPT2_VOCAB = 50257
CSV_COLUMNS = ("id", "ma", "bleu", "P", "R", "F1", "loss", "reference", "candidate")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unseen rows: calibration (--calibrate), else membership inference's negatives")
    g.add_argument("--calibrate", action="store_true",
                   help="score rows the model never saw and write {dir}/thresholds.json and calibration.csv")
    g.add_argument("--unseen", default=None,
                   help="(N, 200) uint16 array of unseen rows, e.g. val_dataset.npy; without --calibrate: "
                        "membership inference of the targets against them")
    g.add_argument("--unseen_rows", default=None,
                   help="int .npy of row indices into --train_file that the model never saw (e.g. heldout_ids.npy)")
    g.add_argument("--train_file", default=None, help="the rows --unseen_rows indexes")
    g.add_argument("--limit", type=int, default=None, help="score only the first N unseen rows")
    g.add_argument("--flag_quantile", type=float, default=0.95,
                   help="quantile of unseen rows' F1 / BLEU suggested as the flag thresholds")


def load_unseen(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows (N, 200) uint16, their ids, a description) from --unseen or --unseen_rows."""
    if (args.unseen is None) == (args.unseen_rows is None):
        raise IcuError("give exactly one of --unseen FILE.npy or --unseen_rows IDS.npy (with --train_file)")
    if args.unseen is not None:
        rows = load_train_array(args.unseen, vocab_size=GPT2_VOCAB, name=f"--unseen {args.unseen}")
        ids, what = np.arange(len(rows), dtype=np.int64), args.unseen
    else:
        if args.train_file is None:
            raise IcuError("--unseen_rows needs --train_file, the array its indices point into")
        train = load_train_array(args.train_file, vocab_size=GPT2_VOCAB)
        ids = _load_ids(args.unseen_rows, len(train))
        rows, what = train[ids], f"{args.unseen_rows} (rows of {args.train_file})"
    if args.limit is not None:
        if args.limit < 1:
            raise IcuError(f"--limit must be a positive integer (got {args.limit})")
        rows, ids = rows[: args.limit], ids[: args.limit]
    return rows, ids, what  # load_train_array validated the rows


def _load_ids(path: str, n_train: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise IcuError(f"--unseen_rows {path}: file not found")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IcuError(f"--unseen_rows {path}: not a readable .npy file ({exc})") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise IcuError(f"--unseen_rows {path}: expected a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= n_train:
        raise IcuError(f"--unseen_rows {path}: indices must lie in [0, {n_train}) for --train_file's {n_train} rows")
    if len(np.unique(ids)) != len(ids):
        raise IcuError(f"--unseen_rows {path}: {len(ids) - len(np.unique(ids))} repeated indices; each row once")
    return ids.astype(np.int64)


def check_not_forget_set(rows: np.ndarray, data_dir: str, exp: str, what: str,
                         forget: Optional[np.ndarray] = None) -> None:
    """Refuse unseen rows that are forget-set targets (by content): the model trained on them.
    ``forget``: the forget set's rows when the caller has them (else read from ``data_dir``)."""
    from .forget_eval import load_forget_set

    if forget is None:
        try:
            forget, _ = load_forget_set(data_dir, exp)
        except IcuError:
            logger.info("no forget set %s under %s: overlap with it not checked", exp, data_dir)
            return
    shared = shared_rows(rows, forget)
    if len(shared):
        raise IcuError(
            f"{what}: {len(shared)} of {len(rows)} unseen rows equal rows of the forget set {exp} "
            f"in {data_dir} (by content, e.g. unseen row {int(shared[0])}); the model trained on them, "
            "so they are not unseen text; remove them"
        )


def run_calibration(args: argparse.Namespace, log: logging.Logger, load) -> dict:
    """Score the unseen rows and write thresholds.json and calibration.csv into --dir.

    ``load(rows, ids)`` -> (model, tokenizer, gpt2, data, scorer): eval.py's model set-up.
    """
    from .forget_eval import evaluate_forget_set
    from .report import versions

    if not 0.0 < args.flag_quantile < 1.0:
        raise IcuError(f"--flag_quantile must lie in (0, 1) (got {args.flag_quantile})")
    rows, ids, what = load_unseen(args)
    check_not_forget_set(rows, args.data_dir, args.exp, what)
    model, tok, gpt2, data, scorer = load(rows, ids)
    log.info("calibrating on %d unseen rows of %s (EL from prefix %d)", len(rows), what, args.el_start)
    t0 = time.time()
    res = evaluate_forget_set(
        model, tok, gpt2, data, scorer=scorer, batch_size=args.batch_size, target_length=args.target_length,
        el_ns=args.el_ns, el_start=args.el_start, progress=not args.no_progress, desc="calibration",
        gen_batch_size=args.gen_batch_size,
    )
    df = res.per_sample
    el_cols = [el_column(n, args.el_start) for n in args.el_ns]
    meta = {
        "model": args.model_name,
        "tokenizer": args.tokenizer_name or args.model_name,
        "bert_name": args.bert_name,
        "gpt2_name": args.gpt2_name,
        "dtype": args.dtype,
        "target_length": args.target_length,
        "unseen": what,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
    }
    th = build_thresholds(df, args.el_ns, args.el_start, quantile=args.flag_quantile, meta=meta)
    cols = list(CSV_COLUMNS[:2]) + el_cols + list(CSV_COLUMNS[2:])
    with disk_errors(args.dir):
        atomic_write_text(os.path.join(args.dir, CALIBRATION_CSV), df[cols].to_csv(index=False))
        atomic_write_text(os.path.join(args.dir, THRESHOLDS_FILE), json.dumps(th, indent=2) + "\n")
    log.info(
        "thresholds on %d unseen rows: MA %.4f  %s  F1 %.4f  BLEU %.4f (%s); wrote %s",
        th["n_rows"], th["ma"], "  ".join(f"{c.upper()} {th['el'][str(n)]:.4f}" for n, c in zip(args.el_ns, el_cols)),
        th["f1"], th["bleu"], th["statistic"]["f1"], os.path.join(args.dir, THRESHOLDS_FILE),
    )
    return th

