"""eval.py: outputs, ``--exp all``, and every bad input ending as one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import OFFLINE, REPO, save_split

# the reference's columns, by name and in order (evaluation/convert.py reads them), then ours
UNLEARN_COLUMNS = ["id", "prefix", "reference", "candidate", "bleu", "P", "R", "F1", "diff", "entropy"]


@pytest.fixture(scope="module")
def splits(toy_world, tmp_path_factory):
    """exp0 = 4 toy targets, exp1 = 3 targets overlapping exp0 by one (no data_prep needed)."""
    root = tmp_path_factory.mktemp("splits")
    ids = np.asarray(toy_world["meta"]["target_ids"][:6], dtype=np.int64)
    save_split(toy_world, root, "exp0", ids[:4])
    save_split(toy_world, root, "exp1", ids[3:])
    return {"root": str(root), "ids": ids, "model": toy_world["model"]}


def run_main(argv, capsys):
    """eval.main in this process: (exit code, stderr); code 0 when it returns."""
    import eval as eval_script

    try:
        eval_script.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_writes_outputs(splits, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "eval.py"), "--exp", "exp0", "--data_dir", splits["root"],
           "--model_name", splits["model"], *OFFLINE, "--batch_size", "2", "--dir", str(out), "--no_progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    unlearn = pd.read_csv(out / "unlearn.csv")
    assert list(unlearn.columns) == UNLEARN_COLUMNS + ["ma", "el_10", "loss"]
    assert unlearn["id"].tolist() == sorted(splits["ids"][:4].tolist())
    assert unlearn["candidate"].map(len).min() > 0
    summary = pd.read_csv(out / "eval.csv")
    assert len(summary) == 1
    assert list(summary.columns) == ["bleu", "P", "R", "F1", "diff", "entropy", "val_loss", "ma", "el_10"]
    assert summary["bleu"][0] == pytest.approx(unlearn["bleu"].mean())
    assert summary["ma"][0] > 0.5  # the toy model memorized these targets
    assert "eval exp0" in (out / "eval.log").read_text()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # atomic writes left nothing


def test_eval_all_is_the_union_of_splits(splits, tmp_path, capsys):
    out = tmp_path / "all"
    code, err = run_main(["--exp", "all", "--data_dir", splits["root"], "--model_name", splits["model"],
                          *OFFLINE, "--batch_size", "4", "--el_n", "5,10", "--dir", str(out), "--no_progress"],
                         capsys)
    assert code == 0, err
    unlearn = pd.read_csv(out / "unlearn.csv")
    assert unlearn["id"].tolist() == sorted(splits["ids"].tolist())  # 6 distinct targets
    summary = pd.read_csv(out / "eval.csv")
    assert {"el_5", "el_10"} <= set(summary.columns)
    assert list(unlearn.columns)[-4:] == ["ma", "el_5", "el_10", "loss"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target_length", "201"], "longer than the encoded data"),
        (["--el_n", "60"], "EL_60"),
        (["--el_n", "ten"], "--el_n"),
        (["--batch_size", "0"], "--batch_size"),
        (["--suffix_length", "199"], "--suffix_length"),
        (["--exp", "nosuch"], "split folder"),
    ],
)
def test_bad_input_exits_2(splits, tmp_path, capsys, extra, message):
    argv = ["--exp", "exp0", "--data_dir", splits["root"], "--model_name", splits["model"], *OFFLINE,
            "--dir", str(tmp_path / "out"), "--no_progress", *extra]
    code, err = run_main(argv, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # the log may have started; the error is one last line
    assert last.startswith("error: ") and message in last


def test_empty_split_exits_2(splits, tmp_path, capsys):
    empty = tmp_path / "data" / "exp9" / "unlearn"
    empty.mkdir(parents=True)
    np.save(empty / "_dataset.npy", np.zeros((0, 200), dtype=np.uint16))
    code, err = run_main(["--exp", "exp9", "--data_dir", str(tmp_path / "data"), "--model_name", splits["model"],
                          *OFFLINE, "--dir", str(tmp_path / "out"), "--no_progress"], capsys)
    assert code == 2 and "no rows" in err


def test_small_vocabulary_model_exits_2(splits, tmp_path, capsys):
    from tiny import save_tiny_neo

    small = save_tiny_neo(tmp_path / "small", hidden_size=32, vocab_size=1000)
    code, err = run_main(["--exp", "exp0", "--data_dir", splits["root"], "--model_name", small,
                          "--tokenizer_name", "builtin:gpt2", *OFFLINE, "--dir", str(tmp_path / "out"),
                          "--no_progress"], capsys)
    assert code == 2 and "vocabulary" in err


def test_dir_file_missing_model_and_wrong_gpt2_are_one_line(splits, tmp_path, capsys):
    from test_models import shifted_gpt2_tokenizer

    base = ["--exp", "exp0", "--data_dir", splits["root"], "--no_progress"]
    (tmp_path / "afile").write_text("x")
    code, err = run_main(base + ["--model_name", splits["model"], *OFFLINE, "--dir", str(tmp_path / "afile")], capsys)
    assert code == 2 and "is a file, not a folder" in err.strip().splitlines()[-1]

    missing = str(tmp_path / "models" / "neo")
    code, err = run_main(base + ["--model_name", missing, *OFFLINE, "--dir", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{missing} does not exist" in err.strip().splitlines()[-1]

    # the forget set would reach the model as other text (MA near 0 instead of near 1): refused
    shifted_gpt2_tokenizer(str(tmp_path / "shifted"))
    offline = list(OFFLINE)
    offline[offline.index("builtin:gpt2")] = str(tmp_path / "shifted")
    code, err = run_main(base + ["--model_name", splits["model"], *offline, "--dir", str(tmp_path / "out")], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: --gpt2_name") and "have other ids" in last
    assert not (tmp_path / "out" / "unlearn.csv").exists()
