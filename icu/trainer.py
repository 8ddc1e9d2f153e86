"""What both trainer scripts share: flags, checks, set-up, and the run.

train_neo_meanwhile_update.py and train_neo_meanwhile_update_deepspeed.py differ only in the
engine factory they pass to :func:`run_training`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import time
from typing import Callable, Optional

import torch

from .cli import (
    add_data_args,
    add_model_args,
    add_runtime_args,
    check_positive,
    check_unit_interval,
    setup_logging,
)
from .data import PairedDataset, check_vocab, encode_rows, load_experiment
from .engine import Engine
from .errors import IcuError
from .loop import CHECKPOINT, ICULoop, LoopConfig, NonFiniteLoss, set_seed
from .metrics import EL_START, check_el_positions, check_lengths, el_definition
from .models import load_model, load_tokenizer
from .report import versions, write_json

logger = logging.getLogger("icu")

# Files a run writes into --dir; --overwrite removes exactly these (and the final model folders).
RUN_FILES = ("run.json", "valid.csv", "score.csv", "history.csv", "metrics.png", "res.log")


def build_parser(distributed: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Iterative Contrastive Unlearning" + (" with DeepSpeed" if distributed else ""),
    )
    add_data_args(p)
    add_model_args(p)
    add_runtime_args(p, with_device=not distributed)
    g = p.add_argument_group("ICU")
    g.add_argument("--lr", type=float, default=5e-6, help="Adam learning rate")
    g.add_argument("--uw", type=float, default=1.0, help="weight of the unlearn (ascent) term")
    g.add_argument("--lw", type=float, default=0.5, help="weight of the learn (NLL) term")
    g.add_argument("--kl", type=float, default=1.0, help="weight of the KL term")
    g.add_argument("--f1", type=float, default=0.3, help="BERTScore F1 threshold of the flag rule")
    g.add_argument("--bleu", type=float, default=0.01, help="BLEU threshold of the flag rule")
    g.add_argument("--acc", type=float, default=0.5994, help="MA threshold of the stop rule")
    g.add_argument("--el", type=float, default=0.0499, help="EL threshold of the stop rule")
    g.add_argument("--el_n", default="10", help="comma-separated n of EL_n (stop when any is below --el)")
    g.add_argument("--max_epochs", type=int, default=50, help="stop after this many epochs")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--kl_mode", default="frozen", choices=["frozen", "cached"],
                   help="frozen: original model's p0 on the fly from a frozen copy (memory does not "
                        "grow with N); cached: the reference's precomputed N x L x V table")
    g.add_argument("--kl_dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the frozen KL reference model (default: --dtype)")
    g.add_argument("--eval_batch_size", type=int, default=None, help="validation batch (default --batch_size)")
    g.add_argument("--resume", action="store_true", help="continue the run in --dir from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --dir")
    # --- thresholds (issue 12): calibrated stop / flag thresholds and the EL definition ---
    t = p.add_argument_group("thresholds")
    t.add_argument("--thresholds", default=None,
                   help="thresholds.json from eval.py --calibrate: sets --acc --el --el_start --f1 --bleu "
                        "(a flag given on the command line wins)")
    t.add_argument("--el_start", type=int, default=EL_START,
                   help="first prefix length of EL: 150 = ICU (default), 1 = Knowledge Unlearning")
    # --- end thresholds ---
    if distributed:
        p.add_argument("--deepspeed_config", default="config/deepspeed3.json", help="DeepSpeed JSON")
        p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p


def check_args(args: argparse.Namespace) -> list[int]:
    """Validate flag values; returns the parsed --el_n list."""
    check_positive(args, "batch_size", "prefix_length", "suffix_length", "target_length")
    if args.eval_batch_size is not None:
        check_positive(args, "eval_batch_size")
    check_unit_interval(args, "f1", "bleu", "acc", "el")
    if not args.lr > 0:
        raise IcuError(f"--lr must be > 0 (got {args.lr})")
    for name in ("uw", "lw", "kl"):
        if getattr(args, name) < 0:
            raise IcuError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.max_epochs < 0:
        raise IcuError(f"--max_epochs must be >= 0 (got {args.max_epochs})")
    if args.num_workers < 0:
        raise IcuError(f"--num_workers must be >= 0 (got {args.num_workers})")
    if args.resume and args.overwrite:
        raise IcuError("--resume and --overwrite contradict each other; pass one")
    try:
        el_ns = [int(x) for x in str(args.el_n).split(",") if x.strip()]
    except ValueError:
        raise IcuError(f"--el_n must be comma-separated integers (got {args.el_n!r})") from None
    if not el_ns or min(el_ns) < 1:
        raise IcuError(f"--el_n needs positive integers (got {args.el_n!r})")
    return el_ns


def prepare_dir(args: argparse.Namespace, is_main: bool) -> None:
    """Refuse to mix runs: a --dir holding a run needs --resume or --overwrite."""
    ckpt_state = os.path.join(args.dir, CHECKPOINT, "state.pkl")
    has_run = any(os.path.exists(os.path.join(args.dir, f)) for f in ("run.json", CHECKPOINT))
    if args.resume:
        if not os.path.isfile(ckpt_state):
            raise IcuError(f"--resume: no checkpoint in {args.dir} ({ckpt_state} is missing); start without --resume")
        return
    if has_run and not args.overwrite:
        raise IcuError(
            f"--dir {args.dir} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --dir"
        )
    if has_run and is_main:
        for name in RUN_FILES:
            path = os.path.join(args.dir, name)
            if os.path.exists(path):
                os.remove(path)
        for name in os.listdir(args.dir):
            path = os.path.join(args.dir, name)
            if name.startswith(CHECKPOINT) or (name.startswith("epoch") and name.endswith(".csv")) or (
                name.endswith("_updateboth") and os.path.isdir(path)
            ):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# --- thresholds (issue 12) ---


def apply_thresholds(args: argparse.Namespace, el_ns: list[int], argv: Optional[list[str]]):
    """Set args.acc / el / el_start / f1 / bleu from --thresholds (flags typed in ``argv`` win);
    returns the :class:`icu.thresholds.ThresholdChoice`, or None without --thresholds."""
    from .cli import explicit_dests
    from .thresholds import choose_thresholds, load_thresholds

    chosen = None
    if args.thresholds:
        explicit = explicit_dests(build_parser(distributed=hasattr(args, "deepspeed_config")), argv)
        chosen = choose_thresholds(load_thresholds(args.thresholds), args.thresholds, vars(args), explicit, el_ns[0])
        for dest, value in chosen.values.items():
            setattr(args, dest, value)
    if args.el_start < 1:
        raise IcuError(f"--el_start must be a positive integer (got {args.el_start})")
    check_lengths(args.prefix_length, args.target_length, el_ns, args.el_start)
    return chosen


def log_thresholds(args: argparse.Namespace, chosen) -> None:
    for line in chosen.notes if chosen else ():
        logger.info(line)
    for line in chosen.warnings if chosen else ():
        logger.warning(line)
    logger.info("stop rule: MA <= %s and EL <= %s (EL %s); flag rule: F1 >= %s and BLEU >= %s%s",
                args.acc, args.el, el_definition(args.el_start), args.f1, args.bleu,
                f" (thresholds from {args.thresholds})" if chosen else " (command-line values / defaults)")


def threshold_record(args: argparse.Namespace, chosen) -> dict:
    """run.json's "thresholds": the values used and where each came from."""
    values = {k: getattr(args, k) for k in ("acc", "el", "el_start", "f1", "bleu")}
    source = dict.fromkeys(values, "command line or default")
    if chosen:
        source.update(chosen.source)
    return {"file": args.thresholds, "values": values, "source": source,
            "warnings": list(chosen.warnings) if chosen else []}


