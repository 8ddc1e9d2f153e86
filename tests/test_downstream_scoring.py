"""Scoring: answers forced by a rigged model, batched == one-at-a-time, perplexity by hand."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from icu.downstream import (
    TASK_NAMES,
    BatchedScorer,
    SequentialScorer,
    evaluate_task,
    load_tasks,
    resolve_sources,
    run_suite,
)
from icu.downstream.text import normalize_turn

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "downstream")
VOCAB = 50257


class LookupLM(torch.nn.Module):
    """A causal LM whose logits come from a table: after the last ``k`` tokens of a sequence it
    was taught, the taught next token gets logit ``boost``; every other logit is 0."""

    def __init__(self, window: int = 256, k: int = 6, boost: float = 30.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so the scorer finds a device
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=window)
        self.k, self.boost = k, boost
        self.table: dict[tuple[int, ...], int] = {}
        self.widths: list[int] = []  # input widths seen, to check the padding

    def teach(self, before, after) -> None:
        seq = list(before) + list(after)
        for j in range(len(before), len(seq)):
            key = tuple(seq[max(0, j - self.k): j])
            assert self.table.get(key, seq[j]) == seq[j], "conflicting rig entries"
            self.table[key] = seq[j]

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        batch, length = input_ids.shape
        self.widths.append(length)
        keep = logits_to_keep or length
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(batch, keep, VOCAB)
        for b in range(batch):
            tokens = input_ids[b][mask[b].bool()].tolist()
            offset = length - len(tokens)  # left padding
            for pos in range(length - keep, length):
                t = pos - offset
                if t < 0:
                    continue
                nxt = self.table.get(tuple(tokens[max(0, t + 1 - self.k): t + 1]))
                if nxt is not None:
                    logits[b, pos - (length - keep), nxt] = self.boost
        return SimpleNamespace(logits=logits)


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def expected_choice_pairs():
    """(context, gold continuation, a wrong continuation) per fixture example, built here from
    the raw rows by the spec's rules, independently of icu.downstream."""
    f = lambda *p: os.path.join(FIXTURES, *p)  # noqa: E731
    out = {}
    labels = [int(x) for x in open(f("piqa", "dev-labels.lst")).read().split()]
    out["piqa"] = [(r["goal"], " " + r[f"sol{l + 1}"], " " + r[f"sol{2 - l}"])
                   for r, l in zip(_rows(f("piqa", "dev.jsonl")), labels)]
    out["copa"] = [(r["premise"], " " + r[f"choice{r['label'] + 1}"], " " + r[f"choice{2 - r['label']}"])
                   for r in _rows(f("copa", "val.jsonl"))]
    out["hellaswag"] = [(r["ctx"], " " + r["endings"][int(r["label"])], " " + r["endings"][int(r["label"]) - 1])
                        for r in _rows(f("hellaswag.jsonl"))]
    wino = []
    for r in _rows(f("winogrande.jsonl")):
        before, after = r["sentence"].split(" _")
        good, bad = (r["option1"], r["option2"]) if r["answer"] == "1" else (r["option2"], r["option1"])
        wino.append((before, f" {good}{after}", f" {bad}{after}"))
    out["winogrande"] = wino
    for name in ("arc_easy", "arc_challenge"):
        arc = []
        for r in _rows(f(f"{name}.jsonl")):
            i = r["choices"]["label"].index(r["answerKey"])
            arc.append((r["question"], " " + r["choices"]["text"][i], " " + r["choices"]["text"][i - 1]))
        out[name] = arc
    gold = ["60 km / h", "180", "12"]
    wrong = ["50 km / h", "150", "8"]
    out["math_qa"] = [(r["Problem"], " " + g, " " + w) for r, g, w in zip(_rows(f("math_qa.jsonl")), gold, wrong)]
    out["pubmed_qa"] = [
        (f"Context: {a}\nQuestion: {q}\nAnswer:", " " + d, " " + w)
        for a, q, d, w in [
            ("We enrolled 120 adults aged 65 to 80. Participants walked 30 minutes a day for 12 weeks "
             "and their resting systolic pressure fell by 6 mmHg on average compared with controls.",
             "Does daily walking lower resting blood pressure in older adults?", "yes", "no"),
            ("A survey of 800 patients with migraine recorded their coffee intake and attacks for a year. "
             "Attack frequency did not differ between coffee drinkers and abstainers.",
             "Is coffee intake linked to fewer migraine attacks?", "no", "maybe"),
            ("A pilot study of 40 students used a sleep app for a month. Sleep scores improved in some "
             "measures but not others and the sample was small.",
             "Can a smartphone app improve sleep quality?", "maybe", "yes"),
        ]
    ]
    return out


