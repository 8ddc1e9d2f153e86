"""The offline toy world: deterministic corpus with real neighbours, a memorizing model, caching."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from icu.toy import build_corpus, build_toy, teacher_forced_ma


def test_corpus_is_deterministic_and_well_formed(gpt2_tok):
    a, fam_a = build_corpus(5, 40, 10, gpt2_tok)
    b, fam_b = build_corpus(5, 40, 10, gpt2_tok)
    c, _ = build_corpus(6, 40, 10, gpt2_tok)
    assert a.shape == (40, 200) and a.dtype == np.uint16
    assert np.array_equal(a, b) and np.array_equal(fam_a, fam_b)
    assert not np.array_equal(a, c)
    text = gpt2_tok.decode(a[0].astype(np.int64).tolist())
    assert len(text.split()) > 100 and text.count(".") > 5


@pytest.mark.slow
def test_toy_model_memorized_its_targets(toy_world):
    from transformers import GPTNeoForCausalLM

    meta = toy_world["meta"]
    rows = torch.as_tensor(np.load(toy_world["train_file"]).astype(np.int64))
    model = GPTNeoForCausalLM.from_pretrained(toy_world["model"]).eval()
    targets = meta["target_ids"]
    heldout = np.load(toy_world["heldout_ids"])[:64]
    ma_t = teacher_forced_ma(model, rows[targets], batch_size=8)
    ma_h = teacher_forced_ma(model, rows[heldout], batch_size=8)
    assert ma_t.mean() >= 0.9 and abs(ma_t.mean() - meta["ma_targets_mean"]) < 1e-4
    assert ma_h.mean() < ma_t.mean() - 0.25  # held-out rows are far less memorized
    # the target's prefix alone (what the generation check prompts with) recalls the suffix
    window = teacher_forced_ma(model, rows[targets][:, 100:], batch_size=8)
    assert window.mean() >= 0.9
    split = pd.read_csv(os.path.join(toy_world["exp_dir"], "exp0", "lm_extraction_32_0.csv"))
    assert list(split.columns) == ["doc_id", "corpus", "text"] and sorted(split.doc_id) == targets
    assert not set(heldout) & set(targets)


def test_second_build_is_cached(toy_world):
    weights = [f for f in os.listdir(toy_world["model"]) if f.endswith(".safetensors")][0]
    path = os.path.join(toy_world["model"], weights)
    before = os.stat(path).st_mtime_ns
    meta = build_toy(toy_world["dir"])
    assert meta["key"] == toy_world["meta"]["key"]
    assert os.stat(path).st_mtime_ns == before


def test_two_processes_building_one_world_take_turns(tmp_path):
    """pytest -n 2 starts every worker's session fixture at once: the world is built once and both
    get it (without the lock both train, and one deletes the folder the other is reading)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "small"
    code = ("import sys, json, logging; from icu.toy import build_toy; logging.basicConfig(level=logging.INFO); "
            "m = build_toy(sys.argv[1], num_docs=40, num_targets=4, hidden_size=16, num_heads=2, "
            "steps=5, target_ma=0.0); print(json.dumps([m['key'], m['seconds']]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    metas = [tuple(json.loads(o.strip().splitlines()[-1])) for o, _ in results]
    assert metas[0] == metas[1]  # the same build: same key, same recorded build time
    errs = "".join(err for _, err in results)
    assert errs.count("toy world built in") == 1 and errs.count("already built") == 1
    assert sorted(os.listdir(tmp_path)) == ["small", "small.lock"]
