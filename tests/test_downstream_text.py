"""Prompt pieces of the downstream suite: pure string functions, no model."""

from __future__ import annotations

import pytest

from icu.downstream.tasks import TASKS, as_structure
from icu.downstream.text import (
    cut_reply,
    dialog_prompt,
    normalize_answer,
    normalize_turn,
    parse_math_qa_options,
    split_lambada,
    split_winogrande,
    token_f1,
)


def test_token_f1_ignores_case_punctuation_and_articles():
    assert token_f1("The Cat sat!", "a cat sat") == 1.0
    assert token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("", "") == 1.0
    assert token_f1("", "word") == 0.0
    assert token_f1("dog", "cat") == 0.0
    assert normalize_answer("  An  Apple, the pie. ") == "apple pie"


@pytest.mark.parametrize(
    "raw, tidy",
    [
        ("hello there", "Hello there."),
        ("i 'm fine , thanks !", "I'm fine, thanks!"),
        ("Yes red is primary colour.What about pink", "Yes red is primary colour. What about pink."),
        ("nice colour .my daughter likes it", "Nice colour. My daughter likes it."),
        ("we met in the U.S. in 2010", "We met in the U.S. in 2010."),
        ("is it 3.5 km ?", "Is it 3.5 km?"),
        ("  spaced\n  out  ", "Spaced out."),
        ("he said \"go\"", "He said \"go\""),
    ],
)
def test_normalize_turn(raw, tidy):
    assert normalize_turn(raw) == tidy


def test_dialog_prompt_alternates_speakers_and_ends_with_the_next_tag():
    prompt, reply = dialog_prompt(["hi", "hello !", "how are you", "fine"])
    assert prompt == "User 1: Hi.\nUser 2: Hello!\nUser 1: How are you.\nUser 2:"
    assert reply == "Fine."
    prompt, reply = dialog_prompt(["a b", "c d", "e f"])
    assert prompt.endswith("\nUser 1:") and reply == "E f."
    assert dialog_prompt(["only one turn"]) is None
    assert dialog_prompt(["  ", "one"]) is None


def test_cut_reply_stops_at_the_next_speaker():
    assert cut_reply(" Sure, see you then.\nUser 1: bye") == "Sure, see you then."
    assert cut_reply(" no tag here ") == "no tag here"


def test_winogrande_split():
    ctx, choices = split_winogrande("The trophy did not fit because the _ was small.", "trophy", "case")
    assert ctx == "The trophy did not fit because the"
    assert choices == [" trophy was small.", " case was small."]
    ctx, choices = split_winogrande("_ was late again.", "Ann", "Bob")
    assert ctx == "" and choices == [" Ann was late again.", " Bob was late again."]
    with pytest.raises(ValueError):
        split_winogrande("no blank", "a", "b")


def test_math_qa_options_formats():
    assert parse_math_qa_options("a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these") == [
        "38", "27.675", "30", "data inadequate", "none of these"]
    assert parse_math_qa_options("['a ) rs . 400', 'b ) rs . 300', 'c ) 5', 'd ) 6', 'e ) 7']") == [
        "rs . 400", "rs . 300", "5", "6", "7"]
    assert parse_math_qa_options("a ) 1,200 , b ) 2 , c ) 3 , d ) 4 , e ) 5")[0] == "1,200"
    with pytest.raises(ValueError, match="'e \\)'"):
        parse_math_qa_options("a ) 1 , b ) 2 , c ) 3 , d ) 4")


def test_lambada_split():
    assert split_lambada("he lit the candle ") == ("he lit the", " candle")
    with pytest.raises(ValueError):
        split_lambada("single")


def test_as_structure_reads_csv_and_parquet_forms():
    import numpy as np
    assert as_structure('["a", "b"]') == ["a", "b"]
    assert as_structure("{'text': ['x'], 'label': ['A']}") == {"text": ["x"], "label": ["A"]}
    assert as_structure({"text": np.array(["x", "y"], dtype=object)}) == {"text": ["x", "y"]}
    # a string inside a list is data, never re-parsed
    assert as_structure(["[title] starts with a bracket"]) == ["[title] starts with a bracket"]


@pytest.mark.parametrize(
    "name, row, context, choices, gold",
    [
        ("piqa", {"goal": "G", "sol1": "a", "sol2": "b", "label": "1"}, "G", (" a", " b"), 1),
        ("hellaswag", {"ctx": "C", "endings": '["x", "y", "z", "w"]', "label": "2"}, "C",
         (" x", " y", " z", " w"), 2),
        ("winogrande", {"sentence": "A or _ won.", "option1": "Ann", "option2": "Bob", "answer": "2"},
         "A or", (" Ann won.", " Bob won."), 1),
        ("copa", {"premise": "P", "choice1": "c1", "choice2": "c2", "label": 0}, "P", (" c1", " c2"), 0),
        ("arc_easy", {"question": "Q", "choices": {"text": ["t1", "t2"], "label": ["1", "2"]},
                      "answerKey": "2"}, "Q", (" t1", " t2"), 1),
        ("math_qa", {"Problem": "P", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "d"},
         "P", (" 1", " 2", " 3", " 4", " 5"), 3),
        ("pubmed_qa", {"question": "Q?", "abstract": "A.", "final_decision": "maybe"},
         "Context: A.\nQuestion: Q?\nAnswer:", (" yes", " maybe", " no"), 1),
        ("pubmed_qa", {"question": "Q?", "context": {"contexts": ["A.", "B."]}, "final_decision": "no"},
         "Context: A. B.\nQuestion: Q?\nAnswer:", (" yes", " maybe", " no"), 2),
    ],
)
def test_choice_prompts_follow_the_spec(name, row, context, choices, gold):
    example = TASKS[name].build(row)
    assert (example.context, example.choices, example.gold) == (context, choices, gold)


@pytest.mark.parametrize(
    "name, row, message",
    [
        ("piqa", {"goal": "G", "sol1": "a", "sol2": "b", "label": "2"}, "out of range"),
        ("winogrande", {"sentence": "A _.", "option1": "a", "option2": "b", "answer": ""}, "not an integer"),
        ("arc_easy", {"question": "Q", "choices": {"text": ["t"], "label": ["A"]}, "answerKey": "B"},
         "answerKey"),
        ("math_qa", {"Problem": "P", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "f"},
         "correct"),
        ("pubmed_qa", {"question": "Q", "abstract": "A", "final_decision": "perhaps"}, "final_decision"),
    ],
)
def test_bad_rows_say_what_is_wrong(name, row, message):
    with pytest.raises(ValueError, match=message):
        TASKS[name].build(row)