@pytest.fixture(scope="module")
def fixture_tasks():
    return load_tasks(resolve_sources(list(TASK_NAMES), FIXTURES))


def _ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("pick", ["gold", "wrong"])
def test_rigged_model_forces_every_multiple_choice_answer(fixture_tasks, gpt2_tok, pick):
    pairs = expected_choice_pairs()
    for name, triples in pairs.items():
        rig = LookupLM()
        for context, good, bad in triples:
            rig.teach(_ids(gpt2_tok, context), _ids(gpt2_tok, good if pick == "gold" else bad, False))
        result = evaluate_task(fixture_tasks[name], BatchedScorer(rig, gpt2_tok, batch_size=4))
        assert result.metrics[name] == (1.0 if pick == "gold" else 0.0), name


def test_rigged_lambada_and_uniform_lambada(fixture_tasks, gpt2_tok):
    data = fixture_tasks["lambada"]
    rig = LookupLM()
    for ex in data.examples:
        rig.teach(_ids(gpt2_tok, ex.context), _ids(gpt2_tok, ex.target, False))
    result = evaluate_task(data, BatchedScorer(rig, gpt2_tok))
    assert result.metrics["lambada"] == 1.0 and result.metrics["lambada_f1"] == 1.0
    assert result.metrics["lambada_loss"] < 1e-6
    assert [d.prediction for d in result.details] == [" lighthouse", " paint", " keys", " bread"]
    uniform = evaluate_task(data, BatchedScorer(LookupLM(), gpt2_tok))
    assert uniform.metrics["lambada"] == 0.0
    assert uniform.metrics["lambada_loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_rigged_dialog_reply_is_generated_and_cut(fixture_tasks, gpt2_tok):
    data = fixture_tasks["empathetic_dialogues"]
    raw = json.load(open(os.path.join(FIXTURES, "empathetic_dialogues.json")))["text"]
    rig = LookupLM()
    for turns in raw.values():
        prompt = "".join(f"User {1 + i % 2}: {normalize_turn(t)}\n" for i, t in enumerate(turns[:-1]))
        prompt += f"User {1 + (len(turns) - 1) % 2}:"
        rig.teach(_ids(gpt2_tok, prompt), _ids(gpt2_tok, " " + normalize_turn(turns[-1]) + "\nUser 1: and so on", False))
    result = evaluate_task(data, BatchedScorer(rig, gpt2_tok, batch_size=2))
    assert [d.generated for d in result.details] == ["I am, I practiced for months.",
                                                     "Thanks, the vet says he will be fine."]
    assert result.metrics["empathetic_dialogues"] == 1.0


def test_uniform_model_has_vocabulary_size_perplexity(gpt2_tok):
    texts = ["one two three four five six seven", "eight nine ten eleven twelve"]
    for stride in (None, 3):
        scorer = BatchedScorer(LookupLM(), gpt2_tok, suffix_length=5)
        result = scorer.perplexity(texts, stride=stride)
        assert result.ppl == pytest.approx(VOCAB, rel=1e-5)
        n = len(scorer.encode_text(texts))
        assert result.tokens == (n - 1 if stride else sum(len(range(i, min(i + 5, n))) - 1 for i in range(0, n, 5)))


def test_perplexity_matches_a_hand_computation(tiny_lm, gpt2_tok):
    texts = [r["text"] for r in json.load(open(os.path.join(FIXTURES, "wizard_of_internet.json")))["text"].values()
             for r in [{"text": " ".join(r)}]]
    ids = gpt2_tok("\n\n".join(texts))["input_ids"]
    length, stride = 16, 6
    with torch.no_grad():
        def chunk_loss(chunk, score_last):
            logits = tiny_lm(input_ids=torch.tensor([chunk])).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="none")
            return nll[-score_last:].double()
        chunks = [ids[i: i + length] for i in range(0, len(ids), length)]
        ref = math.exp(sum(float(chunk_loss(c, len(c) - 1).mean()) for c in chunks) / len(chunks))
        total, count, done = 0.0, 0, 1
        for begin in range(0, len(ids), stride):
            end = min(begin + length, len(ids))
            if end > done:
                nll = chunk_loss(ids[begin:end], end - done)
                total, count, done = total + float(nll.sum()), count + len(nll), end
            if end == len(ids):
                break
        ref_strided = math.exp(total / count)
    scorer = BatchedScorer(tiny_lm, gpt2_tok, suffix_length=length, batch_size=3)
    assert scorer.perplexity(texts).ppl == pytest.approx(ref, rel=1e-5)
    assert scorer.perplexity(texts, stride=stride).ppl == pytest.approx(ref_strided, rel=1e-5)
    assert count == len(ids) - 1


