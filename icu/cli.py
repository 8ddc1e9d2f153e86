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
from dataclasses import field, fields
from typing import Any, Callable, Optional

import torch

from .console import setup_console
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


def setting(default: Any, help: str, *, flag: Optional[str] = None,
            parse: Optional[Callable[[Any], Any]] = None, **argparse_kw) -> Any:
    """A dataclass field that is also a command-line option: its default and help are written
    once, here. ``flag`` names the option when it differs from the field (``--el_n`` for
    ``el_ns``); ``parse`` turns the parsed flag value into the field's value (raising IcuError);
    the rest goes to ``add_argument`` (type defaults to the default's type)."""
    meta = {"help": help, "flag": flag, "parse": parse, "argparse": argparse_kw}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) default for a setting")
    return field(default=default, metadata=meta)


def add_settings_args(group, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per :func:`setting` field of the dataclass ``cls`` (not in ``skip``)."""
    for f in fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        meta = f.metadata
        kw = dict(meta["argparse"])
        default = f.default
        if isinstance(default, tuple):  # the flag holds a comma-separated list
            default = ",".join(map(str, default))
        if isinstance(default, bool) and "action" not in kw:
            kw["action"] = "store_true"
        elif "type" not in kw and default is not None and not isinstance(default, str):
            kw["type"] = type(default)
        group.add_argument(f"--{meta['flag'] or f.name}", default=default, help=meta["help"], **kw)


def settings_from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of the dataclass ``cls`` from ``args``: each field takes the flag of its name
    (or its :func:`setting` ``flag``) when ``args`` has one, parsed; else its default."""
    values = {}
    for f in fields(cls):
        name = f.metadata.get("flag") or f.name
        if f.name in overrides or not hasattr(args, name):
            continue
        value = getattr(args, name)
        parse = f.metadata.get("parse")
        values[f.name] = parse(value) if parse is not None else value
    values.update(overrides)
    return cls(**values)


def parse_int_list(value: Any, flag: str) -> tuple[int, ...]:
    """``"10,20"`` -> (10, 20): positive integers, at least one, else IcuError naming ``flag``."""
    if isinstance(value, tuple):
        return value
    try:
        out = tuple(int(x) for x in str(value).split(",") if x.strip())
    except ValueError:
        raise IcuError(f"--{flag} must be comma-separated integers (got {value!r})") from None
    if not out or min(out) < 1:
        raise IcuError(f"--{flag} needs positive integers (got {value!r})")
    return out


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
    """Log to stderr (rank 0 only at INFO) and, when given, to ``log_file`` (appending). Sets the
    script's console up too (icu.console: stdout for its own output, bars only on a terminal)."""
    setup_console()
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


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> set[str]:
    """The ``dest`` of every option given explicitly in ``argv`` (default: ``sys.argv[1:]``).

    ``argv`` is parsed again by a copy of ``parser`` whose defaults are all suppressed, so only
    what the command line itself set lands in the namespace. A flag given with its default value
    still counts as explicit ("explicit flag wins").
    """
    shadow = copy.deepcopy(parser)
    shadow._defaults.clear()  # set_defaults() values would otherwise look explicit
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    ns, _ = shadow.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return set(vars(ns))
