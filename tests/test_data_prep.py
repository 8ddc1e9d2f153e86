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
from tiny import family_rows

OFFLINE = ["--embedder", "builtin:all-MiniLM-L6-v2", "--gpt2_name", "builtin:gpt2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gpt2_tok):
    """60 rows in families of 6; row 7's near-duplicate planted at row 50; splits exp0/exp1."""
    root = tmp_path_factory.mktemp("prep")
    rows = family_rows(gpt2_tok, 60, 6, seed=3)
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- refusals, full disk


def _cli_err(capsys, *argv):
    """Run data_prep.main in-process; it must exit 2 with one error line. Returns that line."""
    with pytest.raises(SystemExit) as exc:
        data_prep.main([*argv, "--k", "4", *OFFLINE])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def _split_folder(root, exp_dir, ids, name="exp0"):
    os.makedirs(exp_dir / name, exist_ok=True)
    for old in (exp_dir / name).glob("lm_extraction_*.csv"):
        old.unlink()
    pd.DataFrame({"doc_id": ids, "corpus": "toy", "text": "x"}).to_csv(
        exp_dir / name / f"lm_extraction_{len(ids)}_0.csv", index=False)


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture
def no_embedding(monkeypatch):
    """Fail the test if data_prep reaches the (minutes-long) embedding."""
    def refuse(*args, **kwargs):
        raise AssertionError("data_prep started embedding before refusing the input")
    monkeypatch.setattr(data_prep, "embed_texts", refuse)


def test_ids_outside_gpt2_vocabulary_are_refused_with_row_and_id(corpus, tmp_path, capsys, no_embedding):
    root, rows = corpus
    bad = rows.copy()
    bad[17, 130] = 50300  # uint16 holds it, GPT-2's decode would drop it silently
    np.save(tmp_path / "train.npy", bad)
    _split_folder(root, tmp_path / "exp", [3, 7])
    err = _cli_err(capsys, "--train_file", str(tmp_path / "train.npy"), "--exp_dir", str(tmp_path / "exp"),
                   "--exps", "exp0")
    assert "row 17" in err and "50300" in err and "column 130" in err
    assert not (tmp_path / "exp" / "exp0" / "unlearn").exists()


def test_not_an_npy_train_file_says_what_is_expected(tmp_path, capsys, no_embedding):
    text = tmp_path / "train.csv"
    text.write_text("doc_id,text\n1,hello\n")
    np.savez(tmp_path / "train.npz", rows=np.zeros((3, 200), np.uint16))
    np.save(tmp_path / "cut.npy", np.zeros((50, 200), np.uint16))
    with open(tmp_path / "cut.npy", "r+b") as fh:
        fh.truncate(600)
    for path in (text, tmp_path / "train.npz"):
        err = _cli_err(capsys, "--train_file", str(path), "--exp_dir", str(tmp_path / "exp"))
        assert str(path) in err and "(N, 200) uint16" in err and "numpy.save" in err
        assert "allow_pickle" not in err and "pickle" not in err
    err = _cli_err(capsys, "--train_file", str(tmp_path / "cut.npy"), "--exp_dir", str(tmp_path / "exp"))
    assert "truncated" in err


def test_num_targets_near_the_pool_size_fails_before_writing_the_split(corpus, tmp_path, capsys, no_embedding):
    root, rows = corpus
    err = _cli_err(capsys, "--train_file", str(root / "train.npy"), "--exp_dir", str(tmp_path),
                   "--num_targets", str(len(rows) - 2), "--split_name", "big")
    assert "--k 4" in err and "--num_targets" in err
    assert not glob_csv(tmp_path / "big")


def glob_csv(folder):
    return sorted(folder.glob("lm_extraction_*.csv")) if folder.exists() else []


def test_unwritable_exp_dir_is_refused_before_embedding(corpus, tmp_path, capsys, monkeypatch, no_embedding):
    root, _ = corpus
    a_file = tmp_path / "exp_file"
    a_file.write_text("")
    err = _cli_err(capsys, "--train_file", str(root / "train.npy"), "--exp_dir", str(a_file),
                   "--num_targets", "3")
    assert "--exp_dir" in err and "is a file" in err
    # A read-only or full file system (root ignores permission bits, so simulate what the OS says).
    import errno
    import tempfile

    _split_folder(root, tmp_path / "exp", [3, 7])
    for code, words in ((errno.EROFS, "read-only"), (errno.ENOSPC, "no space left on device")):
        def refuse(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        err = _cli_err(capsys, "--train_file", str(root / "train.npy"), "--exp_dir", str(tmp_path / "exp"),
                       "--exps", "exp0")
        assert "--exp_dir" in err and words in err


def test_full_disk_while_writing_a_split_keeps_the_old_split(corpus, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a split (its unlearn set written, its learn set not): the split
    on disk must be the old one, byte for byte, with no leftovers."""
    import errno

    import icu.data

    root, _ = corpus
    exp = tmp_path / "exp"
    _split_folder(root, exp, [3, 7, 20])
    _run(root, exp, "--exps", "exp0")
    before = _snapshot(exp / "exp0")
    _split_folder(root, exp, [40, 7, 59])  # a different split, so a half-overwrite would show
    csv_before = _snapshot(exp / "exp0")

    real, calls = icu.data.atomic_save_npy, []

    def fills_up(path, arr):
        calls.append(path)
        if len(calls) == 7:  # unlearn/ complete (5 files), inside learn/
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, arr)

    monkeypatch.setattr(icu.data, "atomic_save_npy", fills_up)
    with pytest.raises(SystemExit) as exc:
        _run(root, exp, "--exps", "exp0")
    assert exc.value.code == 2
    assert "no space left on device" in capsys.readouterr().err
    assert len(calls) == 7 and os.sep + "learn" + os.sep in calls[-1]
    after = _snapshot(exp / "exp0")
    assert after == csv_before  # the old sets, the new CSV (an input), nothing else
    assert {k: v for k, v in before.items() if not k.startswith("lm_")} == \
        {k: v for k, v in after.items() if not k.startswith("lm_")}
    monkeypatch.undo()
    _run(root, exp, "--exps", "exp0")  # with space again, the new split goes in whole
    assert np.load(exp / "exp0" / "unlearn" / "_doc_ids.npy").tolist() == [7, 40, 59]
    assert len(np.load(exp / "exp0" / "learn" / "_doc_ids.npy")) == 3


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skips where the machine does not allow it."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_really_full_disk_keeps_the_old_split(corpus, small_tmpfs, capsys):
    root, _ = corpus
    exp = small_tmpfs / "exp"
    _split_folder(root, exp, [3, 7, 20])
    _run(root, exp, "--exps", "exp0")
    _split_folder(root, exp, [40, 7, 59])
    before = _snapshot(exp / "exp0")
    # Leave room for the write check (one page) and a few files, not for a whole split.
    st = os.statvfs(small_tmpfs)
    with open(small_tmpfs / "filler", "wb") as fh:
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - 4 * 4096))
    with pytest.raises(SystemExit) as exc:
        _run(root, exp, "--exps", "exp0")
    assert exc.value.code == 2
    assert "no space left on device" in capsys.readouterr().err
    assert _snapshot(exp / "exp0") == before
    assert not [n for n in os.listdir(exp / "exp0") if n.startswith(".staging")]
    # Completely full: refused by the write check, before the embedding.
    with open(small_tmpfs / "filler2", "wb") as fh:
        try:
            fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
    with pytest.raises(SystemExit):
        _run(root, exp, "--exps", "exp0")
    err = capsys.readouterr().err
    assert "--exp_dir" in err and "no space left on device" in err and "embedding" not in err
