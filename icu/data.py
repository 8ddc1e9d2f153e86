"""The lm-extraction arrays, split CSVs, the forget/retain sets on disk, and the paired dataset.

Layout (see docs/method.md#data): a row of ``train_dataset.npy`` is 200 GPT-2 ids; columns
0:100 are the preprefix, 100:150 the prefix, 150:200 the suffix. ``data_prep.py`` writes, per
split, ``{root}/{exp}/unlearn/`` and ``{root}/{exp}/learn/`` holding ``_dataset.npy`` (uint16, the
full rows), ``_preprefix.npy``, ``_prefix.npy``, ``_suffix.npy`` and ``_doc_ids.npy`` (int64, the
rows' indices into ``train_dataset.npy``: an addition of ours, so outputs can name their targets).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import IcuError
from .staging import check_no_pending_swap

ROW_LEN = 200
PREPREFIX_END = 100
PREFIX_END = 150
TRAIN_DATA_URL = (
    "https://github.com/ethz-spylab/lm-extraction-benchmark-data "
    "(datasets/train_dataset.npy)"
)
SPLIT_COLUMNS = ("doc_id", "corpus", "text")
SET_PARTS = {
    "_dataset.npy": slice(0, ROW_LEN),
    "_preprefix.npy": slice(0, PREPREFIX_END),
    "_prefix.npy": slice(PREPREFIX_END, PREFIX_END),
    "_suffix.npy": slice(PREFIX_END, ROW_LEN),
}
DOC_IDS_FILE = "_doc_ids.npy"


# --------------------------------------------------------------------------- arrays on disk


def validate_token_array(arr: np.ndarray, source: str, vocab_size: Optional[int] = None) -> np.ndarray:
    """Check an (N, 200) uint16 token array; raise IcuError naming ``source`` and the fix."""
    if arr.dtype != np.uint16:
        raise IcuError(
            f"{source}: dtype {arr.dtype}, expected uint16 GPT-2 ids "
            "(convert with np.save(path, arr.astype(np.uint16)) if the values are token ids)"
        )
    if arr.ndim != 2 or arr.shape[1] != ROW_LEN:
        raise IcuError(
            f"{source}: shape {arr.shape}, expected (N, {ROW_LEN}) "
            "(preprefix 100 + prefix 50 + suffix 50 token ids per row)"
        )
    if arr.shape[0] == 0:
        raise IcuError(f"{source}: the array has no rows")
    if vocab_size is not None and int(arr.max()) >= vocab_size:
        row, col = (int(i[0]) for i in np.nonzero(arr >= vocab_size))  # the first offending cell
        raise IcuError(
            f"{source}: row {row} holds token id {int(arr[row, col])} (column {col}), out of the "
            f"vocabulary (ids 0..{vocab_size - 1}); the ids must come from the GPT-2 BPE"
        )
    return arr


def load_train_array(path: str, vocab_size: Optional[int] = None, name: Optional[str] = None) -> np.ndarray:
    """Load and validate ``train_dataset.npy`` (or any (N, 200) uint16 array); error messages
    start with ``name`` (default: the path)."""
    name = name or path
    if not os.path.isfile(path):
        raise IcuError(
            f"train file {path!r} not found; download train_dataset.npy from {TRAIN_DATA_URL} "
            "or build the offline toy world with `python -m icu.toy`"
        )
    expected = f"expected an (N, {ROW_LEN}) uint16 array of GPT-2 ids written by numpy.save"
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if "Failed to read all data" in str(exc):  # numpy's words for a cut-off file
            raise IcuError(f"{name}: the .npy file is truncated; download or write it again") from None
        raise IcuError(f"{name}: not a NumPy .npy array file; {expected}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise IcuError(f"{name}: an .npz archive, not a .npy array file; {expected}")
    return validate_token_array(arr, name, vocab_size)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()  # read once, at import: os.umask() is process-wide, not thread-safe


def _default_mode(path: str) -> None:
    """Give a mkstemp file (created 0600) the permissions a plain open() would have."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_save_npy(path: str, arr: np.ndarray) -> None:
    """np.save through a temporary file and rename, so a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file through a temporary file and rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_set(directory: str, rows: np.ndarray, doc_ids: Sequence[int]) -> None:
    """Write one forget/retain set in the reference layout (plus ``_doc_ids.npy``)."""
    rows = validate_token_array(np.ascontiguousarray(rows), directory)
    for name, cols in SET_PARTS.items():
        atomic_save_npy(os.path.join(directory, name), np.ascontiguousarray(rows[:, cols]))
    atomic_save_npy(os.path.join(directory, DOC_IDS_FILE), np.asarray(doc_ids, dtype=np.int64))


def load_set(directory: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(rows, doc_ids or None) of a set written by :func:`save_set` (or the reference)."""
    check_no_pending_swap(os.path.dirname(os.path.normpath(directory)))  # a half-swapped split
    path = os.path.join(directory, "_dataset.npy")
    if not os.path.isfile(path):
        raise IcuError(f"{path} not found; run data_prep.py first to build the forget/learn sets")
    rows = validate_token_array(np.load(path, allow_pickle=False), path)
    ids_path = os.path.join(directory, DOC_IDS_FILE)
    doc_ids = np.load(ids_path, allow_pickle=False) if os.path.isfile(ids_path) else None
    if doc_ids is not None and len(doc_ids) != len(rows):
        raise IcuError(f"{ids_path}: {len(doc_ids)} ids for {len(rows)} rows; rerun data_prep.py")
    return rows, doc_ids


