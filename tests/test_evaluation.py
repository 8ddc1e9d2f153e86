"""Tests for evaluation/: convert, prompt parsing, and judging against a real local HTTP server.

The judge is exercised end to end: the real ``openai`` client in a subprocess
(``python -m evaluation.api`` / ``python evaluation/api.py``) talks over HTTP to the scripted
server in ``tests/fake_openai_server.py``, so retries, resume and error handling are tested
the way a researcher would hit them.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluation import apikey, convert, estimate, judge  # noqa: E402
from evaluation.prompt import SYSTEM_PROMPT, build_messages, parse_score  # noqa: E402
from fake_openai_server import FakeOpenAIServer, Reply, error_reply  # noqa: E402

SECRET = "sk-test-Zq8-DO-NOT-LEAK-4711"
TAG_RE = re.compile(r"\[(\w+)#(\d+)\]")
FAST = ["--retry_base_delay", "0.01", "--retry_max_delay", "0.05", "--timeout", "10", "--no_progress"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def write_run(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols = ["id", "prefix", "reference", "candidate", "bleu", "P", "R", "F1", "diff", "entropy"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({"bleu": 0.1, "P": 0.5, "R": 0.5, "F1": 0.5, "diff": 0.0, "entropy": 3.2, **r})
    return path


def make_results(tmp: Path, n_targets: int = 3, policies: tuple[str, ...] = ("original", "ours")) -> Path:
    """eval.py-like runs whose candidates carry a [policy#id] tag the fake server can read."""
    args = []
    for p in policies:
        rows = [
            {
                "id": 100 + i,
                "prefix": f"Document {i} begins with a sentence,",
                "reference": f" and goes on with secret detail number {i}.",
                "candidate": f" then something else [{p}#{100 + i}]<|endoftext|><|endoftext|>",
            }
            for i in range(n_targets)
        ]
        args.append((p, write_run(tmp / f"{p}.csv", rows)))
    out = tmp / "results.json"
    convert.write_json_atomic(convert.convert(args), out)
    return out


def tag_of(body: dict[str, Any]) -> tuple[str, int]:
    m = TAG_RE.search(body["messages"][-1]["content"])
    assert m, "request without a candidate tag"
    return m.group(1), int(m.group(2))


def fail_one(tag: tuple[str, int], error: Reply, content: str) -> Any:
    """A responder that answers ``error`` for the pair ``tag`` and ``content`` for every other."""
    return lambda body: error if tag_of(body) == tag else Reply(content=content)


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, script: bool = False,
            drop_key: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    if not drop_key:
        env["OPENAI_API_KEY"] = SECRET
    env.update(env_extra or {})
    cmd = [sys.executable, "evaluation/api.py"] if script else [sys.executable, "-m", "evaluation.api"]
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def assert_no_secret(tmp: Path, *texts: str) -> None:
    for t in texts:
        assert SECRET not in t
    for f in tmp.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"key leaked into {f}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# prompt + parsing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Good continuation.\nFinal score: 7", 7.0),
        ("Final Score: 7/10", 7.0),
        ("final score: 7.5", 7.5),
        ("**Final score:** 8", 8.0),
        ("Final score - 6 out of 10", 6.0),
        ("Final score: 2\n...on reflection...\nFinal score: 9", 9.0),  # the last one counts
        ("final score = 10", 10.0),
        ("Final score: 0", 0.0),
    ],
)
def test_parse_score_accepts(reply: str, expected: float) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    "reply",
    ["", None, "I would give it a seven.", "Final score: X", "Final score: 11", "Final score: -2",
     "Final score: 70/100", "Score: 7"],
)
def test_parse_score_rejects(reply: str | None) -> None:
    assert parse_score(reply) is None


def test_prompt_has_task_examples_and_format() -> None:
    assert SYSTEM_PROMPT.count("Final score:") >= 4  # three examples + the required format
    assert SYSTEM_PROMPT.count("Example ") == 3
    # The examples themselves must parse to the scores they teach.
    scores = [float(s) for s in re.findall(r"Final score: (\d+)", SYSTEM_PROMPT)]
    assert scores[:3] == [1, 9, 2]
    msgs = build_messages("PFX", "REF", "CAND")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert all(x in msgs[1]["content"] for x in ("PFX", "REF", "CAND"))


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, clean",
    [
        (" a b<|endoftext|>", " a b"),
        (" a b<|endoftext|><|endoftext|><|endoftext|>", " a b"),
        ("<|endoftext|><|endoftext|> a b<|endoftext|> junk", " a b"),
        (" no marker", " no marker"),
        ("<|endoftext|>", ""),
    ],
)
def test_clean_candidate(raw: str, clean: str) -> None:
    assert convert.clean_candidate(raw) == clean


