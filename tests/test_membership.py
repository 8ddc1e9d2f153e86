"""Membership inference (icu.membership, eval.py --unseen without --calibrate): each of the four
scores against a slow per-row reference on a tiny GPT-Neo (the rows' GPT-2 ids) and a tiny Llama
(the re-encoded text, padded in batches), the AUC against scikit-learn, eval.py end to end and its
bad input."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import OFFLINE
from icu.data import save_set
from icu.errors import IcuError
from icu.membership import (
    AUC_KEYS,
    ROW_COLUMNS,
    SCORE_COLUMNS,
    lowest_k_mean,
    membership_eval,
    membership_inputs,
    membership_scores,
    roc_auc,
    token_scores,
)
from tiny import LLAMA_BOS, LLAMA_EOS, LLAMA_SPECIALS, family_rows, memorize, tiny_llama, tiny_llama_tokenizer, tiny_neo

torch.set_num_threads(1)

# the tolerance between float32 scores and the float64 reference
TOL = dict(rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the slow reference


@torch.no_grad()
def slow_row(model, ids: list[int], scored: list[bool], text: str) -> dict[str, float]:
    """The four scores of one row the obvious way: one forward of the row alone, then per
    predicted token t (``scored[t]``, t >= 1) a full float64 softmax of the logits at t-1."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (L, V)
    lps, zs = [], []
    for t in range(1, len(ids)):
        if not scored[t]:
            continue
        logp = F.log_softmax(logits[t - 1], dim=-1)  # (V,)
        p = logp.exp()
        mu = float((p * logp).sum())
        sigma = (float((p * logp**2).sum()) - mu**2) ** 0.5
        lps.append(float(logp[ids[t]]))
        zs.append((lps[-1] - mu) / sigma)
    k = max(1, int(0.4 * len(lps)))
    loss = float(np.mean(lps))
    return {"tokens": len(lps), "loss": loss, "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
            "min_k": float(np.mean(sorted(lps)[:k])), "min_k_pp": float(np.mean(sorted(zs)[:k]))}


def assert_matches_reference(df: pd.DataFrame, refs: list[dict]) -> None:
    assert df["tokens"].tolist() == [r["tokens"] for r in refs]
    for col in SCORE_COLUMNS:
        np.testing.assert_allclose(df[col].to_numpy(), [r[col] for r in refs], err_msg=col, **TOL)


# --------------------------------------------------------------------------- scores


def test_scores_on_gpt2_ids_equal_slow_reference(gpt2_tok, tiny_lm):
    """A GPT-2-id model reads the 200 ids themselves (199 predicted tokens), even where the
    text would re-encode to other ids."""
    rows = family_rows(gpt2_tok, 3, 1, seed=5)
    rows[1, 60:62] = [220, 64]  # "Ġ", "a": the text " a" re-encodes as one token
    texts = gpt2_tok.batch_decode(rows.tolist())
    assert gpt2_tok(texts[1])["input_ids"] != rows[1].tolist()
    df = membership_scores(tiny_lm, gpt2_tok, gpt2_tok, rows, batch_size=2, ids=[7, 8, 9])
    assert df["id"].tolist() == [7, 8, 9]
    assert df["zlib_bytes"].tolist() == [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    refs = [slow_row(tiny_lm, r.tolist(), [False] + [True] * 199, t) for r, t in zip(rows, texts)]
    assert_matches_reference(df, refs)
    assert all(r["tokens"] == 199 for r in refs)


def bos_eos_llama_tokenizer():
    """The tiny Llama BPE adding a bos before and an eos after every encoding."""
    from tokenizers import processors

    tok = tiny_llama_tokenizer(add_bos=True)
    bos, eos = LLAMA_SPECIALS[LLAMA_BOS], LLAMA_SPECIALS[LLAMA_EOS]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, LLAMA_BOS), (eos, LLAMA_EOS)])
    return tok


def reencoded_model(kind: str):
    if kind == "neo":  # absolute positions: padding must not move them
        return tiny_neo(2, hidden_size=32, vocab_size=512, max_position_embeddings=512,
                        bos_token_id=LLAMA_EOS, eos_token_id=LLAMA_EOS, pad_token_id=LLAMA_EOS)
    return tiny_llama(2)


