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
    add_settings_args,
    check_positive,
    check_unit_interval,
    explicit_dests,
    parse_int_list,
    settings_from_args,
    setup_logging,
)
from .data import PairedDataset, check_vocab, encode_rows, load_experiment, validate_token_array
from .engine import Engine
from .checkpoint import CHECKPOINT, find_checkpoint, recover_checkpoint, set_seed
from .errors import IcuError, check_writable_dir
from .loop import ICULoop, NonFiniteLoss
from .loop_config import LoopConfig, is_final_model_dir
from .methods import HYPERPARAMETERS, Method, get_method
from .metrics import check_el_positions, check_lengths, el_definition
from .models import check_tokenizer_fit, load_model, load_tokenizer
from .report import versions

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
    g = p.add_argument_group("method and loop")
    add_settings_args(g, LoopConfig)
    g.add_argument("--kl_dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the frozen original model (KL / NPO reference; default: --dtype)")
    g.add_argument("--resume", action="store_true", help="continue the run in --dir from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --dir")
    g.add_argument("--thresholds", default=None,
                   help="thresholds.json from eval.py --calibrate: sets --acc --el --el_start --f1 --bleu "
                        "(a flag given on the command line wins)")
    if distributed:
        p.add_argument("--deepspeed_config", default="config/deepspeed3.json", help="DeepSpeed JSON")
        p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p


def parse_args(argv: Optional[list[str]] = None, distributed: bool = False) -> argparse.Namespace:
    """The trainer's flags; ``args.explicit_flags`` lists those the command line set itself."""
    parser = build_parser(distributed)
    args = parser.parse_args(argv)
    args.explicit_flags = sorted(explicit_dests(parser, argv))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Validate flag values (--el_n is checked when the loop config is built)."""
    check_positive(args, "batch_size", "prefix_length", "suffix_length", "target_length")
    if args.eval_batch_size is not None:
        check_positive(args, "eval_batch_size")
    check_unit_interval(args, "f1", "bleu", "acc", "el")
    if not args.lr > 0:
        raise IcuError(f"--lr must be > 0 (got {args.lr})")
    for name in ("uw", "lw", "kl"):
        if getattr(args, name) < 0:
            raise IcuError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.el_start < 1:
        raise IcuError(f"--el_start must be a positive integer (got {args.el_start})")
    if not args.beta > 0:
        raise IcuError(f"--beta must be > 0 (got {args.beta})")
    if args.max_epochs < 0:
        raise IcuError(f"--max_epochs must be >= 0 (got {args.max_epochs})")
    if args.num_workers < 0:
        raise IcuError(f"--num_workers must be >= 0 (got {args.num_workers})")
    if args.resume and args.overwrite:
        raise IcuError("--resume and --overwrite contradict each other; pass one")
    if args.heldout:  # a missing or malformed file fails before --dir is touched
        from .heldout import load_heldout

        load_heldout(args.heldout)


def configure_method(args: argparse.Namespace) -> tuple[LoopConfig, Method, list[str]]:
    """The loop config from the flags, with the method's own defaults for the hyper-parameters
    not given explicitly; also the explicit hyper-parameters the method ignores."""
    cfg = settings_from_args(LoopConfig, args)
    method = get_method(cfg.method)
    explicit = set(getattr(args, "explicit_flags", ()) or ())
    for name, value in method.defaults.items():
        if name not in explicit:
            setattr(cfg, name, value)
    ignored = [h for h in HYPERPARAMETERS if h in explicit and h not in method.uses]
    return cfg, method, ignored


def build_reference(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen copy of the ORIGINAL model (also when resuming from a checkpoint)."""
    if args.resume:
        reference = load_model(args.model_name, dtype=args.kl_dtype or args.dtype, device=device)
    else:
        reference = copy.deepcopy(model)
        if args.kl_dtype:
            from .models import parse_dtype

            reference.to(parse_dtype(args.kl_dtype))
    return reference.eval().requires_grad_(False)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare_dir(args: argparse.Namespace, is_main: bool) -> None:
    """Refuse to mix runs: a --dir holding a run needs --resume or --overwrite. On --resume, put
    the newest complete checkpoint in place (a kill during a checkpoint swap leaves it under
    checkpoint.tmp or checkpoint.old)."""
    check_writable_dir(args.dir, "--dir")
    if args.resume:
        found = find_checkpoint(args.dir)
        _barrier()  # every rank has looked before the main rank renames the swap folders
        if found is None:
            raise IcuError(
                f"--resume: no complete checkpoint in {args.dir} (no {CHECKPOINT} folder with its "
                f"completion marker); start without --resume"
            )
        if is_main:
            recover_checkpoint(args.dir)
        return
    has_run = any(
        os.path.exists(os.path.join(args.dir, f))
        for f in ("run.json", CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old")
    )
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
                is_final_model_dir(name) and os.path.isdir(path)
            ):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def apply_thresholds(args: argparse.Namespace):
    """Set args.acc / el / el_start / f1 / bleu from --thresholds (the flags typed on the command
    line, ``args.explicit_flags`` from :func:`parse_args`, win); returns the
    :class:`icu.thresholds.ThresholdChoice`, or None without --thresholds."""
    from .thresholds import choose_thresholds, load_thresholds

    chosen = None
    el_ns = list(parse_int_list(args.el_n, "el_n"))
    if args.thresholds:
        explicit = set(args.explicit_flags)
        chosen = choose_thresholds(load_thresholds(args.thresholds), args.thresholds, vars(args), explicit, el_ns[0])
        for dest, value in chosen.values.items():
            setattr(args, dest, value)
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