def test_truncation_keeps_the_end_of_the_context(gpt2_tok):
    scorer = BatchedScorer(LookupLM(window=12), gpt2_tok, prefix_length=8, suffix_length=3)
    ctx = " ".join(f"w{i}" for i in range(30))
    (x, target), = scorer.encode_pairs([(ctx, " a b c d e")])
    ctx_ids, cont_ids = _ids(gpt2_tok, ctx), _ids(gpt2_tok, " a b c d e", False)
    assert target == tuple(cont_ids[:3])
    assert x == tuple((ctx_ids[-8:] + cont_ids[:3])[:-1])  # 10 tokens: within the window
    narrow = BatchedScorer(LookupLM(window=6), gpt2_tok, prefix_length=8, suffix_length=3)
    (x, _), = narrow.encode_pairs([(ctx, " a b c d e")])
    assert x == tuple((ctx_ids[-8:] + cont_ids[:3])[:-1][-6:])  # cut from the left
    (x, target), = scorer.encode_pairs([("", " hello")])
    assert x == (gpt2_tok.eos_token_id,) and target == tuple(_ids(gpt2_tok, " hello", False))
    assert scorer.encode_prompts(["z " * 40], max_new_tokens=5) == [_ids(gpt2_tok, "z " * 40)[-7:]]


def test_shared_inputs_run_once_and_padding_is_dynamic(fixture_tasks, gpt2_tok):
    rig = LookupLM()
    evaluate_task(fixture_tasks["pubmed_qa"], BatchedScorer(rig, gpt2_tok, batch_size=8))
    assert len(rig.widths) == 1  # 3 examples x 3 one-token answers: one forward of 3 rows
    rig = LookupLM()
    evaluate_task(fixture_tasks["copa"], BatchedScorer(rig, gpt2_tok, batch_size=2))
    assert max(rig.widths) < 20  # no fixed padding
    rig = LookupLM()
    evaluate_task(fixture_tasks["copa"], SequentialScorer(rig, gpt2_tok, prefix_length=64))
    assert set(rig.widths) == {64} and len(rig.widths) == 6


def test_batches_respect_size_and_logits_budget(gpt2_tok):
    scorer = BatchedScorer(LookupLM(), gpt2_tok, batch_size=3, logits_budget=4 * VOCAB)
    assert scorer._batches(list(range(7)), [1] * 7) == [[0, 1, 2], [3, 4, 5], [6]]
    assert scorer._batches(list(range(4)), [2, 2, 1, 1]) == [[0, 1], [2, 3]]
    assert scorer._batches([0, 1], [9, 1]) == [[0], [1]]  # one row over budget still runs


