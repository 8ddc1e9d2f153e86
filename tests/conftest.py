"""Shared fixtures: the toy world and splits cut from it, the GPT-2 tokenizer, tiny models (built
by tests/tiny.py, whose plain functions ds_worker.py also uses), the loop tests' pairs.

Tests run offline: HF_HUB_OFFLINE=1 is set before anything imports the hub."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARED = os.environ.get("ICU_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
TOY_DIR = os.environ.get("ICU_TOY_DIR", os.path.join(REPO, "datasets", "toy"))
# the scripts' model flags that keep them offline and on the CPU
OFFLINE = ["--gpt2_name", "builtin:gpt2", "--bert_name", "builtin:all-MiniLM-L6-v2", "--device", "cpu"]


@pytest.fixture(scope="session")
def shared_dir() -> str:
    """../shared (or $ICU_SHARED_DIR); tests that need it skip when it is absent."""
    if not os.path.isdir(os.path.join(SHARED, "data")):
        pytest.skip(f"shared data not found at {SHARED} (set ICU_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def toy_world() -> dict:
    """The offline toy world (built once, ~2-3 min on 2 cores, then cached in $ICU_TOY_DIR)."""
    from icu.toy import build_toy, toy_paths

    meta = build_toy(TOY_DIR)
    return {**toy_paths(TOY_DIR), "dir": TOY_DIR, "meta": meta}


def save_split(toy_world: dict, root, exp: str, unlearn_ids, learn_ids=None) -> np.ndarray:
    """Write split ``exp`` under ``root`` from toy rows: the unlearn set ``unlearn_ids`` and, when
    given, the learn set ``learn_ids`` (in the order given, as data_prep pairs them)."""
    from icu.data import save_set

    rows = np.load(toy_world["train_file"])
    unlearn_ids = np.asarray(unlearn_ids, dtype=np.int64)
    save_set(os.path.join(str(root), exp, "unlearn"), rows[unlearn_ids], unlearn_ids)
    if learn_ids is not None:
        learn_ids = np.asarray(learn_ids, dtype=np.int64)
        save_set(os.path.join(str(root), exp, "learn"), rows[learn_ids], learn_ids)
    return unlearn_ids


def save_paired_split(toy_world: dict, root, exp: str, n: int) -> np.ndarray:
    """Split ``exp`` under ``root``: the first ``n`` toy targets, each paired with a row of its
    own family (what data_prep's nearest neighbour picks in the toy). Returns the target ids."""
    targets = np.asarray(toy_world["meta"]["target_ids"][:n])
    fam = np.asarray(toy_world["meta"]["families"])
    learn = [next(i for i in np.flatnonzero(fam == fam[t]) if i not in targets) for t in targets]
    return save_split(toy_world, root, exp, targets, learn)


@pytest.fixture(scope="module")
def mini_exp(toy_world, tmp_path_factory):
    """Split "mini": 8 toy targets paired with 8 of their data_prep-style neighbours (same
    family). Returns (data root, toy model folder)."""
    root = tmp_path_factory.mktemp("mini")
    save_paired_split(toy_world, root, "mini", 8)
    return root, toy_world["model"]


@pytest.fixture(scope="session")
def gpt2_tok():
    from tiny import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    """A random 1-layer GPT-Neo (hidden 32, seed 0) for scoring tests; shared, so never train it."""
    from tiny import tiny_neo

    return tiny_neo(0, hidden_size=32)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, gpt2_tok) -> str:
    """``tiny_lm``'s weights saved with the GPT-2 tokenizer: a --model_name for the scripts (read only)."""
    from tiny import save_tiny_neo

    return save_tiny_neo(tmp_path_factory.mktemp("tiny_lm"), 0, gpt2_tok, hidden_size=32)


@pytest.fixture(scope="module")
def pairs(gpt2_tok):
    """N_PAIRS (6) unlearn/learn pairs of generated family text (24-token prefix and suffix): the loop tests' data."""
    from tiny import N_PAIRS, family_pairs

    return family_pairs(gpt2_tok, N_PAIRS, 3, seed=1)