@pytest.mark.parametrize("kind, specials", [("llama", False), ("llama", True), ("neo", False)])
def test_scores_on_reencoded_text_equal_slow_reference(gpt2_tok, kind, specials):
    """Another tokenizer reads the row's text re-encoded in full; a bos / eos it adds is never a
    predicted token; rows of different lengths left-padded in a batch score as they do alone."""
    tok = bos_eos_llama_tokenizer() if specials else tiny_llama_tokenizer()
    model = reencoded_model(kind)
    rows = family_rows(gpt2_tok, 5, 1, seed=9)
    texts = gpt2_tok.batch_decode(rows.tolist())
    refs = []
    for text in texts:
        ids = tok(text)["input_ids"]
        scored = [False] + [True] * (len(ids) - 1)  # token 0 has no context
        if specials:
            assert ids[0] == LLAMA_BOS and ids[-1] == LLAMA_EOS
            scored[-1] = False  # the added eos is not text
        refs.append(slow_row(model, ids, scored, text))
    lengths = [r["tokens"] for r in refs]
    assert len(set(lengths)) == len(lengths) and min(lengths) > 250  # re-encoded: not 199, and padded in batches
    batched = membership_scores(model, tok, gpt2_tok, rows, batch_size=3)
    alone = membership_scores(model, tok, gpt2_tok, rows, batch_size=1)
    assert_matches_reference(batched, refs)
    assert_matches_reference(alone, refs)
    for col in SCORE_COLUMNS:  # batching changes nothing beyond float32 rounding
        np.testing.assert_allclose(batched[col], alone[col], rtol=1e-5, atol=1e-6, err_msg=col)


