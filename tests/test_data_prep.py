"""data_prep.py on a small synthetic corpus: planted neighbour, layout, determinism, errors."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import data_prep
from conftest import REPO
from icu.toytext import generate_families

OFFLINE = ["--embedder", "builtin:all-MiniLM-L6-v2", "--gpt2_name", "builtin:gpt2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gpt2_tok):
    """60 rows in families of 6; row 7's near-duplicate planted at row 50; splits exp0/exp1."""
    root = tmp_path_factory.mktemp("prep")
    docs = generate_families(60, 6, seed=3, sentences_per_doc=18)
    rows = np.asarray([gpt2_tok(t)["input_ids"][:200] for _, t in docs], dtype=np.uint16)
    rows[50] = rows[7]
    rows[50, :100] = rows[33, :100]  # a different preprefix; embeddings see only row[100:]
    rows[50, 180] = rows[8, 180]  # and one changed token in the embedded part
    np.save(root / "train.npy", rows)
    for exp, ids in {"exp0": [7, 20, 3], "exp1": [40, 7, 59]}.items():
        os.makedirs(root / "exp" / exp)
        pd.DataFrame({"doc_id": ids, "corpus": "toy", "text": "x"}).to_csv(
            root / "exp" / exp / f"lm_extraction_3_{exp[-1]}.csv", index=False
        )
    return root, rows


def _run(root, exp_dir, *extra):
    data_prep.main(["--train_file", str(root / "train.npy"), "--exp_dir", str(exp_dir), "--k", "4", *OFFLINE, *extra])


def test_layout_neighbours_and_all(corpus):
    root, rows = corpus
    _run(root, root / "exp", "--exps", "exp0,exp1,all")
    for exp, ids in {"exp0": [3, 7, 20], "exp1": [7, 40, 59]}.items():
        d = root / "exp" / exp
        unlearn = np.load(d / "unlearn" / "_dataset.npy")
        assert unlearn.dtype == np.uint16 and np.array_equal(unlearn, rows[ids])  # ascending order
        assert np.array_equal(np.load(d / "unlearn" / "_suffix.npy"), rows[ids][:, 150:])
        nn = pd.read_csv(d / "nearest4index.csv")
        assert nn.shape == (3, 4)
        learn_ids = np.load(d / "learn" / "_doc_ids.npy")
        assert not set(learn_ids) & set(ids)
        candidates = np.setdiff1d(np.arange(len(rows)), ids)
        assert np.array_equal(candidates[nn["0"].to_numpy()], learn_ids)
        assert np.array_equal(np.load(d / "learn" / "_dataset.npy"), rows[learn_ids])
        # the planted near-duplicate of row 7 is its nearest neighbour
        assert learn_ids[ids.index(7)] == 50
    all_ids = np.load(root / "exp" / "all" / "unlearn" / "_doc_ids.npy")
    assert all_ids.tolist() == [3, 7, 20, 40, 59]
    assert not (root / "exp" / "all" / "learn").exists()


def test_neighbours_equal_brute_force():
    from icu.neighbors import nearest_neighbors

    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
    expected = np.argsort(((q[:, None, :] - p[None]) ** 2).sum(-1), axis=1)[:, :3]
    assert np.array_equal(nearest_neighbors(q, p, 3), expected)


def test_rerun_is_byte_identical(corpus, tmp_path):
    root, _ = corpus
    for name in ("a", "b"):
        shutil.copytree(root / "exp" / "exp0", tmp_path / name / "exp0", ignore=shutil.ignore_patterns("unlearn", "learn", "*.csv.*"))
        for f in os.listdir(tmp_path / name / "exp0"):
            if f.startswith("nearest"):
                os.remove(tmp_path / name / "exp0" / f)
        _run(root, tmp_path / name, "--exps", "exp0")
    cmp = filecmp.dircmp(tmp_path / "a" / "exp0", tmp_path / "b" / "exp0")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ("unlearn", "learn"):
        files = sorted(os.listdir(tmp_path / "a" / "exp0" / sub))
        assert files == ["_dataset.npy", "_doc_ids.npy", "_prefix.npy", "_preprefix.npy", "_suffix.npy"]
        for f in files:
            assert filecmp.cmp(tmp_path / "a" / "exp0" / sub / f, tmp_path / "b" / "exp0" / sub / f, shallow=False)


def test_new_random_split(corpus, tmp_path):
    root, rows = corpus
    _run(root, tmp_path, "--num_targets", "5", "--seed", "1", "--split_name", "mine")
    df = pd.read_csv(tmp_path / "mine" / "lm_extraction_5_1.csv")
    assert list(df.columns) == ["doc_id", "corpus", "text"] and len(df) == 5
    assert np.array_equal(np.load(tmp_path / "mine" / "unlearn" / "_dataset.npy"), rows[sorted(df.doc_id)])
    with pytest.raises(SystemExit) as exc:  # refuses to overwrite an existing split
        _run(root, tmp_path, "--num_targets", "5", "--seed", "2", "--split_name", "mine")
    assert exc.value.code == 2


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), *args, *OFFLINE],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_errors_exit_2_and_write_nothing(corpus, tmp_path):
    root, _ = corpus
    r = _cli("--train_file", str(tmp_path / "missing.npy"), "--exp_dir", str(tmp_path))
    assert r.returncode == 2 and "lm-extraction-benchmark-data" in r.stderr
    assert r.stderr.strip().count("\n") == 0 or "error:" in r.stderr
    # second split is broken: the first must not be written either
    exp = tmp_path / "exp"
    shutil.copytree(root / "exp" / "exp0", exp / "exp0", ignore=shutil.ignore_patterns("unlearn", "learn", "nearest*"))
    os.makedirs(exp / "exp1")
    (exp / "exp1" / "lm_extraction_1_1.csv").write_text("doc_id,corpus,text\n999,a,b\n")
    r = _cli("--train_file", str(root / "train.npy"), "--exp_dir", str(exp), "--exps", "exp0,exp1")
    assert r.returncode == 2 and "out of range" in r.stderr
    assert not (exp / "exp0" / "unlearn").exists()
    r = _cli("--train_file", str(root / "train.npy"), "--exp_dir", str(exp), "--k", "0")
    assert r.returncode == 2 and "--k" in r.stderr


def test_neighbours_break_ties_by_index_whatever_the_float_noise():
    """Duplicate documents embed to the same vector up to ~1e-7 noise that depends on batching;
    the neighbour order among them must not."""
    from icu.neighbors import nearest_neighbors

    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 16))
    pool = base.copy()
    pool[[4, 11, 23]] = base[2]          # three duplicates of row 2 (a query below)
    pool[[8, 17]] = base[5] + 0.3        # two duplicates at a non-zero distance from query 5
    pool[5] = base[5] + 0.3
    queries = np.stack([base[2], base[5]])
    expected = None
    for seed in range(6):
        noisy = pool + np.random.default_rng(seed).normal(scale=1e-7, size=pool.shape)
        got = nearest_neighbors(queries, noisy, 4)
        assert got[0, :4].tolist() == [2, 4, 11, 23]
        assert got[1, :3].tolist() == [5, 8, 17]
        if expected is None:
            expected = got
        assert np.array_equal(got, expected)
