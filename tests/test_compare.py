"""compare.py end to end on a slice of the toy world (outputs, resume), and its bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import compare
from conftest import OFFLINE, save_paired_split

TRAINED = ["icu", "ga"]


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """4 toy targets paired with same-family neighbours, 8 held-out rows, a tiny config."""
    root = tmp_path_factory.mktemp("cmp")
    save_paired_split(toy_world, root / "data", "mini", 4)
    heldout = np.load(toy_world["train_file"])[np.load(toy_world["heldout_ids"])[:8]]
    np.save(root / "heldout.npy", heldout)
    methods = {m: {"lr": 3e-4} for m in TRAINED}
    (root / "cfg.json").write_text(json.dumps({"common": {"max_epochs": 1}, "methods": methods}))
    return {"root": root, "model": toy_world["model"], "heldout": heldout}


def _argv(world, out, methods, *extra):
    r = world["root"]
    return ["--exp", "mini", "--data_dir", str(r / "data"), "--model_name", world["model"], *OFFLINE,
            "--batch_size", "4", "--eval_batch_size", "8", "--methods", methods, "--config",
            str(r / "cfg.json"), "--heldout", str(r / "heldout.npy"), "--dir", str(out), *extra]


def _mtimes(out, method):
    """Modification times of everything in {out}/{method}/ (a rerun step would change some)."""
    root = os.path.join(out, method)
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@torch.no_grad()
def _hf_heldout_loss(model_dir, rows):
    """Reference: the LM loss Hugging Face computes itself, on all rows in one batch."""
    from icu.data import encode_rows
    from icu.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    enc = encode_rows(rows, np.arange(len(rows)), load_tokenizer("builtin:gpt2"), tok)
    model = load_model(model_dir)
    return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=enc.labels).loss.item()


@pytest.mark.slow
def test_compare_end_to_end_then_resume(world, tmp_path, capsys):
    out = tmp_path / "cmp"
    first = ["original", TRAINED[0]]
    assert compare.main(_argv(world, out, ",".join(first))) == 0
    printed = capsys.readouterr().out
    df = pd.read_csv(out / "comparison.csv")
    assert df["method"].tolist() == first
    for col in ("method", "epochs", "seconds", "ma", "el_10", "bleu", "F1", "val_loss", "heldout_loss", "stop_reason"):
        assert col in df.columns, col
    md = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in md for m in first) and printed.strip().startswith("| method |")
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the original row is eval.py's numbers of the untouched model, its held-out loss HF's
    import eval as eval_script

    eval_script.main(["--exp", "mini", "--data_dir", str(world["root"] / "data"), "--model_name",
                      world["model"], *OFFLINE, "--batch_size", "8", "--dir", str(tmp_path / "direct"),
                      "--no_progress"])
    direct = pd.read_csv(tmp_path / "direct" / "eval.csv").iloc[0]
    orig = df.set_index("method").loc["original"]
    for col in ("ma", "el_10", "bleu", "F1", "val_loss"):
        assert orig[col] == pytest.approx(direct[col], abs=1e-9), col
    assert orig["epochs"] == 0
    assert orig["heldout_loss"] == pytest.approx(_hf_heldout_loss(world["model"], world["heldout"]), rel=1e-5)

    # the trained method: one epoch at lr 3e-4 moves the memorized targets and the held-out loss
    trained = df.set_index("method").loc[first[1]]
    run = json.loads((out / first[1] / "train" / "run.json").read_text())
    assert trained["epochs"] == run["epochs"] == 1 and trained["model_dir"] == run["model_dir"]
    assert trained["ma"] < orig["ma"] and trained["heldout_loss"] != orig["heldout_loss"]
    assert trained["heldout_loss"] == pytest.approx(_hf_heldout_loss(run["model_dir"], world["heldout"]), rel=1e-5)

    # results.json: every method a policy, candidates straight from each eval's unlearn.csv
    res = json.loads((out / "results.json").read_text())
    assert res["policies"] == first and len(res["targets"]) == 4
    cands = pd.read_csv(out / first[1] / "eval" / "unlearn.csv").set_index("id")["candidate"]
    from evaluation.convert import clean_candidate

    for t in res["targets"]:
        assert t["candidates"][first[1]] == clean_candidate(str(cands.loc[t["id"]]))

    # Kill the trained method mid-run: its run is unfinished again (status running, no final
    # model, the checkpoint kept); original is complete.
    shutil.rmtree(run["model_dir"])
    run["status"] = "running"
    (out / first[1] / "train" / "run.json").write_text(json.dumps(run))
    before = _mtimes(out, "original")
    second = first + TRAINED[1:]
    assert compare.main(_argv(world, out, ",".join(second))) == 0
    assert _mtimes(out, "original") == before  # reused, not evaluated again
    commands = [ln for ln in (out / first[1] / "train.out").read_text().splitlines() if ln.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith(" --resume")
    assert os.path.isfile(os.path.join(run["model_dir"], "config.json"))  # the resumed run saved it
    # its new model evaluated: the resumed run's last validation stands in for eval.py
    reused = json.loads((out / first[1] / "eval" / "reused.json").read_text())
    run = json.loads((out / first[1] / "train" / "run.json").read_text())
    assert reused["from"].endswith(f"epoch{run['epochs']}.csv") and not (out / first[1] / "eval.out").exists()
    assert pd.read_csv(out / "comparison.csv")["method"].tolist() == second

    # a third run reuses everything: no step runs, no file changes
    before = {m: _mtimes(out, m) for m in second}
    assert compare.main(_argv(world, out, ",".join(second))) == 0
    assert {m: _mtimes(out, m) for m in second} == before
    log = (out / "compare.log").read_text().split(" comparing ")[-1]
    for m in second[1:]:
        assert f"{m}: reusing the finished run" in log
    assert "] $ " not in log


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    return err


def test_bad_inputs_exit_2_and_write_nothing(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "comparison.csv").write_text("kept\n")
    r = world["root"]
    err = _fails(capsys, _argv(world, out, "original,gaa"), "unknown method(s) gaa; known: original,")
    assert "icu" in err
    bad = r / "bad.yaml"
    bad.write_text("methods:\n  icu:\n    lrr: 1e-5\n")
    _fails(capsys, _argv(world, out, "original,icu") + ["--config", str(bad)], "unknown key 'lrr'")
    bad.write_text("methods:\n  icu:\n    lr: fast\n")
    _fails(capsys, _argv(world, out, "original,icu") + ["--config", str(bad)], "lr = 'fast' is not a valid float")
    bad.write_text("methods:\n  icu:\n    dir: elsewhere\n")
    _fails(capsys, _argv(world, out, "original,icu") + ["--config", str(bad)], "dir is set by compare.py")
    bad.write_text("methodz:\n  icu: {}\n")
    _fails(capsys, _argv(world, out, "original,icu") + ["--config", str(bad)], "unknown top-level key(s) methodz")
    bad.write_text("methods:\n  icuu: {lr: 1.0e-5}\n")
    _fails(capsys, _argv(world, out, "original,icu") + ["--config", str(bad)], "unknown method section(s) icuu")
    argv = _argv(world, out, "original,icu")
    argv[argv.index("--exp") + 1] = "nosuch"
    err = _fails(capsys, argv, "nosuch")
    assert "data_prep.py" in err
    argv = _argv(world, out, "original,icu")
    argv[argv.index("--model_name") + 1] = str(tmp_path / "no_model")
    _fails(capsys, argv, "python -m icu.toy")
    np.save(r / "short.npy", np.zeros((3, 50), dtype=np.uint16))
    argv = _argv(world, out, "original,icu")
    argv[argv.index("--heldout") + 1] = str(r / "short.npy")
    _fails(capsys, argv, "expected (N, 200)")
    _fails(capsys, _argv(world, out, "original", "--tasks", "nosuchtask"), "unknown task 'nosuchtask'")
    _fails(capsys, _argv(world, out, "original", "--tasks", "piqa", "--every_run_tasks", "pile"),
           "--every_run_tasks pile: not among --tasks piqa")
    _fails(capsys, _argv(world, out, "original", "--every_run_tasks", "pile"), "--every_run_tasks needs --tasks")
    _fails(capsys, _argv(world, out, "original", "--task_runs", "-1"), "--task_runs must be 0 or more")
    assert (out / "comparison.csv").read_text() == "kept\n"
    assert sorted(os.listdir(out)) == ["comparison.csv"]


def test_a_run_with_other_settings_is_not_reused(world, tmp_path, capsys):
    """A method folder trained with another lr is neither reused nor overwritten."""
    out = tmp_path / "out"
    train = out / "icu" / "train"
    train.mkdir(parents=True)
    run = {"status": "finished", "model_dir": str(train / "m"), "epochs": 1, "args": {"lr": 1e-3, "exp": "mini"}}
    (train / "run.json").write_text(json.dumps(run))
    (train / "m").mkdir()
    (train / "m" / "config.json").write_text("{}")
    _fails(capsys, _argv(world, out, "original,icu"), "holds a icu run with other settings (lr 0.001 -> 0.0003)")
    assert json.loads((train / "run.json").read_text()) == run


def test_an_interrupted_step_stops_its_subprocess(tmp_path, monkeypatch):
    """compare.py killed mid-step leaves no orphan trainer writing into --dir."""
    import sys

    from icu.comparison import steps

    pid_file = tmp_path / "pid"
    child = ("import os, time; open(%r, 'w').write(str(os.getpid())); "
             "print('2026-01-01 00:00:00,000 INFO epoch 1', flush=True); time.sleep(60)") % str(pid_file)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(steps.logger, "info", lambda msg, *a: interrupt() if a and a[-1] == "epoch 1" else None)
    with pytest.raises(KeyboardInterrupt):
        steps.run_step([sys.executable, "-c", child], str(tmp_path / "step.out"), "t")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert "INFO epoch 1" in (tmp_path / "step.out").read_text()


@pytest.mark.slow
def test_downstream_tasks_columns_and_mean(world, tmp_path):
    """--tasks runs valid.py on every model; its numbers and their mean land in the table."""
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "downstream")
    out = tmp_path / "tasks"
    argv = _argv(world, out, "original", "--tasks", "piqa,copa", "--task_dir", fixtures)
    argv.remove("--heldout")
    argv.remove(str(world["root"] / "heldout.npy"))
    assert compare.main(argv) == 0
    row = pd.read_csv(out / "comparison.csv").iloc[0]
    valid = pd.read_csv(out / "original" / "valid" / "valid_result.csv").iloc[0]
    assert row["piqa"] == valid["piqa"] and row["copa"] == valid["copa"]
    assert row["downstream_mean"] == pytest.approx((valid["piqa"] + valid["copa"]) / 2)
    assert "| copa | piqa | downstream_mean |" in (out / "comparison.md").read_text()
