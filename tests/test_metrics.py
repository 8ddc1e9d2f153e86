"""icu.metrics: the pure metric functions, against hand-worked examples and a tuple-based
re-implementation of the reference's n-gram loop."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from icu.errors import IcuError
from icu.metrics import (
    bleu,
    check_lengths,
    distinct_ratio,
    el_prefixes,
    extraction_likelihood,
    flag_rule,
    get_bertscorer,
    ma_positions,
    memorization_accuracy,
    ngram_match_fraction,
    token_entropy,
    word_tokenize,
)

# --------------------------------------------------------------------------- word_tokenize


@pytest.mark.parametrize(
    "text, expected",
    [
        # Treebank splits punctuation off words.
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        # Contractions: "can't" -> "ca" + "n't".
        ("I can't go.", ["I", "ca", "n't", "go", "."]),
        # Punkt keeps "Mr." together (known abbreviation) and splits the sentence after
        # "today."; the Treebank tokenizer splits a period only at the end of its input, so
        # "today" loses its period only because the sentence split put it last.
        ("Mr. Smith paid $3.50 today. He left.",
         ["Mr.", "Smith", "paid", "$", "3.50", "today", ".", "He", "left", "."]),
        # Opening and closing double quotes become `` and ''.
        ('"Quoted," she said.', ["``", "Quoted", ",", "''", "she", "said", "."]),
        ("no punctuation here", ["no", "punctuation", "here"]),
        ("", []),
    ],
)
def test_word_tokenize_matches_nltk_procedure(text, expected):
    assert word_tokenize(text) == expected


def test_sentence_split_is_what_detaches_mid_text_periods():
    from nltk.tokenize import NLTKWordTokenizer

    text = "It rained today. We stayed in."
    # Without the sentence split the Treebank tokenizer leaves "today." whole...
    assert "today." in NLTKWordTokenizer().tokenize(text)
    # ...word_tokenize splits sentences first, as nltk.word_tokenize does.
    assert word_tokenize(text) == ["It", "rained", "today", ".", "We", "stayed", "in", "."]


# --------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed():
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths (no brevity penalty)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    got = bleu("the cat sat on the mat", "the cat sat on a mat")
    assert got == pytest.approx(expected, rel=1e-12)
    # lower-cased before tokenising
    assert bleu("The Cat sat on the MAT", "the cat SAT on a mat") == pytest.approx(expected, rel=1e-12)


def test_bleu_edge_cases():
    assert bleu("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert bleu("a b c d e", "") == 0.0
    # no 4-gram overlap: nltk (unsmoothed) gives a tiny positive number, never an error
    assert 0.0 <= bleu("one two three four five", "one two six seven eight") < 1e-100


# --------------------------------------------------------------------------- diff, entropy, flags


def test_distinct_ratio_and_entropy():
    assert distinct_ratio([1, 1, 2, 3]) == 0.75
    assert token_entropy([1, 1, 2, 3]) == pytest.approx(1.5)  # 1/2*1 + 2*(1/4*2)
    assert token_entropy([7] * 50) == 0.0
    assert token_entropy(list(range(8))) == pytest.approx(3.0)
    assert distinct_ratio([]) == 0.0 and token_entropy([]) == 0.0


def test_entropy_matches_reference_loop_exactly():
    rng = random.Random(0)
    for _ in range(20):
        toks = [rng.randrange(30) for _ in range(50)]
        d: dict[int, int] = {}
        for t in toks:
            d[t] = d.get(t, 0) + 1
        p = 0.0
        for t in d:  # the reference's loop, numpy log2
            p -= d[t] / len(toks) * np.log2(d[t] / len(toks))
        assert token_entropy(toks) == p


def test_flag_rule_thresholds_are_inclusive():
    f1 = [0.3, 0.29, 0.9, 0.9, float("nan")]
    bl = [0.01, 0.5, 0.0099, 0.01, 0.5]
    assert flag_rule(f1, bl, 0.3, 0.01).tolist() == [1, 0, 0, 1, 0]
    assert flag_rule(f1, bl).dtype == np.int64


# --------------------------------------------------------------------------- MA


def test_ma_from_logits_and_preds_no_padding():
    x = torch.tensor([[5, 6, 7, 8, 9]])
    preds = torch.tensor([[6, 0, 8, 9, 1]])  # predicts x1, -, x3, x4
    assert memorization_accuracy(preds, x).tolist() == [0.75]
    logits = torch.nn.functional.one_hot(preds, 12).float()
    assert memorization_accuracy(logits, x).tolist() == [0.75]
    # target length 3 scores x1, x2 only
    assert memorization_accuracy(preds, x, target_length=3).tolist() == [0.5]


def test_ma_padding_definition():
    # left padding of 2: positions 0,1 pad. Counted: i with x_i real and a real token before i,
    # so i = 3, 4, 5 (x_2 is real but its context is all padding)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert ma_positions(mask, 6).tolist() == [[False, False, True, True, True]]
    x = torch.tensor([[0, 0, 3, 4, 5, 6]])
    # preds[j] predicts x_{j+1}: the right guess of x_2 from padding alone does not count
    preds = torch.tensor([[9, 3, 4, 0, 6, 0]])
    assert memorization_accuracy(preds, x, mask).tolist() == [2 / 3]
    # nothing countable -> NaN
    assert math.isnan(float(memorization_accuracy(preds, x, torch.tensor([[0, 0, 0, 0, 0, 1]]))[0]))


def test_ma_tie_goes_to_first_maximum():
    logits = torch.zeros(1, 2, 5)
    logits[0, 0, [1, 3]] = 1.0  # tie between ids 1 and 3 -> 1
    assert memorization_accuracy(logits, torch.tensor([[0, 1]])).tolist() == [1.0]
    assert memorization_accuracy(logits, torch.tensor([[0, 3]])).tolist() == [0.0]


# --------------------------------------------------------------------------- n-grams, EL


def _ref_fraction(g: list[int], label: list[int], n: int) -> float:
    """The reference's loop: tuples, the label's n-grams as a set, divide by their count."""
    lab = [tuple(label[j : j + n]) for j in range(len(label) - n + 1)]
    if not lab:
        return float("nan")
    unique = set(lab)
    hits = [t for t in (tuple(g[j : j + n]) for j in range(len(g) - n + 1)) if t in unique]
    return len(hits) / len(lab)


def test_ngram_match_fraction_hand_example():
    g = torch.tensor([[1, 2, 3, 1, 2]])
    lab = torch.tensor([[1, 2, 3, 4, 5]])
    # bigrams of g: (1,2) (2,3) (3,1) (1,2): three hits, repeats count; 4 label bigrams
    assert ngram_match_fraction(g, lab, 2).tolist() == [0.75]
    assert ngram_match_fraction(g, lab, 5).tolist() == [0.0]
    assert math.isnan(ngram_match_fraction(g, lab, 6)[0])
    # lengths cut rows: only the first 3 tokens are real
    assert ngram_match_fraction(g, lab, 2, lengths=torch.tensor([3])).tolist() == [1.0]


def test_ngram_match_fraction_matches_tuple_loop():
    rng = random.Random(1)
    rows_g, rows_l, lens = [], [], []
    for _ in range(60):
        m = rng.randrange(1, 13)
        vocab = rng.choice([2, 3, 6])
        rows_g.append([rng.randrange(vocab) for _ in range(12)])
        rows_l.append([rng.randrange(vocab) for _ in range(12)])
        lens.append(m)
    g, lab, L = torch.tensor(rows_g), torch.tensor(rows_l), torch.tensor(lens)
    for n in (1, 2, 3, 5):
        got = ngram_match_fraction(g, lab, n, lengths=L).tolist()
        want = [_ref_fraction(rows_g[r][: lens[r]], rows_l[r][: lens[r]], n) for r in range(60)]
        for a, b in zip(got, want):
            assert (math.isnan(a) and math.isnan(b)) or a == b


def test_extraction_likelihood_matches_reference_loop_and_denominator():
    rng = random.Random(2)
    T, start, B = 20, 10, 3
    K = T - start
    x = torch.tensor([[rng.randrange(4) for _ in range(T)] for _ in range(B)])
    G = torch.tensor([[[rng.randrange(4) for _ in range(K)] for _ in range(K)] for _ in range(B)])
    mask = torch.ones(B, T, dtype=torch.long)
    got = extraction_likelihood(G, x, mask, T, (1, 3), start)
    for n in (1, 3):
        for b in range(B):
            total = 0.0
            for i in reversed(range(start, T)):
                f = _ref_fraction(G[b, i - start, : T - i].tolist(), x[b, i:T].tolist(), n)
                if not math.isnan(f):
                    total += f
            assert float(got[n][b]) == pytest.approx(total / (T - start - (n - 1)), abs=1e-12)


def test_el_prefixes_with_padding():
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    # start 2: prefixes i = 2..5; sample 0 has no real context before i = 4
    assert el_prefixes(mask, 6, 2).tolist() == [[False, False, True, True], [True, True, True, True]]


def test_check_lengths_errors():
    check_lengths(200, 200, (10,))
    with pytest.raises(IcuError, match="longer than the encoded data"):
        check_lengths(200, 201)
    with pytest.raises(IcuError, match="EL_60"):
        check_lengths(200, 200, (60,))
    with pytest.raises(IcuError, match="EL_10"):
        check_lengths(200, 150, (10,))
    with pytest.raises(IcuError, match="positive"):
        check_lengths(200, 200, (0,))


# --------------------------------------------------------------------------- BERTScore


def test_bertscorer_cached_and_scores():
    a = get_bertscorer("builtin:all-MiniLM-L6-v2", "cpu")
    assert get_bertscorer("builtin:all-MiniLM-L6-v2", torch.device("cpu")) is a
    P, R, F = a.score(
        ["the cat sat on the mat", "", "completely unrelated words here"],
        ["the cat sat on the mat", "a reference", "the cat sat on the mat"],
    )
    assert F[0] == pytest.approx(1.0, abs=1e-5) and P[0] == pytest.approx(1.0, abs=1e-5)
    assert (P[1], R[1], F[1]) == (0.0, 0.0, 0.0)  # empty candidate: bert-score's zeros
    assert F[2] < F[0]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in (P, R, F))