def test_token_scores_survive_minus_infinite_logits():
    """A token with logit -inf has p = 0: it drops out of mu and sigma instead of making them NaN;
    positions whose label is -100 stay 0 whatever their logits hold."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    logits[0, 1, [0, 3]] = float("-inf")
    logits[1, 0] = float("nan")  # a padding position's garbage
    labels = torch.tensor([[5, 1, 2, 4], [-100, -100, 0, 5]])
    logp, z, valid = token_scores(logits, labels)
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert torch.isfinite(logp).all() and torch.isfinite(z).all()
    for b, t in valid.nonzero().tolist():
        lsm = F.log_softmax(logits[b, t].double(), -1)
        support = torch.isfinite(lsm)
        p, lp = lsm[support].exp(), lsm[support]
        mu = float((p * lp).sum())
        sigma = (float((p * lp**2).sum()) - mu**2) ** 0.5
        want = float(lsm[labels[b, t + 1]])
        assert float(logp[b, t]) == pytest.approx(want, abs=1e-5)
        assert float(z[b, t]) == pytest.approx((want - mu) / sigma, abs=1e-4)
    assert float(logp[1, 0]) == 0.0 and float(z[1, 0]) == 0.0


def test_token_scores_do_not_depend_on_the_slice_size(monkeypatch):
    """Positions are scored in slices of the vocabulary-wide temporaries; the slice size (CPU's
    small one, an accelerator's large one) changes nothing."""
    import icu.membership as mem

    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(3, 9, 50, generator=g)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[1, :4] = -100
    whole = token_scores(logits, labels)  # one slice
    monkeypatch.setattr(mem, "_CPU_CHUNK_ELEMENTS", 2 * 50)  # two positions per slice
    sliced = token_scores(logits, labels)
    assert torch.equal(whole[2], sliced[2]) and int(whole[2].sum()) == 3 * 8 - 3
    for a, b in zip(whole[:2], sliced[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lowest_k_mean_takes_max_1_int_04_t_lowest_valid_values():
    values = torch.tensor([[5.0, -9.0, 1.0, 2.0, 3.0, 0.0, 4.0, -1.0]] * 4)
    valid = torch.zeros(4, 8, dtype=torch.bool)
    valid[0, 2:3] = True  # T = 1 -> k = 1
    valid[1, 2:4] = True  # T = 2 -> k = max(1, 0) = 1
    valid[2, 2:7] = True  # T = 5 -> k = 2 (the -9 is not valid: ignored)
    valid[3, :] = True  # T = 8 -> k = 3
    out = lowest_k_mean(values, valid)
    assert out.tolist() == [1.0, 1.0, 0.5, (-9.0 - 1.0 + 0.0) / 3]
    assert np.isnan(lowest_k_mean(values[:1], torch.zeros(1, 8, dtype=torch.bool))[0])


# --------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_equals_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n_pos, n_neg = (int(n) for n in rng.integers(1, 40, 2))
    levels = 3 + seed  # few distinct values: many ties, within and across the two sides
    pos = rng.integers(0, levels, n_pos) + (0.5 if seed % 2 else 0.0) * rng.integers(0, 2, n_pos)
    neg = rng.integers(0, levels, n_neg).astype(float)
    want = roc_auc_score(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(want, abs=1e-12)
    cont_pos, cont_neg = rng.normal(0.3, 1, n_pos), rng.normal(0, 1, n_neg)
    want = roc_auc_score(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[cont_pos, cont_neg])
    assert roc_auc(cont_pos, cont_neg) == pytest.approx(want, abs=1e-12)


def test_roc_auc_meaning_and_edges():
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0  # every target more familiar
    assert roc_auc([0.0], [1.0, 2.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5  # indistinguishable
    assert roc_auc([0.0], [-np.inf]) == 1.0 and roc_auc([-np.inf], [-np.inf]) == 0.5
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([np.nan], [1.0])


# --------------------------------------------------------------------------- membership_eval


def test_membership_eval_separates_memorized_targets(gpt2_tok):
    """A model that memorized the targets: every score ranks them above unseen rows (AUC 1);
    the frame holds targets then unseen rows, named by the ids given; training mode restored."""
    tok = tiny_llama_tokenizer()
    rows = family_rows(gpt2_tok, 8, 1, seed=13)  # 8 unrelated documents
    ids, _, _ = membership_inputs(rows[:4], tok, gpt2_tok)
    width = max(map(len, ids))
    x = torch.tensor([[LLAMA_EOS] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    model = memorize(tiny_llama(4), x, mask, steps=40)
    model.train()
    per_row, aucs = membership_eval(model, tok, gpt2_tok, rows[:4], rows[4:], batch_size=3,
                                    target_ids=[10, 11, 12, 13], unseen_ids=[4, 5, 6, 7])
    assert model.training
    assert list(per_row.columns) == list(ROW_COLUMNS)
    assert per_row["kind"].tolist() == ["target"] * 4 + ["unseen"] * 4
    assert per_row["id"].tolist() == [10, 11, 12, 13, 4, 5, 6, 7]
    assert set(aucs) == set(AUC_KEYS)
    assert aucs == {"auc_loss": 1.0, "auc_zlib": 1.0, "auc_min_k": 1.0, "auc_min_k_pp": 1.0}
    fresh, _ = membership_eval(tiny_llama(4), tok, gpt2_tok, rows[:4], rows[4:], batch_size=3)
    assert (per_row["loss"][:4].to_numpy() > fresh["loss"][:4].to_numpy()).all()  # higher = more familiar


def test_membership_eval_bad_rows(gpt2_tok, tiny_lm):
    rows = family_rows(gpt2_tok, 2, 1, seed=3)
    cases = [
        (rows[:0], rows, "no rows"),
        (rows.astype(np.int64), rows, "dtype"),
        (rows[:, :100], rows, "shape"),
    ]
    bad = rows.copy()
    bad[1, 5] = 60000
    cases.append((rows, bad, "out of the vocabulary"))
    for target, unseen, message in cases:
        with pytest.raises(IcuError, match=message):
            membership_eval(tiny_lm, gpt2_tok, gpt2_tok, target, unseen)
    small = tiny_neo(0, vocab_size=1000)  # GPT-2's ids, but fewer of them
    with pytest.raises(IcuError, match="vocabulary has 1000 entries"):
        membership_eval(small, gpt2_tok, gpt2_tok, rows, rows)
    short = tiny_neo(0, max_position_embeddings=100)
    with pytest.raises(IcuError, match="allows 100 positions"):
        membership_eval(short, gpt2_tok, gpt2_tok, rows, rows)


# --------------------------------------------------------------------------- eval.py


L = 40
LENGTHS = ["--prefix_length", str(L), "--suffix_length", str(L), "--target_length", str(L), "--el_start", "26"]


@pytest.fixture(scope="module")
def mia_world(gpt2_tok, tiny_lm_dir, tmp_path_factory):
    """Split "mini" of 3 targets (doc ids 10..12), 5 other rows as a train file, the first 3 of
    them as an --unseen array, the model folder of ``tiny_lm``."""
    root = tmp_path_factory.mktemp("mia")
    rows = family_rows(gpt2_tok, 8, 1, seed=31)
    save_set(str(root / "data" / "mini" / "unlearn"), rows[:3], np.arange(10, 13))
    np.save(root / "train.npy", rows[3:])
    np.save(root / "unseen.npy", rows[3:6])
    np.save(root / "unseen_ids.npy", np.arange(5))
    return {"root": root, "rows": rows, "model": tiny_lm_dir}


def run_eval(w, out, extra, capsys):
    from test_eval_cli import run_main

    argv = ["--exp", "mini", "--data_dir", str(w["root"] / "data"), "--model_name", w["model"], *OFFLINE,
            "--batch_size", "4", "--dir", str(out), "--no_progress", *LENGTHS, *extra]
    return run_main(argv, capsys)


def test_eval_unseen_writes_membership_files(mia_world, gpt2_tok, tiny_lm, tmp_path, capsys):
    w = mia_world
    code, err = run_eval(w, tmp_path / "a", ["--unseen", str(w["root"] / "unseen.npy")], capsys)
    assert code == 0, err
    per_row = pd.read_csv(tmp_path / "a" / "membership.csv")
    assert list(per_row.columns) == list(ROW_COLUMNS)
    assert per_row["kind"].tolist() == ["target"] * 3 + ["unseen"] * 3
    assert per_row["id"].tolist() == [10, 11, 12, 0, 1, 2]
    # the same numbers as membership_eval on the model object (tiny_lm is the saved model)
    direct, aucs = membership_eval(tiny_lm, gpt2_tok, gpt2_tok, w["rows"][:3], w["rows"][3:6])
    for col in SCORE_COLUMNS:
        np.testing.assert_allclose(per_row[col], direct[col], rtol=1e-6, err_msg=col)
    report = json.loads((tmp_path / "a" / "membership.json").read_text())
    assert {k: report[k] for k in ("n_target", "n_unseen", "min_k_fraction")} == {
        "n_target": 3, "n_unseen": 3, "min_k_fraction": 0.4}
    summary = pd.read_csv(tmp_path / "a" / "eval.csv").iloc[0]
    target = per_row["kind"] == "target"
    for col, key in zip(SCORE_COLUMNS, AUC_KEYS):
        assert report[key] == pytest.approx(roc_auc(per_row.loc[target, col], per_row.loc[~target, col]), abs=1e-12)
        assert report[key] == pytest.approx(aucs[key], abs=1e-12)
        assert summary[key] == pytest.approx(report[key], abs=1e-12)
    assert "membership inference, 3 targets vs 3 unseen rows: AUC loss" in (tmp_path / "a" / "eval.log").read_text()
    assert (tmp_path / "a" / "unlearn.csv").exists()

    # --unseen_rows into --train_file, cut by --limit: the ids name train-file rows
    code, err = run_eval(w, tmp_path / "b", ["--unseen_rows", str(w["root"] / "unseen_ids.npy"),
                                             "--train_file", str(w["root"] / "train.npy"), "--limit", "4"], capsys)
    assert code == 0, err
    again = pd.read_csv(tmp_path / "b" / "membership.csv")
    assert again["id"].tolist() == [10, 11, 12, 0, 1, 2, 3]
    pd.testing.assert_frame_equal(again.iloc[:6], per_row)


def test_eval_unseen_bad_input_is_one_line_and_writes_nothing(mia_world, tmp_path, capsys):
    w = mia_world
    good = w["rows"][3:6]
    arrays = {
        "dtype": good.astype(np.int64),
        "shape": good[:, :100],
        "out of the vocabulary": np.where(np.arange(200) == 7, 60000, good.astype(np.int64)).astype(np.uint16),
        "no rows": good[:0],
        "equal rows of the forget set": np.concatenate([good, w["rows"][1:2]]),
    }
    cases = []
    for message, arr in arrays.items():
        path = tmp_path / f"{len(cases)}.npy"
        np.save(path, arr)
        cases.append((["--unseen", str(path)], message))
    cases += [
        (["--limit", "2"], "--limit"),
        (["--unseen_rows", str(w["root"] / "unseen_ids.npy")], "--train_file"),
        (["--unseen", str(w["root"] / "unseen.npy"), "--unseen_rows", str(w["root"] / "unseen_ids.npy")],
         "exactly one"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err = run_eval(w, out, extra, capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and message in last, (extra, last)
        written = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert set(written) <= {"eval.log"}, written
