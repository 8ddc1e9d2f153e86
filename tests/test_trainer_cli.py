"""train_neo_meanwhile_update.py end to end on a slice of the toy world, and its bad-input paths."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

import train_neo_meanwhile_update as trainer
from conftest import OFFLINE
from icu.data import load_set, save_set


def _args(root, model, out, *extra):
    return ["--exp", "mini", "--data_dir", str(root), "--model_name", model, *OFFLINE,
            "--batch_size", "4", "--lr", "3e-4", "--dir", str(out), *extra]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_lifecycle_refusals_damage_full_disk_and_new_lr(mini_exp, tmp_path, capsys, monkeypatch):
    """A finished run, then resumes: a changed --uw is refused, a damaged optimizer file and a
    full disk end in one line, neither loses the finished run's summary, and a new --lr applies
    and is recorded."""
    import errno

    from icu.checkpoint import find_checkpoint
    from icu.engine import TorchEngine

    root, model = mini_exp
    out = tmp_path / "run"
    trainer.main(_args(root, model, out, "--max_epochs", "1"))
    finished = json.loads((out / "run.json").read_text())
    before = (out / "run.json").read_text()

    _fails(capsys, _args(root, model, out, "--max_epochs", "2", "--resume", "--uw", "2"),
           "--uw 2.0 differs from the checkpoint's --uw 1.0")
    assert (out / "run.json").read_text() == before

    opt = out / "checkpoint" / "optimizer.pt"
    good = opt.read_bytes()
    opt.write_bytes(good[: len(good) // 3])
    err = _fails(capsys, _args(root, model, out, "--max_epochs", "2", "--resume"), f"{opt} is damaged")
    assert err.strip().splitlines()[-1].startswith("error: --resume:") and "Traceback" not in err
    assert (out / "run.json").read_text() == before  # never rewritten before the resume loaded
    opt.write_bytes(good)

    def full_disk(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(TorchEngine, "save_state", full_disk)
        _fails(capsys, _args(root, model, out, "--max_epochs", "2", "--resume"), "no space left on device")
    failed = json.loads((out / "run.json").read_text())
    assert failed["status"] == "failed" and "no space left" in failed["error"]
    assert failed["model_dir"] == finished["model_dir"] and failed["final"] == finished["final"]
    assert find_checkpoint(str(out)) == (str(out / "checkpoint"), 1)  # the old checkpoint survived

    trainer.main(_args(root, model, out, "--max_epochs", "2", "--resume", "--lr", "1e-4"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs"] == 2 and run["args"]["lr"] == 1e-4
    assert run["resumed_from_epoch"] == 1 and run["lr_changed"] == {"from": 3e-4, "to": 1e-4, "at_epoch": 1}
    assert "error" not in run
    assert os.path.basename(run["model_dir"]) == "model_mini_lr0.0001_uw1.0_lw0.5_kl1.0_epoch2_updateboth"


def test_stranded_checkpoint_swap_is_found_by_resume(tmp_path, capsys):
    """A kill between the swap's renames leaves checkpoint.old and checkpoint.tmp: --resume takes
    the newer complete one; without --resume the folder still counts as a run."""
    from types import SimpleNamespace

    from icu.checkpoint import MARKER
    from icu.trainer import prepare_dir

    for name, epoch in (("checkpoint.old", 3), ("checkpoint.tmp", 4)):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / MARKER).write_text(json.dumps({"epoch": epoch}))
    with pytest.raises(Exception, match="already holds a run"):
        prepare_dir(SimpleNamespace(dir=str(tmp_path), resume=False, overwrite=False), True)
    prepare_dir(SimpleNamespace(dir=str(tmp_path), resume=True, overwrite=False), True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert json.loads((tmp_path / "checkpoint" / MARKER).read_text())["epoch"] == 4
    (tmp_path / "checkpoint" / MARKER).unlink()  # a partial write is no checkpoint
    with pytest.raises(Exception, match="no complete checkpoint"):
        prepare_dir(SimpleNamespace(dir=str(tmp_path), resume=True, overwrite=False), True)


def test_dir_that_is_a_file_and_missing_model_folder(mini_exp, tmp_path, capsys):
    root, model = mini_exp
    (tmp_path / "afile").write_text("x")
    _fails(capsys, _args(root, model, tmp_path / "afile"), f"--dir {tmp_path / 'afile'} is a file")
    missing = str(tmp_path / "models" / "neo")
    _fails(capsys, _args(root, missing, tmp_path / "out"), f"{missing} does not exist")


def test_wrong_gpt2_tokenizer_is_refused_before_training(mini_exp, tmp_path, capsys):
    from test_models import shifted_gpt2_tokenizer

    root, model = mini_exp
    shifted_gpt2_tokenizer(str(tmp_path / "shifted"))
    argv = _args(root, model, tmp_path / "out")
    argv[argv.index("builtin:gpt2")] = str(tmp_path / "shifted")
    _fails(capsys, argv, "tokens have other ids in this tokenizer")
    assert not (tmp_path / "out" / "epoch0.csv").exists()


def test_model_that_memorized_nothing_has_nothing_to_forget(mini_exp, tiny_lm_dir, tmp_path, capsys):
    """A fresh random model knows none of the targets: the stop rule holds at epoch 0."""
    root, _ = mini_exp
    trainer.main(_args(root, tiny_lm_dir, tmp_path / "run"))
    assert "nothing to forget" in capsys.readouterr().out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["nothing_to_forget"] is True and run["epochs"] == 0 and run["model_dir"] is None
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith("_updateboth")]
    assert "nothing to forget" in (tmp_path / "run" / "res.log").read_text()


def test_full_disk_is_one_line(mini_exp, tmp_path, capsys):
    """--dir on a 20 MB tmpfs: the epoch-0 checkpoint (a 26 MB model) does not fit."""
    import subprocess

    root, model = mini_exp
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")
    try:
        err = _fails(capsys, _args(root, model, disk / "run", "--max_epochs", "1"), "no space left on device")
        assert "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # lazy: res.log may still be open


def test_damaged_checkpoint_model_is_one_line(tmp_path):
    from types import SimpleNamespace

    from icu.errors import IcuError
    from icu.trainer import load_start_model

    model_dir = tmp_path / "checkpoint" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "gpt_neo"}')
    (model_dir / "model.safetensors").write_bytes(b"\0" * 64)
    args = SimpleNamespace(resume=True, dir=str(tmp_path), dtype=None, model_name="unused")
    with pytest.raises(IcuError, match=r"--resume: the model weights in .*model.safetensors are missing, truncated or "
                                       r"corrupt .*start over with --overwrite"):
        load_start_model(args, "cpu")


def check_el_when_needed_is_the_same_run(argv, tmp_path):
    """Train 2 epochs computing EL everywhere (always, a stop rule that cannot hold), then again
    with --el_when needed and an MA threshold between epoch 1's and epoch 2's MA: the second run
    stops at epoch 2 on the MA rule, skips EL before it, and is the same run (history, flags,
    weights). ``argv``: the trainer's flags without --dir/--acc/--el/--max_epochs/--el_when."""
    import torch

    from icu.models import load_model

    trainer.main([*argv, "--dir", str(tmp_path / "always"), "--el_when", "always", "--acc", "0",
                  "--el", "1", "--max_epochs", "2"])
    a = pd.read_csv(tmp_path / "always" / "history.csv")
    assert a["acc"][2] < a["acc"][1], "the check needs MA to fall in epoch 2"
    acc = float((a["acc"][1] + a["acc"][2]) / 2)
    trainer.main([*argv, "--dir", str(tmp_path / "needed"), "--el_when", "needed", "--acc", repr(acc),
                  "--el", "1", "--max_epochs", "4"])
    b = pd.read_csv(tmp_path / "needed" / "history.csv")
    run = json.loads((tmp_path / "needed" / "run.json").read_text())
    assert run["epochs"] == 2 and run["stop_reason"].startswith("MA")
    cols = ["epoch", "val_loss", "acc", "bleu", "F1", "flagged", "loss_unlearn"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=0, atol=0)
    el = next(c for c in a.columns if c.startswith("el_") and c != "el_skipped")  # el_10, or el_10_from26 ...
    assert b["el_skipped"].tolist() == [True, True, False] and b[el][:2].isna().all()
    assert b[el][2] == a[el][2] and a[el].notna().all()
    for e in range(3):  # the flags, target by target
        fa = pd.read_csv(tmp_path / "always" / f"epoch{e}.csv")["flag"]
        fb = pd.read_csv(tmp_path / "needed" / f"epoch{e}.csv")["flag"]
        assert fa.tolist() == fb.tolist()
    wa = load_model(json.loads((tmp_path / "always" / "run.json").read_text())["model_dir"]).state_dict()
    wb = load_model(run["model_dir"]).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_el_when_needed_is_the_same_run_on_the_toy(mini_exp, tmp_path):
    root, model = mini_exp
    argv = ["--exp", "mini", "--data_dir", str(root), "--model_name", model, *OFFLINE,
            "--batch_size", "4", "--method", "ga", "--lr", "3e-4"]
    check_el_when_needed_is_the_same_run(argv, tmp_path)
