"""The loop's cheap validation (--el_when needed) and held-out trajectory (--heldout), on a tiny
random GPT-Neo with the loss-based stand-in evaluator; the real evaluation end to end in
test_trainer_cli.py / test_llama.py."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from icu.heldout import encode_heldout, heldout_row_losses, row_losses
from tiny import LEN, LossEval, family_rows, make_loop, tiny_neo
from tiny import N_PAIRS as N


class Recording(LossEval):
    """LossEval that honours what it is asked for: EL columns only with el_ns, and records each
    call's (el_ns, generation)."""

    def __init__(self, thr):
        super().__init__(thr)
        self.calls = []

    def __call__(self, model, tok, gpt2, data, *, indices, el_ns=(10,), generation=True, **kw):
        self.calls.append((tuple(el_ns), generation))
        res = super().__call__(model, tok, gpt2, data, indices=indices, **kw)
        if not el_ns:
            res.per_sample = res.per_sample.drop(columns=["el_10"])
        return res


def _run(out, pairs, el_when, thr, acc, **kw):
    ev = Recording(thr)
    loop = make_loop(out, pairs, ev, max_epochs=4, acc=acc, el=1.0, el_when=el_when, **kw)
    return loop, loop.run(), ev


def test_el_when_needed_gives_the_same_run_and_skips_el_only_where_it_cannot_matter(tmp_path, pairs):
    init = LossEval(thr=0.0)(tiny_neo(), None, None, pairs.unlearn, indices=range(N)).per_sample
    thr = float(init["loss"].max()) + 0.03
    # MA = exp(-loss): stop once gradient ascent has lowered the mean MA by a few percent
    acc = float(np.exp(-init["loss"]).mean()) * 0.97
    a_loop, a, a_ev = _run(tmp_path / "always", pairs, "always", thr, acc)
    b_loop, b, b_ev = _run(tmp_path / "needed", pairs, "needed", thr, acc)
    assert a["epochs"] == b["epochs"] and a["stop_reason"] == b["stop_reason"]
    assert a["stop_reason"].startswith("MA") and 1 <= a["epochs"] < 4  # the MA rule ended it, not max_epochs
    ha = pd.read_csv(tmp_path / "always" / "history.csv")
    hb = pd.read_csv(tmp_path / "needed" / "history.csv")
    cols = ["epoch", "val_loss", "acc", "flagged", "bleu", "F1", "loss_unlearn", "loss_learn", "loss_kl"]
    pd.testing.assert_frame_equal(ha[cols], hb[cols], rtol=0, atol=0)
    for (name, p), q in zip(a_loop.engine.module.named_parameters(), b_loop.engine.module.parameters()):
        assert torch.equal(p, q), name
    # EL: every validation under "always"; under "needed" only where MA <= acc (the last one),
    # NaN and marked skipped elsewhere, equal where computed
    assert not ha["el_skipped"].any() and ha["el_10"].notna().all()
    skipped = hb["el_skipped"].to_numpy()
    assert skipped.tolist() == [ma > acc for ma in hb["acc"]] and skipped[:-1].all() and not skipped[-1]
    assert hb["el_10"][skipped].isna().all()
    assert hb["el_10"].iloc[-1] == pytest.approx(ha["el_10"].iloc[-1], rel=0, abs=0)
    assert all(c == ((10,), True) for c in a_ev.calls)
    assert b_ev.calls[:-2] == [((), True)] * (len(b_ev.calls) - 2)
    assert b_ev.calls[-2:] == [((), True), ((10,), False)]  # the EL-only pass at the stop
    e_last = pd.read_csv(tmp_path / "needed" / f"epoch{b['epochs']}.csv")
    assert e_last["el_10"].notna().all() and pd.read_csv(tmp_path / "needed" / "epoch0.csv")["el_10"].isna().all()


def test_el_when_needed_decodes_el_at_the_last_epoch(tmp_path, pairs):
    """A run that ends on --max_epochs still has EL at its last validation (its final numbers)."""
    thr = 1e9  # every sample stays flagged; acc 0 never holds
    loop, summary, ev = _run(tmp_path / "r", pairs, "needed", thr, acc=0.0)
    assert summary["stop_reason"].startswith("reached --max_epochs")
    h = pd.read_csv(tmp_path / "r" / "history.csv")
    assert h["el_skipped"].tolist() == [True, True, True, True, False]
    assert ev.calls.count(((10,), False)) == 1


def test_heldout_loss_is_recorded_at_every_validation(tmp_path, pairs, gpt2_tok):
    rows = family_rows(gpt2_tok, 5, 5, seed=7)
    enc = encode_heldout(rows, gpt2_tok, gpt2_tok)
    loop = make_loop(tmp_path / "r", pairs, LossEval(1e9), max_epochs=2, acc=0.0, eval_batch_size=2)
    loop.heldout = enc
    loop.run()
    h = pd.read_csv(tmp_path / "r" / "history.csv")
    per_row = pd.read_csv(tmp_path / "r" / "heldout.csv")
    assert per_row.columns.tolist() == ["row", "epoch0", "epoch1", "epoch2"] and len(per_row) == 5
    # slow reference at the end: Hugging Face's own loss, one row at a time
    model = loop.engine.module.eval()
    with torch.no_grad():
        ref = [model(input_ids=enc.input_ids[i:i + 1], attention_mask=enc.attention_mask[i:i + 1],
                     labels=enc.labels[i:i + 1]).loss.item() for i in range(5)]
    np.testing.assert_allclose(per_row["epoch2"], ref, rtol=1e-5)
    assert h["heldout_loss"].iloc[-1] == pytest.approx(np.mean(ref), rel=1e-5)
    rows = per_row["epoch2"].to_numpy()
    assert h["heldout_loss"].iloc[-1] == pytest.approx(rows.mean(), rel=1e-12)
    assert h["heldout_se"].iloc[-1] == pytest.approx(rows.std(ddof=1) / np.sqrt(5), rel=1e-12)
    assert h["heldout_loss"].iloc[0] != h["heldout_loss"].iloc[-1]  # training moved it
    # the checkpoint carries the per-row losses, so a resumed run rewrites heldout.csv whole
    from icu.checkpoint import load_state

    assert sorted(load_state(os.path.join(tmp_path, "r", "checkpoint"))["heldout_rows"]) == [0, 1, 2]


def test_row_losses_is_each_rows_own_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [-100, -100, 1, 2, 3], [-100, -100, -100, -100, 6]])
    got = row_losses(logits, labels)
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t], 0)[labels[b, t + 1]].item()
                 for t in range(4) if labels[b, t + 1] != -100]
        assert got[b].item() == pytest.approx(np.mean(terms), rel=1e-6)