def load_experiment(root: str, exp: str, need_learn: bool = True):
    """Unlearn (and learn) sets of split ``exp`` under ``root`` (default ``datasets/exp``).

    Returns ``(unlearn_rows, unlearn_ids, learn_rows, learn_ids)``; the learn pair is None when
    ``need_learn`` is False. Errors tell the user to run data_prep.py.
    """
    exp_dir = os.path.join(root, exp)
    if not os.path.isdir(exp_dir):
        raise IcuError(
            f"split folder {exp_dir!r} not found; run `python data_prep.py --exps {exp}` first "
            "(it builds the unlearn and learn sets)"
        )
    unlearn, unlearn_ids = load_set(os.path.join(exp_dir, "unlearn"))
    if unlearn_ids is None:
        unlearn_ids = np.arange(len(unlearn), dtype=np.int64)
    if not need_learn:
        return unlearn, unlearn_ids, None, None
    learn, learn_ids = load_set(os.path.join(exp_dir, "learn"))
    if len(learn) != len(unlearn):
        raise IcuError(
            f"{exp_dir}: {len(unlearn)} unlearn rows but {len(learn)} learn rows; they are paired "
            "row by row, rerun data_prep.py for this split"
        )
    if learn_ids is None:
        learn_ids = np.full(len(learn), -1, dtype=np.int64)
    return unlearn, unlearn_ids, learn, learn_ids


# --------------------------------------------------------------------------- split CSVs


def load_split_csv(path: str, num_rows: int) -> pd.DataFrame:
    """Load a split CSV (``doc_id, corpus, text``) and check its doc_ids against ``num_rows``."""
    if not os.path.isfile(path):
        raise IcuError(
            f"split file {path!r} not found; get the paper's splits from the ICU repository, or "
            "create a random one with data_prep.py --num_targets N --seed S"
        )
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise IcuError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if "doc_id" not in df.columns:
        raise IcuError(
            f"{path}: no 'doc_id' column (found {list(df.columns)}); a split CSV has columns "
            "doc_id, corpus, text with doc_id = row index into train_dataset.npy"
        )
    if len(df) == 0:
        raise IcuError(f"{path}: the split is empty; it needs at least one doc_id row")
    ids = pd.to_numeric(df["doc_id"], errors="coerce")
    if ids.isna().any() or (ids % 1 != 0).any():
        raise IcuError(f"{path}: doc_id must hold integer row indices")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= num_rows)]
    if len(bad):
        raise IcuError(
            f"{path}: doc_id {int(bad.iloc[0])} is out of range for a train array of {num_rows} "
            "rows; the split does not belong to this train file"
        )
    dup = ids[ids.duplicated()]
    if len(dup):
        raise IcuError(f"{path}: doc_id {int(dup.iloc[0])} appears more than once; remove duplicates")
    df = df.copy()
    df["doc_id"] = ids
    return df