def load_pairs(args: argparse.Namespace, tokenizer, gpt2, vocab_size: int) -> PairedDataset:
    unlearn, unlearn_ids, learn, learn_ids = load_experiment(args.data_dir, args.exp)
    for rows, what in ((unlearn, "unlearn"), (learn, "learn")):  # GPT-2 ids, whatever the model
        validate_token_array(rows, os.path.join(args.data_dir, args.exp, what, "_dataset.npy"), len(gpt2))
    if args.target_length > args.prefix_length:
        raise IcuError(
            f"--target_length {args.target_length} is longer than --prefix_length {args.prefix_length}"
        )
    enc = lambda rows, ids: encode_rows(rows, ids, gpt2, tokenizer, args.prefix_length, args.suffix_length)
    pairs = PairedDataset(enc(unlearn, unlearn_ids), enc(learn, learn_ids))
    # The model sees the rows re-encoded by its tokenizer, so those ids are the ones its
    # embedding must cover (as eval.py checks them). The raw rows hold GPT-2 ids (up to 50256),
    # which a model with its own smaller vocabulary (SmolLM2's 49152) never looks up.
    name = args.tokenizer_name or args.model_name
    for part, what in ((pairs.unlearn, "unlearn"), (pairs.learn, "learn")):
        check_vocab(part.input_ids.numpy(), vocab_size,
                    f"{os.path.join(args.data_dir, args.exp, what)} encoded by {name}")
    return pairs


def load_heldout_set(args: argparse.Namespace, gpt2, tokenizer, vocab_size: int):
    """``--heldout`` rows encoded as training samples (checked like the forget set), or None."""
    if not args.heldout:
        return None
    from .heldout import encode_heldout, load_heldout

    rows = validate_token_array(load_heldout(args.heldout), f"--heldout {args.heldout}", len(gpt2))
    enc = encode_heldout(rows, gpt2, tokenizer)
    check_vocab(enc.input_ids.numpy(), vocab_size,
                f"--heldout {args.heldout} encoded by {args.tokenizer_name or args.model_name}")
    return enc


def load_start_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model to train: ``--model_name``, or on --resume the checkpoint's copy."""
    if not args.resume:
        return load_model(args.model_name, dtype=args.dtype, device=device)
    try:
        return load_model(os.path.join(args.dir, CHECKPOINT, "model"), dtype=args.dtype, device=device)
    except IcuError as exc:  # keep the file and cause, give the fix that applies to a checkpoint
        cause = str(exc).split("; ")[0]
        raise IcuError(f"--resume: {cause}; the checkpoint is damaged, start over with --overwrite") from None


