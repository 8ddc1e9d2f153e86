"""valid.py end to end on a tiny random GPT-Neo and the hand-written fixtures."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

import valid
from icu.downstream import EXTRA_COLUMNS, TASK_NAMES, suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "downstream")
FAST = ["--device", "cpu", "--batch_size", "4", "--prefix_length", "48", "--suffix_length", "32",
        "--max_new_tokens", "4"]


def _read_result(out_dir):
    with open(os.path.join(out_dir, "valid_result.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    return rows[0]


def test_all_15_tasks_from_local_files(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    code = valid.main(["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out), *FAST])
    assert code == 0
    row = _read_result(out)
    assert list(row) == list(TASK_NAMES) + list(EXTRA_COLUMNS["lambada"])
    values = {k: float(v) for k, v in row.items()}
    assert all(0.0 <= values[t] <= 1.0 for t in TASK_NAMES[:13])
    assert values["wikitext"] > 1000 and values["pile"] > 1000  # a random model: ~vocabulary size
    log = (out / "valid.log").read_text()
    assert "task piqa: 3 examples from" in log and "task pile: pile" in log


def test_subset_overrides_and_stride(tiny_lm_dir, tmp_path):
    out = tmp_path / "subset"
    code = valid.main([
        "--model_name", tiny_lm_dir, "--tasks", "pile,pubmed_qa,wikitext", "--dir", str(out),
        "--task_file", f"pubmed_qa={os.path.join(FIXTURES, 'hub', 'pubmed_qa.jsonl')}",
        "--task_file", f"pile={os.path.join(FIXTURES, 'pile.csv')}",
        "--task_file", f"wikitext={os.path.join(FIXTURES, 'wikitext.csv')}",
        "--ppl_stride", "8", "--limit", "2", *FAST,
    ])
    assert code == 0
    row = _read_result(out)
    assert list(row) == ["pubmed_qa", "wikitext", "pile"]
    assert "task pubmed_qa: 2 examples" in (out / "valid.log").read_text()


def test_a_failing_task_keeps_the_others_and_exits_1(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    real = suite.evaluate_task

    def flaky(data, scorer, **kwargs):
        if data.task.name == "copa":
            raise RuntimeError("simulated out of memory")
        return real(data, scorer, **kwargs)

    monkeypatch.setattr(suite, "evaluate_task", flaky)
    out = tmp_path / "failing"
    code = valid.main(["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out),
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


@pytest.mark.slow
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


def _result_text(out_dir):
    return (out_dir / "valid_result.csv").read_text()


def test_rerun_with_fewer_tasks_merges_with_the_earlier_row(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merge"
    base = ["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out), *FAST]
    assert valid.main([*base, "--tasks", "lambada,copa,pile"]) == 0
    first = _read_result(out)
    assert valid.main([*base, "--tasks", "copa", "--limit", "1"]) == 0  # copa on 1 example now
    second = _read_result(out)
    assert list(second) == suite.result_columns(["lambada", "copa", "pile"])  # documented order
    assert {k: v for k, v in second.items() if k != "copa"} == {k: v for k, v in first.items() if k != "copa"}
    assert float(second["copa"]) in (0.0, 1.0) and first["copa"] != second["copa"]
    assert "keeping the earlier results of lambada,pile" in (out / "valid.log").read_text()

    # A re-run task that fails now leaves its cells empty (its old number would be stale).
    real = suite.evaluate_task
    monkeypatch.setattr(suite, "evaluate_task", lambda data, scorer, **kw: (_ for _ in ()).throw(RuntimeError("boom"))
                        if data.task.name == "lambada" else real(data, scorer, **kw))
    assert valid.main([*base, "--tasks", "lambada"]) == 1
    third = _read_result(out)
    assert all(third[c] == "" for c in suite.task_columns("lambada"))
    assert third["copa"] == second["copa"] and third["pile"] == second["pile"]
    capsys.readouterr()


def test_rerun_merges_an_older_file_and_refuses_an_unreadable_one(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    # Written before lambada_acc_exact existed, with a column of the user's own.
    (out / "valid_result.csv").write_text("lambada,copa,lambada_loss,lambada_f1,note\n0.5,0.25,3.0,0.4,7\n")
    assert valid.main(["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out),
                       "--tasks", "copa", *FAST]) == 0
    row = _read_result(out)
    assert list(row) == ["lambada", "copa", "lambada_loss", "lambada_f1", "lambada_acc_exact", "note"]
    assert (row["lambada"], row["lambada_loss"], row["lambada_f1"], row["lambada_acc_exact"], row["note"]) == \
        ("0.5", "3.0", "0.4", "", "7")
    assert row["copa"] != "0.25"

    (out / "valid_result.csv").write_text("this is\nnot, a result, file\n")
    err = _exit_2(["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out),
                   "--tasks", "copa", *FAST], capsys)
    assert "valid_result.csv" in err and "another --dir" in err
    assert (out / "valid_result.csv").read_text() == "this is\nnot, a result, file\n"  # untouched


def test_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("")
    err = _exit_2(["--tasks", "copa", "--data_dir", FIXTURES, "--dir", str(target)], capsys)
    assert "--dir" in err and "is a file" in err


def test_log_samples_per_example_records(tiny_lm_dir, tmp_path, gpt2_tok):
    from transformers import GPTNeoForCausalLM

    from icu.downstream import SequentialScorer, load_tasks, resolve_sources

    out = tmp_path / "samples"
    tasks = ["lambada", "copa", "wizard_of_wikipedia", "pile"]
    assert valid.main(["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out),
                       "--tasks", ",".join(tasks), "--log_samples", *FAST]) == 0
    row = {k: float(v) for k, v in _read_result(out).items()}
    recs = {t: [json.loads(line) for line in open(out / f"samples_{t}.jsonl")] for t in tasks}
    datas = load_tasks(resolve_sources(tasks, FIXTURES))

    copa = recs["copa"]
    assert [r["context"] for r in copa] == [ex.context for ex in datas["copa"].examples]
    assert all(r["prediction"] == max(range(len(r["choices"])), key=r["loglikelihoods"].__getitem__)
               and r["correct"] == (r["prediction"] == r["gold"]) for r in copa)
    assert sum(r["correct"] for r in copa) / len(copa) == pytest.approx(row["copa"])
    # the per-choice numbers are the model's: recompute them one pair at a time
    model = GPTNeoForCausalLM.from_pretrained(tiny_lm_dir).eval()
    slow = SequentialScorer(model, gpt2_tok, prefix_length=48, suffix_length=32)
    for r in copa:
        expected = [s.logprob for s in slow.loglikelihood([(r["context"], c) for c in r["choices"]])]
        assert r["loglikelihoods"] == pytest.approx(expected, abs=1e-4)

    lam = recs["lambada"]
    assert [r["target"] for r in lam] == [ex.target for ex in datas["lambada"].examples]
    assert sum(r["correct"] for r in lam) / len(lam) == pytest.approx(row["lambada"])
    assert sum(r["exact"] for r in lam) / len(lam) == pytest.approx(row["lambada_acc_exact"])
    assert sum(r["loss"] for r in lam) / len(lam) == pytest.approx(row["lambada_loss"])

    dialog = recs["wizard_of_wikipedia"]
    assert [r["reference"] for r in dialog] == [ex.reply for ex in datas["wizard_of_wikipedia"].examples]
    assert all(set(r) == {"index", "prompt", "output", "reference", "f1"} for r in dialog)
    assert sum(r["f1"] for r in dialog) / len(dialog) == pytest.approx(row["wizard_of_wikipedia"])

    pile = recs["pile"]
    assert len(pile) >= 2 and all(r["tokens"] >= 1 for r in pile)
    assert math.exp(sum(r["loss"] for r in pile) / len(pile)) == pytest.approx(row["pile"], rel=1e-6)


def test_help_shows_every_flag_with_its_default():
    parser = valid.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in formatter._get_help_string(action), f"{action.option_strings} shows no default"
    text = parser.format_help()
    assert "unused by valid.py" in text and "--log_samples" in text


def test_one_window_warning_for_the_whole_run(tiny_lm_dir, tmp_path):
    out = tmp_path / "window"
    argv = ["--model_name", tiny_lm_dir, "--data_dir", FIXTURES, "--dir", str(out),
            "--tasks", "lambada,copa,wizard_of_wikipedia,pile", *FAST, "--prefix_length", "512"]
    assert valid.main(argv) == 0
    assert (out / "valid.log").read_text().count("exceeds the model window") == 1
