"""Build the forget ("unlearn") and retain ("learn") sets of each experiment split.

For each split: the unlearn set is the split's rows of train_dataset.npy (ascending row order);
the learn set pairs every target with its nearest non-target row by the sentence embedding of
the row's last 100 tokens (all-MiniLM-L6-v2, exact L2). The candidate pool is embedded once and
reused for every split. See docs/method.md#forget-unlearn-and-retain-learn-sets.

Everything is checked (splits, ids, --k, writable folders) before the embedding starts, and a
split's files are replaced together or not at all (``icu/staging.py``): a full disk or a kill
leaves the old split whole, or the complete new one waiting to be moved in by the next run.

    python data_prep.py                                      # exp0..exp4 + all, paper layout
    python data_prep.py --train_file datasets/toy/train_dataset.npy --exp_dir datasets/toy/exp --exps exp0
    python data_prep.py --num_targets 128 --seed 7 --split_name mine   # a new random split
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

from icu.console import setup_console
from icu.data import (
    PREPREFIX_END,
    atomic_write_text,
    load_split_csv,
    load_train_array,
    save_set,
    validate_token_array,
    write_split_csv,
)
from icu.errors import IcuError, check_writable_dir, disk_errors, exit_on_user_error
from icu.models import load_tokenizer, resolve_embedder
from icu.neighbors import embed_texts, nearest_neighbors
from icu.staging import finish_swap, pending_swap, staged_folder

logger = logging.getLogger("icu")

DEFAULT_EXPS = "exp0,exp1,exp2,exp3,exp4,all"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build ICU's unlearn/learn sets for each split.")
    p.add_argument("--train_file", default="datasets/train_dataset.npy",
                   help="(N, 200) uint16 GPT-2 ids (lm-extraction train_dataset.npy)")
    p.add_argument("--exp_dir", default="datasets/exp",
                   help="folder holding {exp}/lm_extraction_*.csv; outputs go beside them")
    p.add_argument("--exps", default=DEFAULT_EXPS,
                   help="comma-separated splits; 'all' = the union of the exp* splits found")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model (hub id, local path or builtin:all-MiniLM-L6-v2)")
    p.add_argument("--gpt2_name", default="gpt2", help="tokenizer that decodes the dataset's ids")
    p.add_argument("--k", type=int, default=10, help="neighbours saved per target")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=None,
                   help="embedding batch size (default: 8 on CPU, where small batches stay in "
                        "cache and run ~1.4x faster than 64; 128 on a GPU)")
    p.add_argument("--num_targets", type=int, default=None,
                   help="create a new random split with this many targets (then build it)")
    p.add_argument("--seed", type=int, default=42, help="seed of the new random split")
    p.add_argument("--split_name", default="random",
                   help="folder name of the new random split under --exp_dir")
    args = p.parse_args(argv)
    if args.k < 1:
        raise IcuError(f"--k must be >= 1 (got {args.k})")
    if args.batch_size is None:
        args.batch_size = 8 if str(args.device).startswith("cpu") else 128
    if args.batch_size < 1:
        raise IcuError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.num_targets is not None and args.num_targets < 1:
        raise IcuError(f"--num_targets must be >= 1 (got {args.num_targets})")
    return args


def find_split_csv(exp_dir: str, exp: str) -> str:
    matches = sorted(glob.glob(os.path.join(exp_dir, exp, "lm_extraction_*.csv")))
    if not matches:
        raise IcuError(
            f"no split CSV {os.path.join(exp_dir, exp, 'lm_extraction_*.csv')}; put the paper's "
            "split there, or create one with --num_targets N"
        )
    if len(matches) > 1:
        raise IcuError(f"{os.path.join(exp_dir, exp)} holds several split CSVs {matches}; keep one")
    return matches[0]


def draw_random_split(args, train: np.ndarray, gpt2) -> tuple[str, np.ndarray, list[str]]:
    """(CSV file name, ascending row ids, texts) of a new random split; nothing is written here
    (the CSV goes into the split's folder with its sets, once they are complete)."""
    n = args.num_targets
    if n >= len(train):
        raise IcuError(f"--num_targets {n} must be smaller than the {len(train)} train rows")
    if len(train) - n < args.k:
        raise IcuError(
            f"--num_targets {n} leaves {len(train) - n} candidate rows, fewer than --k {args.k} "
            f"neighbours per target; use --num_targets <= {len(train) - args.k} or a smaller --k"
        )
    existing = glob.glob(os.path.join(args.exp_dir, args.split_name, "lm_extraction_*.csv"))
    if existing:
        raise IcuError(
            f"{existing[0]} already exists; choose another --split_name or remove that folder"
        )
    ids = np.sort(np.random.default_rng(args.seed).choice(len(train), size=n, replace=False))
    texts = gpt2.batch_decode(train[ids].astype(np.int64).tolist())
    return f"lm_extraction_{n}_{args.seed}.csv", ids, texts


def split_targets(args, train: np.ndarray) -> dict[str, np.ndarray]:
    """Ascending target row ids of every split named by --exps, read and checked."""
    exps = [e.strip() for e in args.exps.split(",") if e.strip()]
    if not exps:
        raise IcuError("--exps is empty; name at least one split, e.g. --exps exp0")
    targets: dict[str, np.ndarray] = {}
    for exp in exps:
        if exp == "all":
            continue
        df = load_split_csv(find_split_csv(args.exp_dir, exp), len(train))
        targets[exp] = np.sort(df["doc_id"].to_numpy(np.int64))
    if "all" in exps:
        found = sorted(
            d for d in os.listdir(args.exp_dir) if d.startswith("exp") and os.path.isdir(os.path.join(args.exp_dir, d))
        ) if os.path.isdir(args.exp_dir) else []
        union: set[int] = set()
        for exp in found:
            ids = targets.get(exp)
            if ids is None:
                ids = load_split_csv(find_split_csv(args.exp_dir, exp), len(train))["doc_id"].to_numpy(np.int64)
            union.update(int(i) for i in ids)
        if not union:
            raise IcuError(f"split 'all' needs exp*/lm_extraction_*.csv splits under {args.exp_dir}")
        targets["all"] = np.asarray(sorted(union), dtype=np.int64)
    return targets


def finish_interrupted_swaps(exp_dir: str) -> None:
    """A data_prep killed while replacing a split's files left the complete new files beside
    the old ones: move them in before anything reads the split."""
    if not os.path.isdir(exp_dir):
        return
    for name in sorted(os.listdir(exp_dir)):
        split_dir = os.path.join(exp_dir, name)
        if pending_swap(split_dir):
            with disk_errors(split_dir):
                finish_swap(split_dir)
            logger.warning("%s: finished replacing its files (an earlier data_prep was interrupted)", split_dir)


def write_split(out: str, train: np.ndarray, ids: np.ndarray, emb, k: int) -> int:
    """Write the unlearn set, and unless ``emb`` is None the neighbour index and the learn set,
    into the empty folder ``out``; returns the number of learn rows."""
    save_set(os.path.join(out, "unlearn"), train[ids], ids)
    if emb is None:
        return 0
    candidates = np.setdiff1d(np.arange(len(train)), ids)  # ascending = re-indexed 0..M-1
    nn = nearest_neighbors(emb[ids], emb[candidates], k)
    header = ",".join(str(c) for c in range(k))
    body = "\n".join(",".join(str(int(v)) for v in row) for row in nn)
    atomic_write_text(os.path.join(out, f"nearest{k}index.csv"), header + "\n" + body + "\n")
    learn_ids = candidates[nn[:, 0]]
    save_set(os.path.join(out, "learn"), train[learn_ids], learn_ids)
    return len(learn_ids)


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    t0 = time.time()
    train = load_train_array(args.train_file)
    gpt2 = load_tokenizer(args.gpt2_name)
    # GPT-2's decode drops ids it does not know, so such a row would silently become other text.
    validate_token_array(train, args.train_file, vocab_size=len(gpt2))
    finish_interrupted_swaps(args.exp_dir)

    # Validate everything before writing anything, so bad input leaves no half-built output.
    new_split = None
    if args.num_targets is not None:
        csv_name, ids, texts = draw_random_split(args, train, gpt2)
        new_split = (csv_name, ids, texts)
        targets = {args.split_name: ids}
    else:
        targets = split_targets(args, train)
    for exp, ids in targets.items():
        if exp != "all" and len(train) - len(ids) < args.k:
            raise IcuError(f"{exp}: only {len(train) - len(ids)} candidate rows for --k {args.k}")
    check_writable_dir(args.exp_dir, "--exp_dir")  # before the minutes of embedding
    for exp in targets:
        check_writable_dir(os.path.join(args.exp_dir, exp), "--exp_dir")

    emb = None
    if any(exp != "all" for exp in targets):
        # Every row is a target of some split or a candidate of every split: embed all rows once.
        texts = gpt2.batch_decode(train[:, PREPREFIX_END:].astype(np.int64).tolist())
        embedder = resolve_embedder(args.embedder)
        logger.info("embedding %d rows with %s on %s", len(texts), embedder, args.device)
        emb = embed_texts(texts, embedder, device=args.device, batch_size=args.batch_size)

    for exp, ids in targets.items():
        split_dir = os.path.join(args.exp_dir, exp)
        # All of a split's files are replaced together or not at all (see icu/staging.py).
        with disk_errors(split_dir), staged_folder(split_dir) as out:
            learned = write_split(out, train, ids, None if exp == "all" else emb, args.k)
            if new_split is not None:
                csv_name, new_ids, new_texts = new_split
                write_split_csv(os.path.join(out, csv_name), new_ids.tolist(), new_texts, corpus="random")
        if new_split is not None:
            logger.info("wrote a new split of %d targets: %s", len(ids), os.path.join(split_dir, new_split[0]))
        logger.info("%s: %d unlearn rows, %d learn rows%s", exp, len(ids), learned,
                    " (no learn set for the union)" if exp == "all" else "")
    logger.info("data_prep done in %.1f s", time.time() - t0)


if __name__ == "__main__":
    main()
