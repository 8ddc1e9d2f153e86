"""Forget-set evaluation of one model (docs/method.md#validation): generation check (BLEU,
BERTScore, diversity, entropy), loss, MA and EL_n on a split's unlearn set.

    python eval.py --exp exp0 --model_name EleutherAI/gpt-neo-125m --dir result/eval_exp0
    python eval.py --exp exp0 --data_dir datasets/toy/exp --model_name datasets/toy/model \\
        --gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2 --device cpu --dir result/toy

Writes ``{dir}/unlearn.csv`` (one row per target: id, prefix, reference, candidate, bleu, P, R,
F1, diff, entropy, then the per-sample ma, el_{n}, loss), ``{dir}/eval.csv`` (one row: the means
of bleu..entropy, val_loss, ma, el_{n}) and appends to ``{dir}/eval.log``. With ``--el_start 1``
(Knowledge Unlearning's EL) the EL columns are named ``el_{n}_from1``.

Calibration (forgetting thresholds measured on rows the model never saw):

    python eval.py --calibrate --unseen_rows datasets/toy/heldout_ids.npy \
        --train_file datasets/toy/train_dataset.npy --model_name datasets/toy/model \
        --gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2 --dir result/toy_thresholds

writes ``{dir}/thresholds.json`` (for the trainers' ``--thresholds``) and ``{dir}/calibration.csv``
(one row per unseen row).

Membership inference (docs/method.md#membership-inference): the same unseen rows without
``--calibrate`` (``--unseen ROWS.npy``, or ``--unseen_rows IDS.npy --train_file ...``; ``--limit``
keeps the first N) add the ROC AUC separating the targets from them under four scores:
``{dir}/membership.csv`` (one row per target and unseen row), ``{dir}/membership.json`` (the AUCs,
row counts, k fraction) and the columns auc_loss, auc_zlib, auc_min_k, auc_min_k_pp in eval.csv.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from icu.calibration import add_calibration_args
from icu.cli import add_data_args, add_model_args, add_runtime_args, check_positive, resolve_device, setup_logging
from icu.errors import IcuError, check_writable_dir, disk_errors, exit_on_user_error
from icu.metrics import EL_START, el_column

MEMBERSHIP_CSV = "membership.csv"
MEMBERSHIP_JSON = "membership.json"


def parse_el_n(text: str) -> tuple[int, ...]:
    """``"10"`` or ``"5,10"`` -> (5, 10); IcuError on anything else."""
    try:
        ns = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise IcuError(f"--el_n {text!r}: expected comma-separated positive integers, e.g. 10 or 5,10") from None
    if not ns or min(ns) < 1:
        raise IcuError(f"--el_n {text!r}: expected comma-separated positive integers, e.g. 10 or 5,10")
    return ns


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Forget-set evaluation of one model (ICU).")
    add_data_args(p)
    add_model_args(p)
    add_runtime_args(p)
    p.add_argument("--el_n", default="10", help="extraction-likelihood n-gram sizes, comma-separated")
    p.add_argument("--gen_batch_size", type=int, default=None,
                   help="prompts per beam search (default 4 x --batch_size)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--el_start", type=int, default=EL_START,
                   help="first prefix length of EL: 150 = ICU (default), 1 = Knowledge Unlearning")
    add_calibration_args(p)
    args = p.parse_args(argv)
    check_positive(args, "batch_size", "prefix_length", "suffix_length", "target_length")
    if args.gen_batch_size is not None:
        check_positive(args, "gen_batch_size")
    check_positive(args, "el_start")
    if args.limit is not None and not (args.unseen or args.unseen_rows):
        raise IcuError("--limit counts unseen rows; it needs --unseen or --unseen_rows")
    args.el_ns = parse_el_n(args.el_n)
    return args


def load_scored(args: argparse.Namespace, device, rows, doc_ids, source: str):
    """The model, its tokenizer, the GPT-2 tokenizer, ``rows`` encoded like the forget set
    (checked against the model's vocabulary) and the BERTScore scorer."""
    from icu.data import check_vocab, encode_rows
    from icu.forget_eval import unwrap_model, vocab_size
    from icu.metrics import check_el_positions, get_bertscorer
    from icu.models import check_tokenizer_fit, load_model, load_tokenizer

    gpt2 = load_tokenizer(args.gpt2_name)
    tok = load_tokenizer(args.tokenizer_name or args.model_name)
    data = encode_rows(rows, doc_ids, gpt2, tok, args.prefix_length, args.suffix_length)
    model = load_model(args.model_name, dtype=args.dtype, device=device)
    check_vocab(
        data.input_ids.numpy(), vocab_size(unwrap_model(model)),
        f"{source} encoded by {args.tokenizer_name or args.model_name}",
    )
    check_tokenizer_fit(rows, gpt2, tok, unwrap_model(model), gpt2_name=args.gpt2_name,
                        tokenizer_name=args.tokenizer_name or args.model_name)
    if args.el_ns:
        check_el_positions(unwrap_model(model).config, args.target_length, args.el_start, args.model_name)
    scorer = get_bertscorer(args.bert_name, device)
    return model, tok, gpt2, data, scorer


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import pandas as pd

    from icu.data import atomic_write_text
    from icu.forget_eval import eval_outputs, evaluate_forget_set, load_forget_set
    from icu.metrics import check_lengths

    # Everything that can be checked without the model is checked before loading it.
    check_lengths(args.prefix_length, args.target_length, args.el_ns, args.el_start)
    if args.suffix_length != args.prefix_length:
        raise IcuError(
            f"--suffix_length {args.suffix_length} differs from --prefix_length {args.prefix_length}; "
            "the forget-set loss compares the two token by token, so they must be equal"
        )
    device = resolve_device(args.device)
    check_writable_dir(args.dir, "--dir")
    if args.calibrate:
        from icu.calibration import run_calibration

        log = setup_logging(os.path.join(args.dir, "eval.log"))
        log.info("eval.py --calibrate %s", " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "el_ns"))
        run_calibration(args, log, lambda rows, ids: load_scored(args, device, rows, ids, "the unseen rows"))
        return
    log = setup_logging(os.path.join(args.dir, "eval.log"))
    log.info("eval.py %s", " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "el_ns"))
    rows, doc_ids = load_forget_set(args.data_dir, args.exp)
    # membership inference's unseen rows: read and checked before the model is loaded
    unseen = load_unseen_for_membership(args, rows) if (args.unseen or args.unseen_rows) else None
    if args.num_workers:
        log.info("--num_workers %d: accepted for compatibility; the set is encoded up front", args.num_workers)
    model, tok, gpt2, data, scorer = load_scored(args, device, rows, doc_ids, f"split {args.exp}")
    log.info("%s: %d targets, model %s on %s (%s)", args.exp, len(data), args.model_name, device, args.dtype)
    membership = None
    if unseen is not None:
        # before the long pass: an unseen row the model cannot read fails here, in seconds
        membership = run_membership(args, log, model, tok, gpt2, rows, doc_ids, unseen)

    res = evaluate_forget_set(
        model, tok, gpt2, data, scorer=scorer, batch_size=args.batch_size,
        target_length=args.target_length, el_ns=args.el_ns, progress=not args.no_progress,
        desc=f"eval {args.exp}", gen_batch_size=args.gen_batch_size, el_start=args.el_start,
    )
    # The EL columns say which definition they hold (el_10: ICU's; el_10_from1: KU's).
    el_cols = [el_column(n, args.el_start) for n in args.el_ns]
    # The reference's columns first (evaluation/convert.py reads them by name), then ours.
    unlearn, summary = eval_outputs(res.per_sample, res.val_loss, el_cols)
    if membership is not None:
        summary.update(membership[1])
    # Temporary file + rename: a crash leaves the previous outputs, never half a CSV.
    written = ["unlearn.csv", "eval.csv"]
    with disk_errors(args.dir):
        if membership is not None:
            per_row, _, report = membership
            atomic_write_text(os.path.join(args.dir, MEMBERSHIP_CSV), per_row.to_csv(index=False))
            atomic_write_text(os.path.join(args.dir, MEMBERSHIP_JSON), json.dumps(report, indent=2) + "\n")
            written += [MEMBERSHIP_CSV, MEMBERSHIP_JSON]
        atomic_write_text(os.path.join(args.dir, "unlearn.csv"), unlearn.to_csv(index=False))
        atomic_write_text(os.path.join(args.dir, "eval.csv"), pd.DataFrame([summary]).to_csv(index=False))
    log.info("eval %s: %s", args.exp, "  ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    log.info("wrote %s", " and ".join(os.path.join(args.dir, name) for name in written))


def load_unseen_for_membership(args: argparse.Namespace, forget_rows):
    """(rows, ids, description) of --unseen / --unseen_rows (checked as --calibrate checks them:
    (N, 200) uint16 GPT-2 ids, not empty, --limit), refusing rows that are forget-set targets."""
    from icu.calibration import check_not_forget_set, load_unseen

    rows, ids, what = load_unseen(args)
    check_not_forget_set(rows, args.data_dir, args.exp, what, forget=forget_rows)
    return rows, ids, what


def run_membership(args: argparse.Namespace, log, model, tok, gpt2, rows, doc_ids, unseen):
    """Membership inference of the targets against the unseen rows: (per-row frame, the four
    AUCs, membership.json's content)."""
    import time

    from icu.membership import MIN_K_FRACTION, membership_eval, reads_gpt2_ids

    unseen_rows, unseen_ids, what = unseen
    t0 = time.time()
    per_row, aucs = membership_eval(
        model, tok, gpt2, rows, unseen_rows, args.batch_size, target_ids=doc_ids, unseen_ids=unseen_ids,
        progress=not args.no_progress,
    )
    report = {
        **aucs,
        "n_target": int((per_row["kind"] == "target").sum()),
        "n_unseen": int((per_row["kind"] == "unseen").sum()),
        "min_k_fraction": MIN_K_FRACTION,
        "reads": ("the rows' 200 GPT-2 ids" if reads_gpt2_ids(tok)
                  else f"the rows' text re-encoded by {args.tokenizer_name or args.model_name}"),
        "zlib_text": "the GPT-2 decode of each 200-id row, UTF-8, zlib default level",
        "model": args.model_name,
        "exp": args.exp,
        "unseen": what,
        "seconds": round(time.time() - t0, 2),
    }
    log.info(
        "membership inference, %d targets vs %d unseen rows: AUC loss %.4f  zlib %.4f  min_k %.4f  min_k_pp %.4f "
        "(0.5 = indistinguishable)", report["n_target"], report["n_unseen"], aucs["auc_loss"], aucs["auc_zlib"],
        aucs["auc_min_k"], aucs["auc_min_k_pp"],
    )
    return per_row, aucs, report

if __name__ == "__main__":
    main()
