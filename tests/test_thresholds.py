"""Forgetting thresholds (issue 12): eval.py --calibrate against the slow reference, both EL
definitions, the trainers' --thresholds, and the bad-input paths."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import eval as eval_script
import train_neo_meanwhile_update as trainer
from icu.cli import explicit_dests
from conftest import OFFLINE, save_split
from icu.data import encode_rows
from icu.errors import IcuError
from fast_paths import memorization_and_extraction
from icu.metrics import extraction_likelihood
from icu.models import load_model, load_tokenizer
from icu.thresholds import build_thresholds, choose_thresholds, load_thresholds, shared_rows
from reference_impl import slow_el, slow_ma
from test_forget_eval import PAD, self_text
from test_trainer_cli import _args
from tiny import decoding_neo

torch.set_num_threads(1)


def _calibrate(toy_world, out, *extra):
    eval_script.main([
        "--calibrate", "--unseen_rows", toy_world["heldout_ids"], "--train_file", toy_world["train_file"],
        "--model_name", toy_world["model"], *OFFLINE, "--dir", str(out), "--no_progress",
        "--data_dir", str(out / "no-data"), *extra,
    ])
    th = json.loads((out / "thresholds.json").read_text())
    return th, pd.read_csv(out / "calibration.csv")


def _reference(toy_world, n_rows, T, start):
    """Per-row MA and EL_10 of the toy model on its first held-out rows, by the slow reference."""
    rows = np.load(toy_world["train_file"])
    ids = np.load(toy_world["heldout_ids"])[:n_rows]
    tok = load_tokenizer(toy_world["model"])
    data = encode_rows(rows[ids], ids, load_tokenizer("builtin:gpt2"), tok, T, T)
    model = load_model(toy_world["model"])
    pad = tok.pad_token_id
    ma = slow_ma(model, data.input_ids, data.attention_mask, T, pad)
    el = slow_el(model, data.input_ids, data.attention_mask, T, (10,), pad, start)[10]
    return np.asarray(ma), np.asarray(el)


# --------------------------------------------------------------------------- calibration


@pytest.mark.slow
def test_calibration_equals_mean_of_slow_reference(toy_world, tmp_path):
    th, rows = _calibrate(toy_world, tmp_path, "--limit", "3")
    ma, el = _reference(toy_world, 3, 200, 150)
    np.testing.assert_allclose(rows["ma"], ma, atol=1e-9)
    np.testing.assert_allclose(rows["el_10"], el, atol=1e-9)
    assert th["ma"] == pytest.approx(ma.mean(), abs=1e-12)
    assert th["el"]["10"] == pytest.approx(el.mean(), abs=1e-12)
    assert th["el_start"] == 150 and th["n_rows"] == 3 and th["model"] == toy_world["model"]
    assert th["bert_name"] == "builtin:all-MiniLM-L6-v2" and "torch" in th["versions"]
    # the flag thresholds are the 0.95 quantile of the per-row generation scores
    assert th["f1"] == pytest.approx(np.quantile(rows["F1"], 0.95))
    assert th["bleu"] == pytest.approx(np.quantile(rows["bleu"], 0.95))
    assert th["spread"]["ma"]["std"] == pytest.approx(np.std(ma, ddof=1))
    assert load_thresholds(str(tmp_path / "thresholds.json"))["ma"] == th["ma"]


def test_calibration_with_ku_el_equals_slow_reference(toy_world, tmp_path):
    T = "40"
    th, rows = _calibrate(toy_world, tmp_path, "--limit", "3", "--el_start", "1",
                          "--prefix_length", T, "--suffix_length", T, "--target_length", T)
    ma, el = _reference(toy_world, 3, 40, 1)
    assert "el_10" not in rows.columns  # KU's EL never hides under ICU's name
    np.testing.assert_allclose(rows["el_10_from1"], el, atol=1e-9)
    np.testing.assert_allclose(rows["ma"], ma, atol=1e-9)
    assert th["el_start"] == 1 and th["el"]["10"] == pytest.approx(el.mean(), abs=1e-12)
    assert th["el_columns"] == {"10": "el_10_from1"} and "Knowledge Unlearning" in th["el_definition"]


def test_fast_el_equals_reference_with_ku_start():
    model = decoding_neo(3)
    x, mask = self_text(model, 3, 3, 48, [0, 4, 0])
    ref = slow_el(model, x, mask, 40, (1, 3), PAD, 1)
    _, el = memorization_and_extraction(model, x, mask, 40, (1, 3), start=1, pad_token_id=PAD)
    for n in (1, 3):
        np.testing.assert_allclose(el[n].numpy(), ref[n], rtol=0, atol=1e-9)
    assert any(v > 0 for v in ref[3])


@pytest.mark.parametrize("start", [1, 5])
def test_el_denominator_is_t_minus_start_minus_n_plus_1(start):
    # Only prefix i = start continues exactly as the text; every other continuation matches nothing.
    T, n = 16, 3
    x = torch.arange(T)[None]
    cont = torch.full((1, T - start, T - start), 999)
    cont[0, 0, : T - start] = x[0, start:]
    el = extraction_likelihood(cont, x, None, T, (n,), start=start)[n]
    assert float(el) == pytest.approx(1 / (T - start - (n - 1)))  # KU: T-1-(n-1) at start 1


# --------------------------------------------------------------------------- pure functions


def test_build_thresholds_statistics():
    per_row = {"ma": [0.2, 0.4, 0.6], "el_10_from1": [0.0, 0.1, np.nan], "F1": [0.1, 0.5, 0.9],
               "bleu": [0.0, 0.0, 0.3]}
    th = build_thresholds(per_row, (10,), 1, quantile=0.5, meta={"model": "m"})
    assert th["ma"] == pytest.approx(0.4) and th["el"] == {"10": pytest.approx(0.05)}
    assert th["f1"] == pytest.approx(0.5) and th["bleu"] == 0.0 and th["model"] == "m"
    assert th["spread"]["el_10_from1"]["n"] == 2  # NaN rows are skipped


def test_choose_thresholds_precedence_and_warnings():
    th = {"ma": 0.5, "el": {"10": 0.02}, "el_start": 1, "f1": 0.6, "bleu": 0.05, "model": "a", "n_rows": 9}
    current = {"acc": 0.7, "el": 0.0499, "el_start": 150, "f1": 0.3, "bleu": 0.01, "model_name": "b"}
    c = choose_thresholds(th, "t.json", current, {"acc"}, 10)
    assert c.values == {"acc": 0.7, "f1": 0.6, "bleu": 0.05, "el_start": 1, "el": 0.02}
    assert c.source["acc"] == "command line" and c.source["el"] == "t.json"
    assert any("--acc 0.7" in line and "wins" in line for line in c.notes)
    assert any("'a'" in w and "'b'" in w for w in c.warnings)  # the model mismatch names both
    c = choose_thresholds(th, "t.json", {**current, "model_name": "a"}, {"el_start"}, 10)
    assert c.values["el_start"] == 150
    assert len(c.warnings) == 1 and "prefix 1" in c.warnings[0] and "--el_start 150" in c.warnings[0]
    with pytest.raises(IcuError, match="n=5"):
        choose_thresholds(th, "t.json", current, set(), 5)


def test_stop_rule_reaches_a_calibrated_el_of_zero():
    from icu.loop import stop_reason

    assert stop_reason(0.5, {"el_10": 0.0}, 3, acc=0.56, el_thr=0.0) is not None
    assert stop_reason(0.5, {"el_10": 0.001}, 3, acc=0.56, el_thr=0.0) is None


def test_explicit_dests():
    from icu.trainer import build_parser

    p = build_parser()
    assert explicit_dests(p, ["--acc", "0.5994", "--el=0.1", "--overwrite"]) == {"acc", "el", "overwrite"}
    assert explicit_dests(p, []) == set()


def test_shared_rows_by_content():
    a = np.arange(12, dtype=np.uint16).reshape(4, 3)
    assert shared_rows(a, a[[3, 1]]).tolist() == [1, 3]


# --------------------------------------------------------------------------- the trainer


def _thresholds_file(path, **over):
    th = {"ma": 0.42, "el": {"10": 0.031}, "el_start": 150, "f1": 0.61, "bleu": 0.07,
          "model": over.pop("model"), "n_rows": 5, "bert_name": "builtin:all-MiniLM-L6-v2", **over}
    path.write_text(json.dumps(th))
    return str(path)


@pytest.mark.slow
def test_trainer_uses_thresholds_and_explicit_flags_win(mini_exp, tmp_path):
    root, model = mini_exp
    f = _thresholds_file(tmp_path / "t.json", model=model)
    trainer.main(_args(root, model, tmp_path / "a", "--max_epochs", "0", "--thresholds", f))
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    used = {k: run["args"][k] for k in ("acc", "el", "f1", "bleu", "el_start")}
    assert used == {"acc": 0.42, "el": 0.031, "f1": 0.61, "bleu": 0.07, "el_start": 150}
    assert run["thresholds"]["values"] == used and run["thresholds"]["source"]["acc"] == f
    assert run["thresholds"]["warnings"] == []
    # the flags decide which targets are flagged: F1 >= 0.61 and BLEU >= 0.07
    e0 = pd.read_csv(tmp_path / "a" / "epoch0.csv")
    hist = pd.read_csv(tmp_path / "a" / "history.csv")
    assert hist.loc[0, "flagged"] == int(((e0["F1"] >= 0.61) & (e0["bleu"] >= 0.07)).sum())

    trainer.main(_args(root, model, tmp_path / "b", "--max_epochs", "0", "--thresholds", f, "--acc", "0.7"))
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["args"]["acc"] == 0.7 and run["args"]["el"] == 0.031
    assert run["thresholds"]["source"]["acc"] == "command line"
    assert "--acc 0.7 given on the command line wins over 0.42" in (tmp_path / "b" / "res.log").read_text()


def test_trainer_with_ku_thresholds_of_another_model(mini_exp, tmp_path, capsys):
    root, model = mini_exp
    f = _thresholds_file(tmp_path / "t.json", model="EleutherAI/gpt-neo-125m", el_start=1)
    with pytest.raises(SystemExit) as exc:  # the toy allows 256 positions: KU's EL needs 2T-1-1
        trainer.main(_args(root, model, tmp_path / "x", "--max_epochs", "0", "--thresholds", f))
    assert exc.value.code == 2 and "--target_length 129 or less" in capsys.readouterr().err
    trainer.main(_args(root, model, tmp_path / "a", "--max_epochs", "0", "--thresholds", f, "--target_length", "128"))
    log = (tmp_path / "a" / "res.log").read_text()
    assert "calibrated for model 'EleutherAI/gpt-neo-125m'" in log and repr(model) in log
    valid = pd.read_csv(tmp_path / "a" / "valid.csv")
    assert list(valid.columns) == ["epoch", "val_loss", "acc", "el_10_from1"]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["args"]["el_start"] == 1


@pytest.mark.parametrize("content, match", [
    ({"el": {"10": 0.03}, "el_start": 150, "f1": 0.3, "bleu": 0.01, "model": "m", "n_rows": 3}, "missing key 'ma'"),
    ({"ma": 0.5, "el": {"10": 0.03}, "f1": 0.3, "bleu": 0.01, "model": "m", "n_rows": 3}, "missing key 'el_start'"),
    ({"ma": 1.5, "el": {"10": 0.03}, "el_start": 150, "f1": 0.3, "bleu": 0.01, "model": "m", "n_rows": 3}, "'ma'"),
    ("not json", "not valid JSON"),
])
def test_malformed_thresholds_file(mini_exp, tmp_path, capsys, content, match):
    root, model = mini_exp
    f = tmp_path / "t.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        trainer.main(_args(root, model, tmp_path / "x", "--thresholds", str(f)))
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- bad unseen input


def test_bad_unseen_input_exits_2_and_keeps_outputs(toy_world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thresholds.json").write_text("previous")
    rows = np.load(toy_world["train_file"])
    held = np.load(toy_world["heldout_ids"])
    forget = tmp_path / "data"
    save_split(toy_world, forget, "exp0", held[[2, 5]])
    oov = rows[held[:4]].copy()
    oov[1, 7] = 60000
    cases = {
        "int32": (rows[held[:4]].astype(np.int32), "dtype int32"),
        "short": (rows[held[:4], :100], "shape (4, 100)"),
        "oov": (oov, "row 1 holds token id 60000 (column 7), out of the vocabulary"),
        "shared": (rows[held[:8]], "2 of 8 unseen rows equal rows of the forget set exp0"),
    }
    for name, (arr, match) in cases.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        with pytest.raises(SystemExit) as exc:
            eval_script.main(["--calibrate", "--unseen", str(path), "--model_name", toy_world["model"], *OFFLINE,
                              "--dir", str(out), "--data_dir", str(forget), "--no_progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and match in err, (name, err)
        assert (out / "thresholds.json").read_text() == "previous"
        assert not (out / "calibration.csv").exists()
