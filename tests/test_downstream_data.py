"""Where downstream task rows come from: local files in every format, schemas, the hub."""

from __future__ import annotations

import json
import os
import time

import pytest

from icu.downstream import (
    TASK_NAMES,
    HubSource,
    LocalSource,
    load_task,
    load_tasks,
    parse_assignments,
    parse_hub_spec,
    parse_limits,
    parse_task_list,
    resolve_sources,
)
from icu.downstream.tasks import ChoiceExample, DialogExample, LambadaExample
from icu.errors import IcuError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "downstream")
HUB_SCHEMA = os.path.join(FIXTURES, "hub")
SHARED_TASKS = ["lambada", "piqa", "copa", "pubmed_qa", "wikitext", "pile", "wizard_of_wikipedia",
                "empathetic_dialogues", "blended_skill_talk", "wizard_of_internet"]


def test_fixture_folder_provides_all_15_tasks():
    sources = resolve_sources(list(TASK_NAMES), FIXTURES)
    assert all(isinstance(s, LocalSource) for s in sources.values())
    assert sources["piqa"].path.endswith(os.path.join("piqa", "dev.jsonl"))
    assert sources["copa"].path.endswith(os.path.join("copa", "val.jsonl"))
    datas = load_tasks(sources)
    golds = {n: [e.gold for e in d.examples] for n, d in datas.items() if d.task.family == "choice"}
    assert golds == {
        "hellaswag": [0, 2, 3], "winogrande": [0, 1, 1], "copa": [0, 1, 0], "arc_easy": [0, 1, 2],
        "arc_challenge": [1, 2, 0], "piqa": [0, 1, 0], "math_qa": [1, 4, 0], "pubmed_qa": [0, 2, 1],
    }
    assert datas["lambada"].examples[0] == LambadaExample(
        "The old lighthouse keeper climbed the stairs every night to light the lamp. When the storm "
        "came, the ships found the harbor because of the", " lighthouse")
    wow = datas["wizard_of_wikipedia"]
    assert len(wow.examples) == 2 and wow.skipped == 1  # the one-turn dialog makes no example
    assert wow.examples[1] == DialogExample(
        "User 1: Do you know much about jazz?\nUser 2: Jazz started in New Orleans in the early "
        "twentieth century.\nUser 1:", "Who was one of the first famous jazz musicians?")
    assert len(datas["pile"].examples) == 4 and "def add(a, b):" in datas["pile"].examples[1]
    # the reference's pubmed_qa.csv: the abstract column, never the stringified context
    assert datas["pubmed_qa"].examples[0].context.startswith("Context: We enrolled 120 adults")
    assert datas["math_qa"].examples[2].choices == (" 12", " 8", " 10", " 14", " 16")


def test_hub_schema_files_load_too():
    pubmed = load_task("pubmed_qa", LocalSource(os.path.join(HUB_SCHEMA, "pubmed_qa.jsonl")))
    assert pubmed.examples[0].context == (
        "Context: Ten schools took part in a winter trial. Pupils in half of the schools washed hands "
        "five times a day and had fewer sick days.\nQuestion: Does hand washing reduce colds in "
        "schoolchildren?\nAnswer:")
    assert [e.gold for e in pubmed.examples] == [0, 2]
    piqa = load_task("piqa", LocalSource(os.path.join(HUB_SCHEMA, "piqa.jsonl")))
    assert [e.gold for e in piqa.examples] == [0, 1]
    lam = load_task("lambada", LocalSource(os.path.join(HUB_SCHEMA, "lambada.jsonl")))
    assert lam.examples[1].target == " pizza"