def test_convert_cli_aligns_by_id_and_strips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"id": 2, "prefix": "P2", "reference": " R2", "candidate": " c2<|endoftext|><|endoftext|>"},
        {"id": 1, "prefix": "<|endoftext|>P1", "reference": " R1", "candidate": " c1"},
    ]
    a = write_run(tmp_path / "a.csv", rows)
    b = write_run(tmp_path / "b.csv", [dict(r, candidate=" other " + str(r["id"])) for r in reversed(rows)])
    out = tmp_path / "r.json"
    assert convert.main(["--policy", f"orig={a}", f"ours={b}", "--out", str(out)]) == 0
    data = convert.load_results(out)
    assert data["policies"] == ["orig", "ours"]
    assert [t["id"] for t in data["targets"]] == [1, 2]
    t1, t2 = data["targets"]
    assert t1["prefix"] == "P1" and t1["candidates"] == {"orig": " c1", "ours": " other 1"}
    assert t2["candidates"]["orig"] == " c2"


def test_convert_rejects_different_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a.csv", [{"id": i, "prefix": "p", "reference": "r", "candidate": "c"} for i in (1, 2)])
    b = write_run(tmp_path / "b.csv", [{"id": i, "prefix": "p", "reference": "r", "candidate": "c"} for i in (1, 3)])
    assert convert.main(["--policy", f"x={a}", "--policy", f"y={b}", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different targets" in err and "2" in err and "3" in err
    assert not (tmp_path / "o.json").exists()


def test_convert_rejects_same_id_different_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a.csv", [{"id": 5, "prefix": "p", "reference": "r1", "candidate": "c"}])
    b = write_run(tmp_path / "b.csv", [{"id": 5, "prefix": "p", "reference": "r2", "candidate": "c"}])
    assert convert.main(["--policy", f"x={a}", f"y={b}", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "reference of target 5" in err


def test_convert_rejects_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prefix,candidate\n1,a,b\n")
    assert convert.main(["--policy", f"x={bad}"]) == 2
    assert "missing column(s) reference" in capsys.readouterr().err
    assert convert.main(["--policy", "no_equals_sign"]) == 2


# --------------------------------------------------------------------------------------------
# judging over HTTP
# --------------------------------------------------------------------------------------------
def test_retries_parsing_summary_and_no_key_leak(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=3)
    attempts: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Reply:
        tag = tag_of(body)
        with lock:
            attempts[tag] += 1
            n = attempts[tag]
        if tag == ("ours", 100) and n == 1:
            return error_reply(429, "slow down", **{"Retry-After": "0"})
        if tag == ("ours", 101) and n <= 2:
            return error_reply(500, "boom")
        if tag == ("original", 102):
            return Reply(content="This is close to the reference, I would say fairly low.")
        score = {"original": 2, "ours": 8}[tag[0]]
        return Reply(content=f"Reasoning here.\nFinal Score: {score}/10", prompt_tokens=50, completion_tokens=7)

    with FakeOpenAIServer(responder) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--max_retries", "3",
                        "--concurrency", "2", *FAST])
        reqs = srv.snapshot()
    assert proc.returncode == 0, proc.stderr
    # Retries happened server-side: 1 + 1 for the 429, 1 + 2 for the 500s, 1 for the rest.
    assert attempts[("ours", 100)] == 2 and attempts[("ours", 101)] == 3
    assert sum(attempts.values()) == 6 + 3
    assert all(r.authorization == f"Bearer {SECRET}" for r in reqs)  # the key was really used
    assert all(r.body["model"] == "gpt-4-turbo" for r in reqs)

    cache = read_jsonl(tmp_path / "judgments.jsonl")
    assert len(cache) == 6
    bad = [r for r in cache if not r["parsed"]]
    assert [(r["policy"], r["id"], r["score"]) for r in bad] == [("original", 102, None)]
    retried = {(r["policy"], r["id"]): r["attempts"] for r in cache}
    assert retried[("ours", 100)] == 2 and retried[("ours", 101)] == 3

    with (tmp_path / "judge_summary.csv").open() as fh:
        summary = {row["policy"]: row for row in csv.DictReader(fh)}
    assert list(summary) == ["original", "ours"]
    assert float(summary["original"]["mean_score"]) == 2.0
    assert (summary["original"]["n_scored"], summary["original"]["n_unparsable"]) == ("2", "1")
    assert float(summary["ours"]["mean_score"]) == 8.0 and summary["ours"]["n_unparsable"] == "0"
    assert summary["ours"]["prompt_tokens"] == "150" and summary["ours"]["completion_tokens"] == "21"
    assert "prompt 350, completion 55" in proc.stdout  # 5 x (50, 7) + the default (100, 20)
    assert_no_secret(tmp_path, proc.stdout, proc.stderr)


def test_resume_after_kill_judges_each_pair_once(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=4)  # 8 pairs
    answered_before_kill = 3
    hang = threading.Event()
    seen = Counter()
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Reply:
        with lock:
            seen["n"] += 1
            n = seen["n"]
        if n == answered_before_kill + 1:
            # The 4th request never gets an answer: the client is killed while waiting on it.
            return Reply(hang=hang, drop=True)
        return Reply(content="Fluent and different.\nFinal score: 7")

    cache = tmp_path / "judgments.jsonl"
    env = {"MY_JUDGE_KEY": SECRET}
    with FakeOpenAIServer(responder) as srv:
        args = ["--results", str(results), "--base_url", srv.base_url, "--api_key_env", "MY_JUDGE_KEY",
                "--concurrency", "1", *FAST]
        penv = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        penv.update(env)
        proc = subprocess.Popen([sys.executable, "-m", "evaluation.api", *args], cwd=ROOT, env=penv,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(srv.snapshot()) <= answered_before_kill and time.monotonic() < deadline:
            time.sleep(0.02)
        # Answer 3 is written by the main thread while the worker already sends request 4;
        # wait until it is durable so the kill lands at a well-defined point.
        while len(read_jsonl(cache)) < answered_before_kill and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # as hard as a crash: no cleanup code runs
        out1, err1 = proc.communicate(timeout=30)
        hang.set()
        assert len(read_jsonl(cache)) == answered_before_kill
        # Simulate the worst case of a kill during a write: a torn, newline-less last line.
        with cache.open("ab") as fh:
            fh.write(b'{"id": 103, "policy": "ours", "fingerp')

        # Resume, this time through the script form of the CLI.
        proc2 = run_cli(args, env_extra=env, script=True, drop_key=True)
        reqs = srv.snapshot()
    assert proc2.returncode == 0, proc2.stderr
    assert "unreadable line" in proc2.stderr
    answered = Counter(tag_of(r.body) for r in reqs if r.status == 200)
    assert len(answered) == 8 and set(answered.values()) == {1}, answered  # nobody judged twice
    records = read_jsonl(cache)
    assert len(records) == 8 and len({(r["id"], r["policy"]) for r in records}) == 8
    assert "judged 5 new pair(s), 3 already cached" in proc2.stdout

    # A third run has nothing to do and makes no request at all.
    with FakeOpenAIServer(lambda b: error_reply(500)) as srv3:
        proc3 = run_cli(["--results", str(results), "--base_url", srv3.base_url, *FAST], drop_key=True)
        assert proc3.returncode == 0, proc3.stderr
        assert srv3.snapshot() == []
    assert_no_secret(tmp_path, out1, err1, proc2.stdout, proc2.stderr, proc3.stdout, proc3.stderr)


def test_ctrl_c_keeps_in_flight_answer_and_exits_130(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=2)  # 4 pairs
    hang = threading.Event()
    count = Counter()
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Reply:
        with lock:
            count["n"] += 1
            n = count["n"]
        # The 2nd request is still in flight when Ctrl-C arrives; its answer must be kept.
        return Reply(content="Final score: 6", hang=hang if n == 2 else None)

    cache = tmp_path / "judgments.jsonl"
    with FakeOpenAIServer(responder) as srv:
        penv = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        penv["OPENAI_API_KEY"] = SECRET
        proc = subprocess.Popen(
            [sys.executable, "-m", "evaluation.api", "--results", str(results), "--base_url", srv.base_url,
             "--concurrency", "1", *FAST],
            cwd=ROOT, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # a shell's background job starts with SIGINT ignored and Python keeps it ignored:
            # give the child the default a user's Ctrl-C meets in a terminal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 30
        while len(srv.snapshot()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        hang.set()
        out, err = proc.communicate(timeout=30)
        reqs = srv.snapshot()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun to resume" in err
    # Normally exactly 2 requests; a third can slip out only if the machine is so slow that
    # Ctrl-C is handled after the release. Either way, no new work is queued after Ctrl-C...
    assert 2 <= len(reqs) <= 3
    # ...and every answer the server delivered (the in-flight one included) is in the cache.
    assert len(read_jsonl(cache)) == sum(r.status == 200 for r in reqs) >= 2


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    results = convert.load_results(make_results(tmp_path, n_targets=4))

    def responder(body: dict[str, Any]) -> Reply:
        time.sleep(0.05)
        return Reply(content="Final score: 5")

    os.environ["ICU_TEST_KEY"] = SECRET
    try:
        with FakeOpenAIServer(responder) as srv:
            cfg = judge.JudgeConfig(base_url=srv.base_url, api_key_env="ICU_TEST_KEY", concurrency=3)
            report = judge.judge(results, tmp_path / "c.jsonl", cfg, progress=False)
            assert srv.max_inflight == 3
    finally:
        del os.environ["ICU_TEST_KEY"]
    assert report.judged == 8 and report.summary is not None
    assert list(report.summary["mean_score"]) == [5.0, 5.0]


def test_gives_up_after_max_retries_and_keeps_answers(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=2)
    responder = fail_one(("ours", 101), error_reply(503, "overloaded"), "Final score: 4")
    with FakeOpenAIServer(responder) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--max_retries", "2",
                        "--concurrency", "1", *FAST])
        tries = Counter(tag_of(r.body) for r in srv.snapshot())
    assert proc.returncode == 1
    assert tries[("ours", 101)] == 3  # 1 try + 2 retries
    assert "HTTP 503" in proc.stderr and "rerun to resume" in proc.stderr
    assert len(read_jsonl(tmp_path / "judgments.jsonl")) == 3  # the other pairs were kept


def test_missing_key_names_the_variable(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    proc = run_cli(["--results", str(results), "--base_url", "http://127.0.0.1:9/v1", *FAST], drop_key=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "OPENAI_API_KEY" in proc.stderr
    proc = run_cli(["--results", str(results), "--api_key_env", "LOCAL_KEY", *FAST], drop_key=True)
    assert proc.returncode == 2 and "LOCAL_KEY" in proc.stderr


def test_unreachable_server_names_url_and_keeps_cache(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    cache = tmp_path / "judgments.jsonl"
    before = b'{"id": 1, "policy": "x", "fingerprint": "old", "score": 3}\n{"id": 2, "pol'
    cache.write_bytes(before)
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli(["--results", str(results), "--base_url", url, "--max_retries", "1", *FAST])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len([l for l in err if l.startswith("error:")]) == 1
    assert "cannot reach" in err[-1] and url in err[-1]
    assert cache.read_bytes() == before
    assert_no_secret(tmp_path, proc.stdout, proc.stderr)


def test_rejected_key_is_not_echoed(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    with FakeOpenAIServer(lambda b: error_reply(401, f"Incorrect API key provided: {SECRET}")) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, *FAST])
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in proc.stderr and "401" in proc.stderr
    assert_no_secret(tmp_path, proc.stdout, proc.stderr)


def test_quota_exhausted_is_not_retried(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    quota = error_reply(429, "You exceeded your current quota")
    assert quota.body is not None
    quota.body["error"]["code"] = "insufficient_quota"
    with FakeOpenAIServer(lambda b: quota) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--concurrency", "1", *FAST])
        n = len(srv.snapshot())
    assert proc.returncode == 2 and "no quota left" in proc.stderr
    assert n == 1


@pytest.mark.parametrize(
    "payload",
    [
        "not json at all",
        json.dumps({"policies": ["a"], "targets": [{"id": 1, "prefix": "p", "reference": "r"}]}),
        json.dumps([1, 2, 3]),
    ],
)
def test_bad_results_file_exits_2_and_keeps_cache(tmp_path: Path, payload: str) -> None:
    results = tmp_path / "results.json"
    results.write_text(payload)
    cache = tmp_path / "judgments.jsonl"
    before = b'{"id": 1, "policy": "a", "fingerprint": "f", "score": 3}\n{"torn'
    cache.write_bytes(before)
    proc = run_cli(["--results", str(results), "--base_url", "http://127.0.0.1:9/v1", *FAST])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0
    assert str(results) in proc.stderr
    assert cache.read_bytes() == before


# --------------------------------------------------------------------------------------------
# issue 14 item 13: refused first request, reasoning models, truncation, key masking, files
# --------------------------------------------------------------------------------------------
def test_first_request_refused_stops_at_once_and_reasoning_flag_fixes_it(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=3)  # 6 pairs
    unsupported = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                   "Use 'max_completion_tokens' instead.")

    def responder(body: dict[str, Any]) -> Reply:
        # Like OpenAI's reasoning models: max_tokens and temperature are refused with a 400.
        if "max_tokens" in body or "temperature" in body:
            return error_reply(400, unsupported)
        return Reply(content="Final score: 6")

    with FakeOpenAIServer(responder) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--concurrency", "4", *FAST])
        n_refused = len(srv.snapshot())
        left_behind = sorted(p.name for p in tmp_path.iterdir())
        ok = run_cli(["--results", str(results), "--base_url", srv.base_url, "--concurrency", "4",
                      "--reasoning_model", *FAST])
        bodies = [r.body for r in srv.snapshot()[n_refused:]]
    assert proc.returncode == 2
    assert n_refused == 1  # not one request per pair
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert unsupported in err and "HTTP 400" in err and "--reasoning_model" in err
    assert left_behind == ["original.csv", "ours.csv", "results.json"]  # no cache, no summary

    assert ok.returncode == 0, ok.stderr
    assert len(bodies) == 6
    assert all(b["max_completion_tokens"] == 4096 and "max_tokens" not in b and "temperature" not in b
               for b in bodies)
    assert len(read_jsonl(tmp_path / "judgments.jsonl")) == 6


def test_refusal_after_the_first_answer_fails_only_that_pair(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=3)
    responder = fail_one(("ours", 101), error_reply(400, "this one candidate trips a content filter"),
                         "Final score: 5")
    with FakeOpenAIServer(responder) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--concurrency", "2", *FAST])
        n = len(srv.snapshot())
    assert proc.returncode == 1 and n == 6
    assert "target 101 / ours: HTTP 400" in proc.stderr
    assert len(read_jsonl(tmp_path / "judgments.jsonl")) == 5


def test_temperature_with_reasoning_model_is_refused(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    proc = run_cli(["--results", str(results), "--reasoning_model", "--temperature", "0.5", *FAST])
    assert proc.returncode == 2 and "--temperature" in proc.stderr and proc.stderr.count("\n") == 1


def test_cut_off_answer_is_truncated_not_unparsable(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=2)

    def responder(body: dict[str, Any]) -> Reply:
        if tag_of(body) == ("ours", 100):
            # Cut inside the score line: "Final score: 1" of what would have been a 10.
            return Reply(content="Fluent and original.\nFinal score: 1", finish_reason="length")
        if tag_of(body) == ("ours", 101):
            return Reply(content="No score given here.")
        return Reply(content="Final score: 4")

    with FakeOpenAIServer(responder) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, *FAST])
    assert proc.returncode == 0, proc.stderr
    recs = {(r["policy"], r["id"]): r for r in read_jsonl(tmp_path / "judgments.jsonl")}
    cut = recs[("ours", 100)]
    assert cut["truncated"] is True and cut["finish_reason"] == "length"
    assert cut["score"] is None and cut["parsed"] is False
    assert recs[("ours", 101)]["truncated"] is False
    with (tmp_path / "judge_summary.csv").open() as fh:
        ours = {row["policy"]: row for row in csv.DictReader(fh)}["ours"]
    assert (ours["n_scored"], ours["n_unparsable"], ours["n_truncated"], ours["n_judged"]) == ("0", "1", "1", "2")
    assert "cut off at the token budget" in proc.stdout and "--max_tokens" in proc.stdout


def test_key_masking_leaves_messages_intact_for_short_keys(tmp_path: Path) -> None:
    assert apikey.redact("abstract about ab", "ab") == "abstract about ab"
    assert apikey.redact(f"key {SECRET}, again{SECRET}.", SECRET) == "key ***, again***."
    results = make_results(tmp_path, n_targets=1)
    message = "Incorrect API key provided: x. Check your account at example.org"
    with FakeOpenAIServer(lambda b: error_reply(401, message)) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, *FAST],
                       env_extra={"OPENAI_API_KEY": "x"})
    assert proc.returncode == 2 and message in proc.stderr


def test_outputs_share_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o027)  # inherited by the CLI subprocesses
    try:
        run = write_run(tmp_path / "a.csv", [{"id": 1, "prefix": "p", "reference": "r", "candidate": "c [a#1]"}])
        conv = subprocess.run([sys.executable, "-m", "evaluation.convert", "--policy", f"a={run}",
                               "--out", str(tmp_path / "results.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert conv.returncode == 0, conv.stderr
        with FakeOpenAIServer(lambda b: Reply(content="Final score: 5")) as srv:
            proc = run_cli(["--results", str(tmp_path / "results.json"), "--base_url", srv.base_url, *FAST])
        assert proc.returncode == 0, proc.stderr
    finally:
        os.umask(old)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777
             for name in ("results.json", "judgments.jsonl", "judge_summary.csv")}
    assert modes == dict.fromkeys(modes, 0o640), modes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.csv", "judge_summary.csv", "judgments.jsonl", "results.json"]  # no temp files left


def test_no_cache_file_when_nothing_came_back(tmp_path: Path) -> None:
    results = make_results(tmp_path, n_targets=1)
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli(["--results", str(results), "--base_url", url, "--max_retries", "0", *FAST])
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
    assert not (tmp_path / "judgments.jsonl").exists()
    with FakeOpenAIServer(lambda b: error_reply(503, "down")) as srv:
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--max_retries", "1", *FAST])
    assert proc.returncode == 1 and "HTTP 503" in proc.stderr
    assert not (tmp_path / "judgments.jsonl").exists()


def test_dry_run_counts_estimates_and_sends_nothing(tmp_path: Path) -> None:
    results_path = make_results(tmp_path, n_targets=3)  # 6 pairs
    with FakeOpenAIServer(lambda b: Reply(content="Final score: 5", prompt_tokens=900, completion_tokens=30)) as srv:
        first = run_cli(["--results", str(results_path), "--base_url", srv.base_url, "--limit", "1", *FAST])
        assert first.returncode == 0, first.stderr
        n_before = len(srv.snapshot())
        cache_before = (tmp_path / "judgments.jsonl").read_bytes()
        summary_before = (tmp_path / "judge_summary.csv").read_bytes()
        proc = run_cli(["--results", str(results_path), "--base_url", srv.base_url, "--dry_run",
                        "--price_in", "10", "--price_out", "30", *FAST], drop_key=True)  # no key needed
        assert len(srv.snapshot()) == n_before == 2
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "judgments.jsonl").read_bytes() == cache_before
    assert (tmp_path / "judge_summary.csv").read_bytes() == summary_before

    # The same numbers, worked out by hand: 4 pairs to send, calibrated on the 2 cached ones.
    results = convert.load_results(results_path)
    jobs = judge.build_jobs(results, judge.JudgeConfig())
    cached_chars = sum(estimate.prompt_chars(j) for j in jobs[:2])
    per_char = (2 * 900 - 2 * 2 * estimate.TOKENS_PER_MESSAGE) / cached_chars
    expected_prompt = sum(-(-estimate.prompt_chars(j) * per_char // 1) + 2 * estimate.TOKENS_PER_MESSAGE
                          for j in jobs[2:])
    assert abs(expected_prompt - 4 * 900) < 20  # same-length prompts cost about the same
    likely_cost = (expected_prompt * 10 + 4 * 30 * 30) / 1e6
    max_cost = (expected_prompt * 10 + 4 * 512 * 30) / 1e6
    out = proc.stdout
    assert "4 request(s) would be sent" in out and "2 pair(s) already in the cache" in out
    assert f"estimated prompt tokens: {int(expected_prompt):,}" in out
    assert "likely 120 " in out and "at most 2,048" in out
    assert f"likely {likely_cost:.4f}, at most {max_cost:.4f}" in out
    assert "nothing was sent" in out


def test_dry_run_without_cache_or_prices(tmp_path: Path) -> None:
    results_path = make_results(tmp_path, n_targets=2)
    proc = run_cli(["--results", str(results_path), "--dry_run", "--max_tokens", "100", *FAST], drop_key=True)
    assert proc.returncode == 0, proc.stderr
    jobs = judge.build_jobs(convert.load_results(results_path), judge.JudgeConfig())
    expected = sum(-(-estimate.prompt_chars(j) // 4) + 2 * estimate.TOKENS_PER_MESSAGE for j in jobs)
    assert "4 request(s) would be sent" in proc.stdout
    assert f"estimated prompt tokens: {expected:,} (4.00 characters per token, assumed)" in proc.stdout
    assert "at most 400 (100 per request)" in proc.stdout and "--price_in" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original.csv", "ours.csv", "results.json"]
    bad = run_cli(["--results", str(results_path), "--dry_run", "--price_in", "-1", "--price_out", "1", *FAST])
    assert bad.returncode == 2 and "--price_in" in bad.stderr


def test_convert_out_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "a.csv", [{"id": 1, "prefix": "p", "reference": "r", "candidate": "c"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert convert.main(["--policy", f"a={run}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a folder" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert convert.main(["--policy", f"a={run}", "--out", str(blocker / "r.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with FakeOpenAIServer(lambda b: Reply(content="Final score: 5")) as srv:
        results = make_results(tmp_path, n_targets=1)
        proc = run_cli(["--results", str(results), "--base_url", srv.base_url, "--summary", str(out), *FAST])
        assert srv.snapshot() == []  # refused before anything was sent
    assert proc.returncode == 2 and "--summary" in proc.stderr and "is a folder" in proc.stderr


# --------------------------------------------------------------------------------------------
# the notebook
# --------------------------------------------------------------------------------------------
def _kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Use the installed python3 kernel, or register this interpreter's for a bare CI machine."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" in KernelSpecManager().find_kernel_specs():
        return "python3"
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(kernel_name="icu-eval-test", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return "icu-eval-test"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient
    import nbformat
    data = tmp_path / "data"
    data.mkdir()
    make_results(data, n_targets=2)
    out = tmp_path / "out"

    def responder(body: dict[str, Any]) -> Reply:
        return Reply(content=f"Final score: {3 if tag_of(body)[0] == 'original' else 9}")

    with FakeOpenAIServer(responder) as srv:
        monkeypatch.setenv("ICU_EVAL_POLICIES", f"original={data / 'original.csv'},ours={data / 'ours.csv'}")
        monkeypatch.setenv("ICU_EVAL_OUT", str(out))
        monkeypatch.setenv("ICU_EVAL_BASE_URL", srv.base_url)
        monkeypatch.setenv("ICU_EVAL_CONCURRENCY", "2")
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        kernel = _kernel_name(tmp_path, monkeypatch)
        nb = nbformat.read(ROOT / "evaluation" / "test.ipynb", as_version=4)
        client = nbclient.NotebookClient(nb, timeout=60, kernel_name=kernel,
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
        n_requests = len(srv.snapshot())
    assert n_requests == 4
    summary = (out / "judge_summary.csv").read_text()
    assert "original,3.0000" in summary and "ours,9.0000" in summary
    assert (out / "mean_score.png").stat().st_size > 1000
    executed = tmp_path / "executed.ipynb"
    nbformat.write(nb, executed)
    assert_no_secret(tmp_path)


def test_evaluation_stands_apart_from_torch_and_icu() -> None:
    code = ("import sys, evaluation.api, evaluation.convert, evaluation.prompt, evaluation.judge, "
            "evaluation.cache, evaluation.summary, evaluation.estimate, evaluation.files; "
            "bad = [m for m in ('torch', 'icu') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
