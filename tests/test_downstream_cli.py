"""valid.py end to end on a tiny random GPT-Neo and the hand-written fixtures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import valid
from icu.downstream import EXTRA_COLUMNS, TASK_NAMES, suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "downstream")
FAST = ["--device", "cpu", "--batch_size", "4", "--prefix_length", "48", "--suffix_length", "32",
        "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, gpt2_tok):
    from transformers import GPTNeoForCausalLM

    from icu.toy import tiny_neo_config

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_neo"))
    GPTNeoForCausalLM(tiny_neo_config(hidden_size=32, num_layers=1, num_heads=2)).save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    return path


def _read_result(out_dir):
    with open(os.path.join(out_dir, "valid_result.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    return rows[0]


def test_all_15_tasks_from_local_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    code = valid.main(["--model_name", tiny_model_dir, "--data_dir", FIXTURES, "--dir", str(out), *FAST])
    assert code == 0
    row = _read_result(out)
    assert list(row) == list(TASK_NAMES) + list(EXTRA_COLUMNS["lambada"])
    values = {k: float(v) for k, v in row.items()}
    assert all(0.0 <= values[t] <= 1.0 for t in TASK_NAMES[:13])
    assert values["wikitext"] > 1000 and values["pile"] > 1000  # a random model: ~vocabulary size
    log = (out / "valid.log").read_text()
    assert "task piqa: 3 examples from" in log and "task pile: pile" in log


def test_subset_overrides_and_stride(tiny_model_dir, tmp_path):
    out = tmp_path / "subset"
    code = valid.main([
        "--model_name", tiny_model_dir, "--tasks", "pile,pubmed_qa,wikitext", "--dir", str(out),
        "--task_file", f"pubmed_qa={os.path.join(FIXTURES, 'hub', 'pubmed_qa.jsonl')}",
        "--task_file", f"pile={os.path.join(FIXTURES, 'pile.csv')}",
        "--task_file", f"wikitext={os.path.join(FIXTURES, 'wikitext.csv')}",
        "--ppl_stride", "8", "--limit", "2", *FAST,
    ])
    assert code == 0
    row = _read_result(out)
    assert list(row) == ["pubmed_qa", "wikitext", "pile"]
    assert "task pubmed_qa: 2 examples" in (out / "valid.log").read_text()


def test_a_failing_task_keeps_the_others_and_exits_1(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real = suite.evaluate_task

    def flaky(data, scorer, **kwargs):
        if data.task.name == "copa":
            raise RuntimeError("simulated out of memory")
        return real(data, scorer, **kwargs)

    monkeypatch.setattr(suite, "evaluate_task", flaky)
    out = tmp_path / "failing"
    code = valid.main(["--model_name", tiny_model_dir, "--data_dir", FIXTURES, "--dir", str(out),
                       "--tasks", "lambada,copa,piqa", *FAST])
    assert code == 1
    row = _read_result(out)
    assert row["copa"] == "" and row["lambada"] != "" and row["piqa"] != ""
    assert "task copa failed: RuntimeError: simulated out of memory" in capsys.readouterr().err
    assert "simulated out of memory" in (out / "valid.log").read_text()


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        valid.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # log lines may come first (the run's settings, tasks loaded); the error is one line, last
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    return errors[0]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    err = _exit_2(["--tasks", "lambada,pica", "--dir", str(tmp_path)], capsys)
    assert "unknown task 'pica'" in err and "piqa" in err and "wizard_of_internet" in err

    bad = tmp_path / "copa.jsonl"
    bad.write_text(json.dumps({"premise": "p", "choice1": "a", "question": "cause"}) + "\n")
    err = _exit_2(["--tasks", "copa", "--task_file", f"copa={bad}", "--dir", str(tmp_path)], capsys)
    assert "'choice2'" in err and "'label'" in err

    err = _exit_2(["--tasks", "hellaswag", "--dir", str(tmp_path), "--cache", str(tmp_path / "cache"),
                   "--model_name", "no/such-model"], capsys)
    assert "hub is not reachable" in err and "--task_file hellaswag=PATH" in err

    err = _exit_2(["--tasks", "pile", "--dir", str(tmp_path)], capsys)
    assert "no hub source" in err
    err = _exit_2(["--batch_size", "0", "--dir", str(tmp_path)], capsys)
    assert "--batch_size" in err


def test_script_exit_code_and_task_list(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "valid.py", "--tasks", "nope", "--dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown task 'nope'")
    listing = subprocess.run([sys.executable, "valid.py", "--list_tasks"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    lines = listing.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(TASK_NAMES)
    assert "Rowan/hellaswag@validation" in listing.stdout