def run_training(
    args: argparse.Namespace,
    make_engine: Callable[[torch.nn.Module], Engine],
    device: torch.device,
    rank: int = 0,
    engine_name: str = "torch",
    extra_info: Optional[dict] = None,
) -> dict:
    """Set up everything from ``args`` and run the loop with ``--method``'s loss on the engine
    ``make_engine`` builds.

    ``extra_info`` is merged into run.json (the DeepSpeed trainer records its effective config).
    """
    from .metrics import get_bertscorer

    check_args(args)
    chosen = apply_thresholds(args)  # before anything is written: a bad file exits 2
    cfg, method, ignored = configure_method(args)
    is_main = rank == 0
    prepare_dir(args, is_main)
    # Every rank checks --dir before rank 0 writes into it; otherwise a slower rank would find
    # rank 0's fresh run.json and refuse the directory as "already holds a run".
    _barrier()
    os.makedirs(args.dir, exist_ok=True)
    setup_logging(os.path.join(args.dir, "res.log"), rank)
    logger.info("%s %s run in %s: %s", cfg.method, engine_name, args.dir, " ".join(sys.argv[1:]))
    if ignored and is_main:
        logger.warning("--method %s does not use %s; ignored", cfg.method, ", ".join(f"--{h}" for h in ignored))
    log_thresholds(args, chosen)
    set_seed(args.seed)

    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name)
    gpt2 = load_tokenizer(args.gpt2_name)
    model = load_start_model(args, device)
    dataset = load_pairs(args, tokenizer, gpt2, model.get_input_embeddings().num_embeddings)
    fit = check_tokenizer_fit(
        torch.cat([dataset.unlearn.prefix_ids, dataset.unlearn.suffix_ids], 1).numpy(), gpt2, tokenizer, model,
        gpt2_name=args.gpt2_name, tokenizer_name=args.tokenizer_name or args.model_name,
    )
    check_el_positions(model.config, args.target_length, args.el_start, args.model_name)

    reference = build_reference(args, model, device) if method.needs_reference(cfg) else None
    heldout = load_heldout_set(args, gpt2, tokenizer, model.get_input_embeddings().num_embeddings)

    scorer = get_bertscorer(args.bert_name, device)
    engine = make_engine(model)
    run_info = {
        "args": vars(args),
        "engine": engine_name,
        "world_size": engine.world_size,
        "versions": versions(),
        "seed": args.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_samples": len(dataset),
        "method": cfg.method,
        "refine": cfg.refine,
        "hyperparameters": {h: getattr(cfg, h) for h in method.uses},
        "ignored_flags": ignored,
        "tokenizer_check": fit,
        "thresholds": threshold_record(args, chosen),
        **(extra_info or {}),
    }
    loop = ICULoop(
        engine, cfg, tokenizer=tokenizer, gpt2_tokenizer=gpt2, dataset=dataset,
        reference_model=reference, scorer=scorer, run_info=run_info, heldout=heldout,
    )
    summary = run_loop(loop, args)
    if is_main:
        if summary["nothing_to_forget"]:
            print(f"{cfg.method}: nothing to forget, the stop rule held before any training ({summary['stop_reason']}); "
                  "the model is unchanged and no unlearned copy was saved")
        else:
            label = "ICU" if cfg.method == "icu" else cfg.method
            print(
                f"{label} stopped after epoch {summary['epochs']}: {summary['stop_reason']}. "
                f"Model: {summary['model_dir']}"
            )
    return summary


def run_loop(loop: ICULoop, args: argparse.Namespace) -> dict:
    """``loop.run`` with the failure written into run.json once this attempt has started (a
    resume refused or failing while it loads leaves the earlier run.json untouched)."""
    try:
        return loop.run(resume=args.resume)
    except NonFiniteLoss as exc:
        last = loop.state.epoch
        msg = (
            f"{exc}. Stopped; the last good state is {os.path.join(args.dir, CHECKPOINT)} (epoch {last}). "
            "Lower --lr, then continue with --resume (it applies the new --lr)"
        )
        logger.error(msg)
        _record_failure(loop, f"non-finite loss: {exc}", stop_reason=f"non-finite loss: {exc}")
        raise SystemExit(1) from None
    except BaseException as exc:
        if loop.started:
            text = str(exc).strip().splitlines()
            _record_failure(loop, f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
        raise


def _record_failure(loop: ICULoop, error: str, **fields) -> None:
    try:
        loop.write_run_json("failed", error=error, **fields)
    except OSError as exc:  # e.g. the disk that stopped the run is still full
        logger.error("could not record the failure in run.json: %s", exc)
