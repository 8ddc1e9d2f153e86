"""A split's files replaced as one unit: a kill at any rename leaves old or (recoverably) new."""

from __future__ import annotations

import os

import pytest

from icu import staging
from icu.errors import IcuError


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = open(path).read()
    return out


OLD = {"unlearn/_dataset.npy": "old u", "learn/_dataset.npy": "old l", "nearest4index.csv": "old nn",
       "lm_extraction_3_0.csv": "the split"}
NEW = {"unlearn/_dataset.npy": "new u", "learn/_dataset.npy": "new l", "nearest4index.csv": "new nn"}


def _write(root, files):
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as fh:
            fh.write(text)


def _build(split):
    with staging.staged_folder(str(split)) as out:
        _write(out, NEW)


def test_clean_swap_replaces_only_the_new_entries(tmp_path):
    _write(tmp_path, OLD)
    _build(tmp_path)
    assert _tree(tmp_path) == {**OLD, **NEW}


def test_failure_while_writing_leaves_the_old_files(tmp_path):
    _write(tmp_path, OLD)
    with pytest.raises(OSError):
        with staging.staged_folder(str(tmp_path)) as out:
            _write(out, {"unlearn/_dataset.npy": "new u"})
            raise OSError(28, "No space left on device")
    assert _tree(tmp_path) == OLD and sorted(os.listdir(tmp_path)) == ["learn", "lm_extraction_3_0.csv",
                                                                        "nearest4index.csv", "unlearn"]


@pytest.mark.parametrize("kill_at", range(1, 8))
def test_kill_at_any_rename_is_recoverable(tmp_path, monkeypatch, kill_at):
    """Rename 1 is the commit (build -> ready); renames 2.. move entries (old out, new in)."""
    _write(tmp_path, OLD)
    real, count = os.rename, [0]

    def rename(src, dst):
        count[0] += 1
        if count[0] == kill_at:
            raise Killed()
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        _build(tmp_path)
    monkeypatch.setattr(os, "rename", real)
    committed = kill_at > 1
    if committed:  # a reader must refuse the mixture ...
        with pytest.raises(IcuError, match="interrupted"):
            staging.check_no_pending_swap(str(tmp_path))
    else:
        staging.check_no_pending_swap(str(tmp_path))
    assert staging.finish_swap(str(tmp_path)) == committed  # ... and the next run completes it
    assert _tree(tmp_path) == ({**OLD, **NEW} if committed else OLD)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging")]


def test_kill_during_recovery_is_recovered_again(tmp_path, monkeypatch):
    _write(tmp_path, OLD)
    real, count = os.rename, [0]

    def rename(src, dst):
        count[0] += 1
        if count[0] in (3, 5):  # once during the swap, once during its recovery
            raise Killed()
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        _build(tmp_path)
    with pytest.raises(Killed):
        staging.finish_swap(str(tmp_path))
    monkeypatch.setattr(os, "rename", real)
    assert staging.finish_swap(str(tmp_path))
    assert _tree(tmp_path) == {**OLD, **NEW}


def test_readers_refuse_a_split_with_a_pending_swap(tmp_path):
    from icu.data import load_experiment

    os.makedirs(tmp_path / "exp0" / staging.READY / "learn")
    with pytest.raises(IcuError, match="rerun data_prep.py"):
        load_experiment(str(tmp_path), "exp0")
