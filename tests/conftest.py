"""Shared fixtures. Tests run offline: HF_HUB_OFFLINE=1 is set before anything imports the hub."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARED = os.environ.get("ICU_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
TOY_DIR = os.environ.get("ICU_TOY_DIR", os.path.join(REPO, "datasets", "toy"))


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


def save_paired_split(toy_world: dict, root, exp: str, n: int):
    """Split ``exp`` under ``root``: the first ``n`` toy targets, each paired with a row of its
    own family (what data_prep's nearest neighbour picks in the toy). Returns the target ids."""
    import numpy as np

    from icu.data import save_set

    rows = np.load(toy_world["train_file"])
    targets = np.asarray(toy_world["meta"]["target_ids"][:n])
    fam = np.asarray(toy_world["meta"]["families"])
    learn = np.asarray([next(i for i in np.flatnonzero(fam == fam[t]) if i not in targets) for t in targets])
    save_set(os.path.join(str(root), exp, "unlearn"), rows[targets], targets)
    save_set(os.path.join(str(root), exp, "learn"), rows[learn], learn)
    return targets


@pytest.fixture(scope="session")
def gpt2_tok():
    from icu.models import builtin_gpt2_tokenizer

    tok = builtin_gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