# --- end thresholds ---


def load_pairs(args: argparse.Namespace, tokenizer, gpt2, vocab_size: int) -> PairedDataset:
    unlearn, unlearn_ids, learn, learn_ids = load_experiment(args.data_dir, args.exp)
    check_vocab(unlearn, vocab_size, os.path.join(args.data_dir, args.exp, "unlearn"))
    check_vocab(learn, vocab_size, os.path.join(args.data_dir, args.exp, "learn"))
    if args.target_length > args.prefix_length:
        raise IcuError(
            f"--target_length {args.target_length} is longer than --prefix_length {args.prefix_length}"
        )
    enc = lambda rows, ids: encode_rows(rows, ids, gpt2, tokenizer, args.prefix_length, args.suffix_length)
    return PairedDataset(enc(unlearn, unlearn_ids), enc(learn, learn_ids))


def run_training(
    args: argparse.Namespace,
    make_engine: Callable[[torch.nn.Module], Engine],
    device: torch.device,
    rank: int = 0,
    engine_name: str = "torch",
    extra_info: Optional[dict] = None,
    argv: Optional[list[str]] = None,
) -> dict:
    """Set up everything from ``args`` and run the ICU loop on the engine ``make_engine`` builds.

    ``extra_info`` is merged into run.json (the DeepSpeed trainer records its effective config).
    ``argv``: the command line ``args`` came from (default sys.argv[1:]); with --thresholds, the
    flags typed in it win over the file's values.
    """
    from .metrics import get_bertscorer

    el_ns = check_args(args)
    chosen = apply_thresholds(args, el_ns, argv)  # before anything is written: a bad file exits 2
    is_main = rank == 0
    prepare_dir(args, is_main)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank checks --dir before rank 0 writes into it; otherwise a slower rank would
        # find rank 0's fresh run.json and refuse the directory as "already holds a run".
        torch.distributed.barrier()
    os.makedirs(args.dir, exist_ok=True)
    setup_logging(os.path.join(args.dir, "res.log"), rank)
    logger.info("ICU %s run in %s: %s", engine_name, args.dir, " ".join(sys.argv[1:]))
    log_thresholds(args, chosen)
    set_seed(args.seed)

    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name)
    gpt2 = load_tokenizer(args.gpt2_name)
    resume_model = os.path.join(args.dir, CHECKPOINT, "model")
    model = load_model(resume_model if args.resume else args.model_name, dtype=args.dtype, device=device)
    dataset = load_pairs(args, tokenizer, gpt2, model.get_input_embeddings().num_embeddings)
    check_el_positions(model.config, args.target_length, args.el_start, args.model_name)  # thresholds

    reference = None
    if args.kl != 0:
        # The KL target is always the ORIGINAL model, also when resuming from a checkpoint.
        if args.resume:
            reference = load_model(args.model_name, dtype=args.kl_dtype or args.dtype, device=device)
        else:
            reference = copy.deepcopy(model)
            if args.kl_dtype:
                from .models import parse_dtype

                reference.to(parse_dtype(args.kl_dtype))
        reference.eval().requires_grad_(False)

    scorer = get_bertscorer(args.bert_name, device)
    engine = make_engine(model)
    cfg = LoopConfig(
        exp=args.exp, model_name=args.model_name, dir=args.dir, lr=args.lr, uw=args.uw, lw=args.lw,
        kl=args.kl, f1=args.f1, bleu=args.bleu, acc=args.acc, el=args.el, el_ns=tuple(el_ns),
        el_start=args.el_start,
        target_length=args.target_length, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, num_workers=args.num_workers,
        max_epochs=args.max_epochs, seed=args.seed, kl_mode=args.kl_mode,
    )
    run_info = {
        "args": vars(args),
        "engine": engine_name,
        "world_size": engine.world_size,
        "versions": versions(),
        "seed": args.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_samples": len(dataset),
        "thresholds": threshold_record(args, chosen),
        **(extra_info or {}),
    }
    if is_main:
        write_json(os.path.join(args.dir, "run.json"), {**run_info, "stop_reason": None, "status": "running"})
    loop = ICULoop(
        engine, cfg, tokenizer=tokenizer, gpt2_tokenizer=gpt2, dataset=dataset,
        reference_model=reference, scorer=scorer, run_info=run_info,
    )
    try:
        summary = loop.run(resume=args.resume)
    except NonFiniteLoss as exc:
        last = loop.state.epoch
        msg = (
            f"{exc}. Stopped; the last good state is {os.path.join(args.dir, CHECKPOINT)} (epoch {last}). "
            "Lower --lr or --uw, then continue with --resume"
        )
        logger.error(msg)
        if is_main:
            write_json(os.path.join(args.dir, "run.json"),
                       {**run_info, "status": "failed", "stop_reason": f"non-finite loss: {exc}"})
        raise SystemExit(1) from None
    if is_main:
        print(
            f"ICU stopped after epoch {summary['epochs']}: {summary['stop_reason']}. "
            f"Model: {summary['model_dir']}"
        )
    return summary