def test_csv_parquet_json_forms_of_one_table_agree(tmp_path):
    import pandas as pd  # to_parquet needs pyarrow, which datasets (requirements.txt) installs
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "hellaswag.jsonl"))]
    expected = load_task("hellaswag", LocalSource(os.path.join(FIXTURES, "hellaswag.jsonl"))).examples
    pd.DataFrame(rows).to_parquet(tmp_path / "h.parquet")
    pd.DataFrame(rows).assign(endings=[json.dumps(r["endings"]) for r in rows]).to_csv(tmp_path / "h.csv", index=False)
    (tmp_path / "h.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_json(tmp_path / "cols.json")  # column-oriented, as pandas writes it
    arc = [json.loads(line) for line in open(os.path.join(FIXTURES, "arc_easy.jsonl"))]
    pd.DataFrame(arc).to_parquet(tmp_path / "arc.parquet")  # a struct column
    for name in ("h.parquet", "h.csv", "h.json", "cols.json"):
        assert load_task("hellaswag", LocalSource(str(tmp_path / name))).examples == expected, name
    arc_expected = load_task("arc_easy", LocalSource(os.path.join(FIXTURES, "arc_easy.jsonl"))).examples
    assert load_task("arc_easy", LocalSource(str(tmp_path / "arc.parquet"))).examples == arc_expected


def test_limit_caps_rows():
    data = load_task("copa", LocalSource(os.path.join(FIXTURES, "copa", "val.jsonl")), limit=2)
    assert len(data.examples) == 2
    assert isinstance(data.examples[0], ChoiceExample)


def test_per_task_limits():
    """--limit 2,copa=1: copa gets 1 row, every other task 2; a task named alone caps only it."""
    assert parse_limits("2,copa=1") == {None: 2, "copa": 1}
    assert parse_limits(None) == {} and parse_limits("wikitext=1") == {"wikitext": 1}
    sources = resolve_sources(["copa", "piqa", "wikitext"], FIXTURES, {}, {})
    full = load_tasks(sources)
    capped = load_tasks(sources, limit=parse_limits("2,copa=1"))
    assert {k: len(v.examples) for k, v in capped.items()} == {"copa": 1, "piqa": 2, "wikitext": 2}
    only = load_tasks(sources, limit=parse_limits("copa=1"))
    assert len(only["copa"].examples) == 1 and len(only["piqa"].examples) == len(full["piqa"].examples) > 2
    assert capped["piqa"].examples == full["piqa"].examples[:2]  # the first rows, in file order
    for bad in ("0", "copa=x", "=3", "copa=-1"):
        with pytest.raises(IcuError, match="expects N or TASK=N"):
            parse_limits(bad)
    with pytest.raises(IcuError, match="piqq"):
        parse_limits("piqq=3")


def test_missing_columns_are_named(tmp_path):
    bad = tmp_path / "piqa.jsonl"
    bad.write_text(json.dumps({"goal": "g", "sol1": "a"}) + "\n")
    with pytest.raises(IcuError) as err:
        load_task("piqa", LocalSource(str(bad)))
    message = str(err.value)
    assert "'sol2'" in message and "'label'" in message and "-labels.lst" in message
    assert "'goal'" not in message.split("found:")[0]
    pub = tmp_path / "pub.csv"
    pub.write_text("pubid,question\n1,q\n")
    with pytest.raises(IcuError, match="'final_decision', 'abstract' or 'context'"):
        load_task("pubmed_qa", LocalSource(str(pub)))


def test_labels_file_must_match_rows(tmp_path):
    (tmp_path / "dev.jsonl").write_text(open(os.path.join(FIXTURES, "piqa", "dev.jsonl")).read())
    (tmp_path / "dev-labels.lst").write_text("0\n1\n")
    with pytest.raises(IcuError, match="2 labels for 3 rows"):
        load_task("piqa", LocalSource(str(tmp_path / "dev.jsonl")))


def test_bad_row_names_row_and_source(tmp_path):
    path = tmp_path / "copa.jsonl"
    path.write_text(json.dumps({"premise": "p", "choice1": "a", "choice2": "b", "label": 7}) + "\n")
    with pytest.raises(IcuError, match=r"row 0 of .*copa.jsonl: label 7 is out of range"):
        load_task("copa", LocalSource(str(path)))


def test_unreadable_and_unsupported_files(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(IcuError, match="unsupported file type"):
        load_task("pile", LocalSource(str(tmp_path / "x.txt")))
    (tmp_path / "x.jsonl").write_text("{not json\n")
    with pytest.raises(IcuError, match="cannot read it as jsonl"):
        load_task("pile", LocalSource(str(tmp_path / "x.jsonl")))


def test_task_names_and_assignments():
    assert parse_task_list(None) == list(TASK_NAMES)
    assert parse_task_list("pile, lambada") == ["lambada", "pile"]  # suite order
    with pytest.raises(IcuError) as err:
        parse_task_list("lambada,hellaswagg")
    assert "hellaswagg" in str(err.value) and "known tasks: lambada, hellaswag" in str(err.value)
    assert parse_assignments(["piqa=a/b.jsonl"], "--task_file") == {"piqa": "a/b.jsonl"}
    with pytest.raises(IcuError, match="TASK=VALUE"):
        parse_assignments(["piqa"], "--task_file")
    with pytest.raises(IcuError, match="unknown task 'piqaa' in --task_file"):
        parse_assignments(["piqaa=x"], "--task_file")


def test_hub_spec_and_precedence(tmp_path):
    assert parse_hub_spec("org/ds:cfg@train[:10]#refs/convert/parquet") == HubSource(
        "org/ds", "cfg", "train[:10]", "refs/convert/parquet")
    assert parse_hub_spec("org/ds", "test") == HubSource("org/ds", None, "test", None)
    sources = resolve_sources(
        ["lambada", "piqa", "copa", "hellaswag"], FIXTURES,
        task_files={"lambada": os.path.join(HUB_SCHEMA, "lambada.jsonl")},
        task_hubs={"piqa": "someone/piqa"},
    )
    assert sources["lambada"].path.endswith(os.path.join("hub", "lambada.jsonl"))
    assert sources["piqa"] == HubSource("someone/piqa", None, "validation")
    assert isinstance(sources["copa"], LocalSource)
    assert isinstance(resolve_sources(["hellaswag"], str(tmp_path))["hellaswag"], HubSource)
    with pytest.raises(IcuError, match="task pile has no hub source.*--task_file pile=PATH"):
        resolve_sources(["pile"], str(tmp_path))
    with pytest.raises(IcuError, match="file not found"):
        resolve_sources(["piqa"], None, task_files={"piqa": str(tmp_path / "nope.jsonl")})


def test_unreachable_hub_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(IcuError) as err:
        load_task("hellaswag", HubSource("Rowan/hellaswag", None, "validation"), cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "not reachable" in message and "Rowan/hellaswag@validation" in message
    assert "--task_file hellaswag=PATH" in message and "ctx, endings, label" in message


def test_shared_validation_files_load_as_they_are(shared_dir):
    data_dir = os.path.join(shared_dir, "data", "validation")
    if not os.path.isdir(data_dir):
        pytest.skip(f"{data_dir} not found")
    datas = load_tasks(resolve_sources(SHARED_TASKS, data_dir))
    counts = {n: len(d.examples) for n, d in datas.items()}
    assert counts["lambada"] == 4992 and counts["piqa"] == 1838 and counts["copa"] == 100
    assert counts["pubmed_qa"] == 500 and counts["pile"] == 1500 and counts["wikitext"] == 500
    assert min(counts[n] for n in SHARED_TASKS[6:]) > 100
    assert {e.gold for e in datas["piqa"].examples} == {0, 1}
    assert {e.gold for e in datas["pubmed_qa"].examples} == {0, 1, 2}
