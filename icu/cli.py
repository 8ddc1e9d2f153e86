"""The argparse flags the scripts share, with the paper's defaults, and their validation.

Flag names follow the reference scripts so the paper's commands run unchanged; flags we added
(``--data_dir``, ``--dtype``, ``--el_n`` ...) have defaults that keep the reference behaviour.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from typing import Optional

import torch

from .errors import IcuError

DEFAULT_MODEL = "EleutherAI/gpt-neo-125m"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model_name --tokenizer_name --gpt2_name --bert_name --dtype."""
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="hub id or local path of the model")
    p.add_argument("--tokenizer_name", default=None,
                   help="hub id or local path of its tokenizer (default: --model_name)")
    p.add_argument("--gpt2_name", default="gpt2",
                   help="tokenizer that decodes the dataset's GPT-2 ids (offline: builtin:gpt2)")
    p.add_argument("--bert_name", default="bert-base-uncased",
                   help="BERTScore model (offline: builtin:all-MiniLM-L6-v2)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights' dtype for evaluation/training")


def add_data_args(p: argparse.ArgumentParser, exp_default: str = "exp0") -> None:
    """--exp --data_dir --prefix_length --suffix_length --target_length."""
    p.add_argument("--exp", default=exp_default, help="split name (exp0..exp4, all, or your own)")
    p.add_argument("--data_dir", default=os.path.join("datasets", "exp"),
                   help="folder data_prep.py wrote the splits to")
    p.add_argument("--prefix_length", type=int, default=200, help="model input length")
    p.add_argument("--suffix_length", type=int, default=200, help="label length")
    p.add_argument("--target_length", type=int, default=200, help="tokens scored by MA / EL")


def add_runtime_args(p: argparse.ArgumentParser, with_device: bool = True) -> None:
    """--device --batch_size --num_workers --dir."""
    if with_device:
        p.add_argument("--device", default="auto",
                       help="cuda, cuda:N, cpu, or auto (cuda when available)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--dir", default="result/test", help="output folder")


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> set[str]:
    """The ``dest`` of every option the user actually typed in ``argv`` (default: sys.argv[1:]).

    Re-parses ``argv`` with every default suppressed, so only given options land in the
    namespace; a flag typed with its default value still counts as given.
    """
    quiet = copy.deepcopy(parser)
    quiet.set_defaults(**{k: argparse.SUPPRESS for k in quiet._defaults})
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    ns, _ = quiet.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return set(vars(ns))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; a cuda device on a machine without one errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IcuError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IcuError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None or value < 1:
            raise IcuError(f"--{name} must be a positive integer (got {value})")


def check_unit_interval(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if not (0.0 <= value <= 1.0):
            raise IcuError(f"--{name} must lie in [0, 1] (got {value})")


def setup_logging(log_file: Optional[str] = None, rank: int = 0) -> logging.Logger:
    """Log to stderr (rank 0 only at INFO) and, when given, to ``log_file`` (appending)."""
    logger = logging.getLogger("icu")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file and rank == 0:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False
    return logger
