"""Data layer: array and split validation, set layout on disk, the training-sample encoding."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from icu import data
from icu.errors import IcuError


def _rows(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 50000, size=(n, 200)).astype(np.uint16)


def test_missing_train_file_says_where_to_download(tmp_path):
    with pytest.raises(IcuError, match="lm-extraction-benchmark-data"):
        data.load_train_array(str(tmp_path / "nope.npy"))


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((4, 200), dtype=np.int64), "dtype int64"),
        (np.zeros((4, 150), dtype=np.uint16), r"shape \(4, 150\)"),
        (np.zeros((0, 200), dtype=np.uint16), "no rows"),
    ],
)
def test_bad_train_arrays(tmp_path, arr, match):
    path = tmp_path / "t.npy"
    np.save(path, arr)
    with pytest.raises(IcuError, match=match):
        data.load_train_array(str(path))


def test_ids_out_of_vocabulary(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.full((2, 200), 60000, dtype=np.uint16))
    with pytest.raises(IcuError, match="out of the vocabulary"):
        data.load_train_array(str(path), vocab_size=50257)


def _csv(tmp_path, text):
    path = tmp_path / "split.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,corpus,text\n1,a,b\n", "no 'doc_id' column"),
        ("doc_id,corpus,text\n", "empty"),
        ("doc_id,corpus,text\n1,a,b\n9,a,b\n", "out of range"),
        ("doc_id,corpus,text\n1,a,b\n1,a,c\n", "more than once"),
        ("doc_id,corpus,text\nx,a,b\n", "integer"),
    ],
)
def test_bad_split_csv(tmp_path, text, match):
    with pytest.raises(IcuError, match=match):
        data.load_split_csv(_csv(tmp_path, text), num_rows=5)


def test_missing_split_csv(tmp_path):
    with pytest.raises(IcuError, match="--num_targets"):
        data.load_split_csv(str(tmp_path / "none.csv"), 5)


def test_save_and_load_set_layout(tmp_path):
    rows = _rows()
    data.save_set(str(tmp_path / "unlearn"), rows, [5, 7, 9, 11, 13, 15])
    d = tmp_path / "unlearn"
    assert np.array_equal(np.load(d / "_dataset.npy"), rows)
    assert np.array_equal(np.load(d / "_preprefix.npy"), rows[:, :100])
    assert np.array_equal(np.load(d / "_prefix.npy"), rows[:, 100:150])
    assert np.array_equal(np.load(d / "_suffix.npy"), rows[:, 150:])
    assert np.load(d / "_dataset.npy").dtype == np.uint16
    loaded, ids = data.load_set(str(d))
    assert np.array_equal(loaded, rows) and ids.tolist() == [5, 7, 9, 11, 13, 15]
    assert not [f for f in os.listdir(d) if f.startswith(".tmp")]


def test_load_experiment_errors(tmp_path):
    with pytest.raises(IcuError, match="data_prep.py"):
        data.load_experiment(str(tmp_path), "exp0")
    data.save_set(str(tmp_path / "exp0" / "unlearn"), _rows(4), range(4))
    data.save_set(str(tmp_path / "exp0" / "learn"), _rows(3), range(3))
    with pytest.raises(IcuError, match="4 unlearn rows but 3 learn rows"):
        data.load_experiment(str(tmp_path), "exp0")


def test_encoding_follows_the_spec(gpt2_tok):
    text_ids = gpt2_tok("The river near Lisbon was mapped in 1998. " * 30)["input_ids"][:200]
    rows = np.asarray([text_ids], dtype=np.uint16)
    enc = data.encode_rows(rows, [3], gpt2_tok, gpt2_tok, prefix_length=210, suffix_length=205)
    n = len(gpt2_tok(gpt2_tok.decode(text_ids))["input_ids"])
    # inputs: left padded to prefix_length; labels: the same text, -100 on the padding
    assert enc.input_ids.shape == (1, 210) and enc.labels.shape == (1, 205)
    assert enc.attention_mask[0].sum().item() == n
    assert enc.input_ids[0, -n:].tolist() == enc.labels[0, -n:].tolist()
    assert (enc.labels[0, : 205 - n] == -100).all()
    assert enc.prefix_ids[0].tolist() == text_ids[100:150]
    assert enc.suffix_ids[0].tolist() == text_ids[150:200]
    assert enc.doc_ids.tolist() == [3]
    # truncation to a shorter length keeps the first tokens (right truncation)
    short = data.encode_rows(rows, [3], gpt2_tok, gpt2_tok, prefix_length=20, suffix_length=20)
    assert short.input_ids[0].tolist() == text_ids[:20]


def test_real_eos_in_text_stays_a_label(gpt2_tok):
    ids = gpt2_tok("Hello world. " * 60)["input_ids"][:200]
    ids[120] = 50256
    enc = data.encode_rows(np.asarray([ids], dtype=np.uint16), [0], gpt2_tok, gpt2_tok, 200, 200)
    labels = enc.labels[0]
    assert (labels == 50256).sum().item() == 1  # only padding is masked, not the real eos


def test_paired_dataset(gpt2_tok):
    """Item i is unlearn row i with learn row i, every field from its own side and row: six
    different rows, so a swapped pair, side or field shows."""
    rows = np.asarray([gpt2_tok(f"Row {i}: " + f"{word} " * 200)["input_ids"][:200]
                       for i, word in enumerate(["apple", "river", "stone", "cloud", "ember", "maple"])], np.uint16)
    u = data.encode_rows(rows[:3], [10, 11, 12], gpt2_tok, gpt2_tok)
    l = data.encode_rows(rows[3:], [20, 21, 22], gpt2_tok, gpt2_tok)
    ds = data.PairedDataset(u, l)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["index"].item() == i
        for side, enc in (("unlearn", u), ("learn", l)):
            assert torch.equal(item[f"{side}_input_ids"], enc.input_ids[i]) and item[f"{side}_input_ids"].shape == (200,)
            assert torch.equal(item[f"{side}_attention_mask"], enc.attention_mask[i])
            assert torch.equal(item[f"{side}_labels"], enc.labels[i])
    # the six rows really differ, so the equalities above pin each pair
    ids = [ds[i][f"{side}_input_ids"] for side in ("unlearn", "learn") for i in range(3)]
    assert all(not torch.equal(a, b) for k, a in enumerate(ids) for b in ids[k + 1:])
    labels = [ds[i][f"{side}_labels"] for side in ("unlearn", "learn") for i in range(3)]
    assert all(not torch.equal(a, b) for k, a in enumerate(labels) for b in labels[k + 1:])
    short = data.encode_rows(rows[:2], [0, 1], gpt2_tok, gpt2_tok)
    with pytest.raises(IcuError, match="pair one to one"):
        data.PairedDataset(u, short)
