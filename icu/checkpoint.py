"""The loop's checkpoint on disk: atomic save, finding the newest complete one, loading, RNG state.

A checkpoint is a folder ``{dir}/checkpoint`` holding the model (``model/``), the engine's
optimizer state, ``state.pkl`` (epoch, flags, history, RNG states, the loop config) and, written
last, the completion marker ``complete.json`` with the epoch. A new checkpoint is written to
``checkpoint.tmp`` and swapped in by two renames (``checkpoint`` -> ``checkpoint.old``,
``checkpoint.tmp`` -> ``checkpoint``) and a removal of ``checkpoint.old``. A kill at any point of
that swap leaves at least one complete folder among the three names; :func:`recover_checkpoint`
picks the complete one with the highest epoch, moves it to ``checkpoint`` and removes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

from .errors import IcuError, disk_errors

logger = logging.getLogger("icu")

CHECKPOINT = "checkpoint"
MARKER = "complete.json"  # written last: a folder without it is a partial write
STATE_FILE = "state.pkl"
# The other names a checkpoint folder can have during (or after a kill in) the swap.
SWAP_SUFFIXES = ("", ".tmp", ".old")

# Loop settings that change what the run computes. A resume with another value for any of them
# would mix two runs under one history, so it is refused; --lr and --max_epochs apply instead.
# Keys missing on either side (older checkpoints, settings of other methods) are not compared.
RESUME_MUST_MATCH = (
    "exp", "uw", "lw", "kl", "f1", "bleu", "acc", "el", "el_ns", "target_length", "batch_size", "seed",
    "kl_mode", "method", "refine", "beta", "gamma", "el_start", "thresholds", "autocast",
    "heldout",
)
_FLAG_NAMES = {"el_ns": "--el_n"}  # config keys whose command-line flag has another name


# --------------------------------------------------------------------------- RNG state


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------- finding one


def checkpoint_epoch(path: str) -> Optional[int]:
    """The epoch of the complete checkpoint folder ``path``; None when it is missing or partial.

    A ``checkpoint`` folder without a marker but with ``state.pkl`` was written by an older
    version, which only ever renamed complete folders to that name: it counts as complete."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            return int(json.load(fh)["epoch"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged marker: treat the folder as partial
    state = os.path.join(path, STATE_FILE)
    if os.path.basename(path) == CHECKPOINT and os.path.isfile(state):
        try:
            return int(load_state(path)["epoch"])
        except IcuError:
            return None
    return None


def find_checkpoint(run_dir: str) -> Optional[tuple[str, int]]:
    """(folder, epoch) of the newest complete checkpoint among ``checkpoint``, ``.tmp``, ``.old``
    in ``run_dir``; ties go to ``checkpoint``. None when there is none."""
    best = None
    for suffix in SWAP_SUFFIXES:
        path = os.path.join(run_dir, CHECKPOINT + suffix)
        epoch = checkpoint_epoch(path) if os.path.isdir(path) else None
        if epoch is not None and (best is None or epoch > best[1]):
            best = (path, epoch)
    return best


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder, its marker first, so a half-deleted folder is never complete."""
    try:
        os.remove(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


_rename = os.replace  # the swap's renames; tests replace it to simulate a kill between them


def recover_checkpoint(run_dir: str) -> Optional[int]:
    """Put the newest complete checkpoint at ``{run_dir}/checkpoint`` and remove the other swap
    folders (a kill during a save leaves up to three). Returns its epoch, None when there is none.
    Main rank only."""
    found = find_checkpoint(run_dir)
    if found is None:
        return None
    path, epoch = found
    target = os.path.join(run_dir, CHECKPOINT)
    with disk_errors(f"the checkpoint folders in {run_dir}"):
        if path != target:
            if os.path.isdir(target):
                remove_checkpoint(target)
            _rename(path, target)
            logger.warning("recovered the epoch-%d checkpoint from %s (a save was interrupted)", epoch, path)
        for suffix in SWAP_SUFFIXES[1:]:
            if os.path.isdir(target + suffix):
                remove_checkpoint(target + suffix)
    return epoch


# --------------------------------------------------------------------------- saving and loading


def save_checkpoint(engine, ckpt_dir: str, tokenizer, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the model and the engine's optimizer state) to ``ckpt_dir + '.tmp'``
    on every rank, mark it complete, then swap it in on the main rank."""
    tmp = ckpt_dir + ".tmp"
    with disk_errors(f"the checkpoint {tmp}"):
        if engine.is_main:
            remove_checkpoint(tmp)
            os.makedirs(tmp)
        engine.barrier()
        engine.save_model(os.path.join(tmp, "model"), tokenizer)
        engine.save_state(tmp)
        engine.barrier()  # every rank's share is on disk before the marker says "complete"
        if engine.is_main:
            with open(os.path.join(tmp, STATE_FILE), "wb") as fh:
                pickle.dump(state, fh)
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
                json.dump({"epoch": int(state["epoch"])}, fh)
            old = ckpt_dir + ".old"
            remove_checkpoint(old)
            if os.path.isdir(ckpt_dir):
                _rename(ckpt_dir, old)
            _rename(tmp, ckpt_dir)
            remove_checkpoint(old)
    engine.barrier()


def load_state(ckpt_dir: str) -> dict[str, Any]:
    """``state.pkl`` of a checkpoint; one IcuError line when it is missing or damaged."""
    path = os.path.join(ckpt_dir, STATE_FILE)
    try:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
    except FileNotFoundError:
        raise IcuError(f"--resume: {path} is missing; the checkpoint is incomplete, start over with --overwrite") from None
    except Exception as exc:  # unpickling garbage raises almost anything
        raise IcuError(
            f"--resume: {path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); "
            "the checkpoint cannot be resumed, start over with --overwrite"
        ) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise IcuError(f"--resume: {path} is not an ICU loop state; start over with --overwrite")
    return state


def load_engine_state(engine, ckpt_dir: str) -> None:
    """The engine's optimizer state; a damaged file becomes one IcuError line."""
    try:
        engine.load_state(ckpt_dir)
    except IcuError:
        raise
    except Exception as exc:  # torch.load / DeepSpeed on a truncated or garbled file
        raise IcuError(
            f"--resume: the optimizer state in {ckpt_dir} is damaged ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); start over with --overwrite"
        ) from None


def check_resume_config(saved: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse a resume whose settings in :data:`RESUME_MUST_MATCH` differ from the checkpoint's."""
    for key in RESUME_MUST_MATCH:
        if key not in saved or key not in new:
            continue
        old, cur = saved[key], new[key]
        if isinstance(old, (list, tuple)) and isinstance(cur, (list, tuple)):
            old, cur = tuple(old), tuple(cur)
        if old != cur:
            flag = _FLAG_NAMES.get(key, f"--{key}")
            show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v
            raise IcuError(
                f"--resume: {flag} {show(cur)} differs from the checkpoint's {flag} {show(old)}; "
                f"resume with {flag} {show(old)} (only --lr and --max_epochs may change), or start "
                "a new run in another --dir"
            )
