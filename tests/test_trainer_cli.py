"""train_neo_meanwhile_update.py end to end on a slice of the toy world, and its bad-input paths."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import train_neo_meanwhile_update as trainer
from conftest import save_paired_split
from icu.data import load_set, save_set

OFFLINE = ["--gpt2_name", "builtin:gpt2", "--bert_name", "builtin:all-MiniLM-L6-v2", "--device", "cpu"]


@pytest.fixture(scope="module")
def mini_exp(toy_world, tmp_path_factory):
    """8 toy targets paired with 8 of their data_prep-style neighbours (same family)."""
    root = tmp_path_factory.mktemp("mini")
    save_paired_split(toy_world, root, "mini", 8)
    return root, toy_world["model"]


def _args(root, model, out, *extra):
    return ["--exp", "mini", "--data_dir", str(root), "--model_name", model, *OFFLINE,
            "--batch_size", "4", "--lr", "3e-4", "--dir", str(out), *extra]


def test_run_writes_the_reference_outputs(mini_exp, tmp_path):
    root, model = mini_exp
    trainer.main(_args(root, model, tmp_path / "run", "--max_epochs", "1"))
    out = tmp_path / "run"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs"] == 1 and run["seed"] == 42
    assert "torch" in run["versions"] and run["args"]["lr"] == 3e-4
    for f in ("epoch0.csv", "epoch1.csv", "score.csv", "valid.csv", "res.log", "metrics.png", "history.csv"):
        assert (out / f).is_file(), f
    e0 = pd.read_csv(out / "epoch0.csv")
    assert len(e0) == 8 and e0["id"].tolist() == sorted(e0["id"].tolist())
    # the memorized toy targets start out extractable
    valid = pd.read_csv(out / "valid.csv")
    assert valid.loc[0, "acc"] > 0.9 and valid.loc[0, "el_10"] > 0.5
    assert os.path.basename(run["model_dir"]) == "model_mini_lr0.0003_uw1.0_lw0.5_kl1.0_epoch1_updateboth"
    assert os.path.isfile(os.path.join(run["model_dir"], "config.json"))
    assert "stopping: reached --max_epochs 1" in (out / "res.log").read_text()


def test_cli_resume_equals_uninterrupted(mini_exp, tmp_path):
    root, model = mini_exp
    trainer.main(_args(root, model, tmp_path / "full", "--max_epochs", "2"))
    trainer.main(_args(root, model, tmp_path / "cut", "--max_epochs", "1"))
    # the "killed" run's final model folder and end state are not what --resume reads
    trainer.main(_args(root, model, tmp_path / "cut", "--max_epochs", "2", "--resume"))
    a = pd.read_csv(tmp_path / "full" / "history.csv")
    b = pd.read_csv(tmp_path / "cut" / "history.csv")
    cols = ["epoch", "val_loss", "acc", "el_10", "bleu", "F1", "flagged", "loss_unlearn", "loss_kl"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-6)
    fa = pd.read_csv(tmp_path / "full" / "epoch2.csv")
    fb = pd.read_csv(tmp_path / "cut" / "epoch2.csv")
    assert fa["candidate"].tolist() == fb["candidate"].tolist()


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        trainer.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_missing_split_says_run_data_prep(mini_exp, tmp_path, capsys):
    root, model = mini_exp
    argv = _args(root, model, tmp_path / "x")
    argv[argv.index("mini")] = "exp3"
    _fails(capsys, argv, "data_prep.py")


def test_mismatched_rows(mini_exp, tmp_path, capsys):
    root, model = mini_exp
    bad = tmp_path / "data"
    shutil.copytree(root / "mini", bad / "mini")
    rows, ids = load_set(str(bad / "mini" / "learn"))
    save_set(str(bad / "mini" / "learn"), rows[:5], ids[:5])
    _fails(capsys, _args(bad, model, tmp_path / "x"), "8 unlearn rows but 5 learn rows")


@pytest.mark.parametrize("flag, value, match", [
    ("--f1", "1.5", "--f1 must lie in [0, 1]"),
    ("--el", "-0.1", "--el must lie in [0, 1]"),
    ("--lr", "0", "--lr must be > 0"),
    ("--batch_size", "0", "--batch_size must be a positive integer"),
    ("--el_n", "ten", "--el_n"),
])
def test_bad_flag_values(mini_exp, tmp_path, capsys, flag, value, match):
    root, model = mini_exp
    _fails(capsys, _args(root, model, tmp_path / "x", flag, value), match)
    assert not (tmp_path / "x").exists()


def test_dir_with_another_run_is_refused(mini_exp, tmp_path, capsys):
    root, model = mini_exp
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"precious": true}')
    (out / "valid.csv").write_text("epoch,val_loss,acc,el_10\n0,1,1,1\n")
    _fails(capsys, _args(root, model, out), "--resume")
    assert (out / "run.json").read_text() == '{"precious": true}'
    assert (out / "valid.csv").read_text().startswith("epoch")
    _fails(capsys, _args(root, model, tmp_path / "empty", "--resume"), "no checkpoint")