def write_split_csv(path: str, doc_ids: Sequence[int], texts: Sequence[str], corpus: str) -> None:
    """Write a split CSV in the paper's format (doc_id, corpus, text), atomically."""
    df = pd.DataFrame({"doc_id": list(doc_ids), "corpus": corpus, "text": list(texts)})
    atomic_write_text(path, df.to_csv(index=False))


# --------------------------------------------------------------------------- paired dataset


@dataclass
class EncodedSet:
    """One side (unlearn or learn) of the paired data, encoded for the model."""

    input_ids: torch.Tensor  # (N, prefix_length) left-padded
    attention_mask: torch.Tensor  # (N, prefix_length)
    labels: torch.Tensor  # (N, suffix_length), padding = -100
    prefix_ids: torch.Tensor  # (N, 50) raw GPT-2 ids of columns 100:150
    suffix_ids: torch.Tensor  # (N, 50) raw GPT-2 ids of columns 150:200
    doc_ids: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_rows(
    rows: np.ndarray,
    doc_ids: Sequence[int],
    gpt2_tokenizer,
    tokenizer,
    prefix_length: int = 200,
    suffix_length: int = 200,
) -> EncodedSet:
    """The spec's training-sample encoding of (N, 200) GPT-2 id rows for ``tokenizer``.

    text = gpt2.decode(row); input_ids = tokenizer(text) left-padded/truncated to prefix_length;
    labels = the same encoding to suffix_length, padding and the special tokens the tokenizer
    adds (a bos, an eos) -> -100.
    """
    texts = gpt2_tokenizer.batch_decode([list(map(int, r)) for r in rows])
    enc = tokenizer(
        texts,
        max_length=prefix_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    # The labels are encoded exactly as the inputs (special tokens included), so label t is
    # input t for every tokenizer. Encoding them without special tokens shifted them by one
    # against inputs that start with a bos (Llama-2-style tokenizers), and the loss compares the
    # two position by position. GPT-2-family tokenizers add nothing, so for them nothing changes.
    lab = tokenizer(
        texts,
        max_length=suffix_length,
        padding="max_length",
        truncation=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    labels = lab["input_ids"].clone()
    # Mask padding by the attention mask, not by id: pad == eos, and a real eos in the text must
    # stay a target (the reference masks every eos id).
    labels[lab["attention_mask"] == 0] = -100
    # A bos/eos the tokenizer adds is not text: never a target (special tokens written in the
    # text are not in this mask and stay targets).
    labels[lab["special_tokens_mask"] == 1] = -100
    rows_t = torch.as_tensor(rows.astype(np.int64))
    return EncodedSet(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=labels,
        prefix_ids=rows_t[:, PREPREFIX_END:PREFIX_END].clone(),
        suffix_ids=rows_t[:, PREFIX_END:ROW_LEN].clone(),
        doc_ids=torch.as_tensor(np.asarray(doc_ids, dtype=np.int64)),
    )


class PairedDataset(torch.utils.data.Dataset):
    """Unlearn row i paired with learn row i; items carry their index so the loop can mask them
    by the per-sample flags."""

    def __init__(self, unlearn: EncodedSet, learn: EncodedSet):
        if len(unlearn) != len(learn):
            raise IcuError(
                f"{len(unlearn)} unlearn rows but {len(learn)} learn rows; they must pair one to one"
            )
        if len(unlearn) == 0:
            raise IcuError("the forget set is empty; the split needs at least one target")
        self.unlearn = unlearn
        self.learn = learn

    def __len__(self) -> int:
        return len(self.unlearn)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        u, l = self.unlearn, self.learn
        return {
            "index": torch.tensor(i),
            "unlearn_input_ids": u.input_ids[i],
            "unlearn_attention_mask": u.attention_mask[i],
            "unlearn_labels": u.labels[i],
            "learn_input_ids": l.input_ids[i],
            "learn_attention_mask": l.attention_mask[i],
            "learn_labels": l.labels[i],
        }


def check_vocab(rows: np.ndarray, vocab_size: int, source: str) -> None:
    """Raise IcuError when ``rows`` hold an id the model's embedding cannot look up."""
    top = int(rows.max())
    if top >= vocab_size:
        raise IcuError(
            f"{source}: token id {top} but the model's vocabulary has {vocab_size} entries; "
            "use the model's own tokenizer (--tokenizer_name) or a model whose vocabulary covers these ids"
        )