def _per_example(result):
    if result.name in ("wikitext", "pile"):
        return [round(result.details[0].ppl, 3)]
    out = []
    for d in result.details:
        if hasattr(d, "scores"):
            out.append((d.pred, d.gold))
        elif hasattr(d, "generated"):
            out.append(d.generated)
        else:
            out.append((d.score.greedy, d.correct))
    return out


def test_batched_and_one_at_a_time_agree_on_every_example(fixture_tasks, tiny_lm, gpt2_tok):
    settings = dict(prefix_length=40, suffix_length=24)  # pubmed contexts are cut: truncation too
    fast = run_suite(fixture_tasks, BatchedScorer(tiny_lm, gpt2_tok, batch_size=3, **settings),
                     max_new_tokens=8)
    slow = run_suite(fixture_tasks, SequentialScorer(tiny_lm, gpt2_tok, **settings), max_new_tokens=8)
    for a, b in zip(fast, slow):
        assert a.error is None and b.error is None
        assert _per_example(a) == _per_example(b), a.name
        assert a.metrics == pytest.approx(b.metrics, rel=1e-5), a.name
        for da, db in zip(a.details, b.details):
            if hasattr(da, "scores"):
                assert da.scores == pytest.approx(db.scores, abs=1e-4)
            elif hasattr(da, "score"):
                assert da.score.logprob == pytest.approx(db.score.logprob, abs=1e-4)
    assert all(d.generated for r in fast if r.name == "wizard_of_internet" for d in r.details)


def test_lambada_exact_column_and_empty_normalised_targets(gpt2_tok):
    """lambada_acc_exact counts greedy tokens == target tokens (lm-eval's acc); the lambada column
    also takes a normalised word match, but never for a target that normalises to ""."""
    from icu.downstream import TASKS, TaskData
    from icu.downstream.tasks import LambadaExample

    examples = [
        LambadaExample("The keeper climbed the stairs of the old", " lighthouse"),  # exact
        LambadaExample("She opened the tin of blue", " paint"),  # greedy " Paint": words only
        LambadaExample("He looked for it in", " the"),  # greedy " a": both normalise to ""
        LambadaExample("They walked to the end of", " the"),  # greedy " the": exact, counts
    ]
    greedy = [" lighthouse", " Paint", " a", " the"]
    rig = LookupLM()
    for ex, g in zip(examples, greedy):
        rig.teach(_ids(gpt2_tok, ex.context), _ids(gpt2_tok, g, False))
    result = evaluate_task(TaskData(TASKS["lambada"], "rig", examples), BatchedScorer(rig, gpt2_tok))
    assert [d.prediction for d in result.details] == greedy
    assert [d.exact for d in result.details] == [True, False, False, True]
    assert [d.correct for d in result.details] == [True, True, False, True]
    assert result.metrics["lambada_acc_exact"] == 0.5 and result.metrics["lambada"] == 0.75


def test_perplexity_reports_per_chunk_losses(fixture_tasks, gpt2_tok):
    texts = fixture_tasks["pile"].examples
    scorer = BatchedScorer(LookupLM(), gpt2_tok, suffix_length=16)
    for stride in (None, 8):
        ppl = scorer.perplexity(texts, stride=stride)
        assert len(ppl.losses) == len(ppl.scored) == ppl.windows and sum(ppl.scored) == ppl.tokens
        assert all(loss == pytest.approx(math.log(VOCAB)) for loss in ppl.losses)  # uniform model
        mean = sum(ppl.losses) / len(ppl.losses) if stride is None else \
            sum(l * n for l, n in zip(ppl.losses, ppl.scored)) / ppl.tokens
        assert ppl.ppl == pytest.approx(math.exp(mean))
