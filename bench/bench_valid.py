"""Time valid.py's batched scoring against the reference's one-example-at-a-time scoring.

Runs the downstream tasks on the offline toy model (datasets/toy/model, built by
``icu.toy.build_toy`` when absent: a few minutes) over the local files in
``../shared/data/validation`` (or $ICU_SHARED_DIR), first with :class:`BatchedScorer` (what
valid.py uses), then with :class:`SequentialScorer` (one example per forward pass, inputs padded
to a fixed 512 tokens, or to the model window when that is shorter; all 32 reply tokens
generated one prompt at a time), checks that both give the same answer on every example, and
prints the times and the speed-up. Exits 0 with a message when the shared files are absent.

    python bench/bench_valid.py                 # the first 5% of every task
    python bench/bench_valid.py --limit 40      # at most 40 rows per task
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from icu.downstream import (  # noqa: E402
    BatchedScorer,
    SequentialScorer,
    load_tasks,
    parse_task_list,
    resolve_sources,
    run_suite,
)

DEFAULT_TASKS = ("lambada,piqa,copa,pubmed_qa,wikitext,pile,wizard_of_wikipedia,"
                 "empathetic_dialogues,blended_skill_talk,wizard_of_internet")


def shared_dir(arg: str | None) -> str:
    return arg or os.environ.get("ICU_SHARED_DIR") or os.path.join(os.path.dirname(REPO), "shared")


def agree(fast, slow) -> bool:
    """Same answer on every example: prediction, generated reply, greedy tokens; perplexity
    equal to float precision."""
    if len(fast.details) != len(slow.details):
        return False
    for a, b in zip(fast.details, slow.details):
        if hasattr(a, "scores"):
            same = a.pred == b.pred
        elif hasattr(a, "generated"):
            same = a.generated == b.generated
        elif hasattr(a, "score"):
            same = (a.score.greedy, a.correct) == (b.score.greedy, b.correct)
        else:
            same = math.isclose(a.ppl, b.ppl, rel_tol=1e-5)
        if not same:
            return False
    return True


def max_logprob_gap(fast, slow) -> float:
    gap = 0.0
    for a, b in zip(fast.details, slow.details):
        if hasattr(a, "scores"):
            gap = max(gap, max(abs(x - y) for x, y in zip(a.scores, b.scores)))
        elif hasattr(a, "score"):
            gap = max(gap, abs(a.score.logprob - b.score.logprob))
    return gap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=None, help="shared folder (default: ../shared or $ICU_SHARED_DIR)")
    p.add_argument("--data_dir", default=None,
                   help="task files (default: <shared>/data/validation)")
    p.add_argument("--toy_dir", default=os.path.join(REPO, "datasets", "toy"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--fraction", type=float, default=0.05,
                   help="score this share of every task's rows (first rows): the suite's own mix "
                        "of tasks, so the speed-up is the one a full run sees")
    p.add_argument("--limit", type=int, default=None,
                   help="instead of --fraction: at most N rows per task (perplexity texts are "
                        "long, so small limits weigh perplexity, which batching barely speeds "
                        "up, more than a full run does)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--pad_to", type=int, default=512, help="the reference's fixed input length")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a busy machine")
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or os.path.join(shared_dir(args.shared), "data", "validation")
    if not os.path.isdir(data_dir):
        print(f"skipped: {data_dir} not found (set --shared or ICU_SHARED_DIR to the shared folder)")
        return 0
    model_dir = os.path.join(args.toy_dir, "model")
    if not os.path.isdir(model_dir):
        from icu.toy import build_toy

        print(f"building the toy model in {args.toy_dir} (a few minutes, once)", flush=True)
        build_toy(args.toy_dir)

    from icu.models import load_model, load_tokenizer

    names = parse_task_list(args.tasks)
    datas = load_tasks(resolve_sources(names, data_dir), limit=args.limit)
    if args.limit is None:
        for data in datas.values():
            data.examples = data.examples[: max(1, math.ceil(args.fraction * len(data.examples)))]
    share = f"limit {args.limit} per task" if args.limit else f"first {args.fraction:.0%} of each task"
    tokenizer = load_tokenizer(model_dir)
    device = torch.device(args.device)
    model = load_model(model_dir, "fp32", device)
    common = dict(batch_size=args.batch_size, prefix_length=512, suffix_length=512, device=device)
    fast_scorer = BatchedScorer(model, tokenizer, **common)
    slow_scorer = SequentialScorer(model, tokenizer, pad_to=min(args.pad_to, fast_scorer.window), **common)
    print(f"toy model window {fast_scorer.window} tokens; one-at-a-time inputs padded to "
          f"{slow_scorer.pad_to}; {device}, {torch.get_num_threads()} CPU threads; {share}",
          flush=True)

    timings = {}
    for label, scorer in (("batched", fast_scorer), ("one-at-a-time", slow_scorer)):
        start = time.perf_counter()
        results = run_suite(datas, scorer, max_new_tokens=args.max_new_tokens)
        timings[label] = (time.perf_counter() - start, {r.name: r for r in results})
        print(f"{label}: {timings[label][0]:.1f} s", flush=True)

    fast_total, fast = timings["batched"]
    slow_total, slow = timings["one-at-a-time"]
    print(f"\n{'task':22} {'n':>5} {'batched s':>10} {'1-at-a-time s':>14} {'speed-up':>9} "
          f"{'metric':>10} {'agree':>6} {'max |dlogp|':>11}")
    rows, all_agree = [], True
    for name in names:
        a, b = fast[name], slow[name]
        if a.error or b.error:
            print(f"{name:22} failed: {a.error or b.error}")
            all_agree = False
            continue
        same = agree(a, b)
        all_agree &= same
        gap = max_logprob_gap(a, b)
        metric = a.metrics[name]
        print(f"{name:22} {a.examples:5d} {a.seconds:10.2f} {b.seconds:14.2f} "
              f"{b.seconds / max(a.seconds, 1e-9):8.1f}x {metric:10.4g} {str(same):>6} {gap:11.2e}")
        rows.append(dict(task=name, n=a.examples, batched_s=a.seconds, sequential_s=b.seconds,
                         metric=metric, sequential_metric=b.metrics[name], agree=same, max_logprob_gap=gap))
    speedup = slow_total / fast_total
    print(f"\ntotal: batched {fast_total:.1f} s, one-at-a-time {slow_total:.1f} s, "
          f"speed-up {speedup:.1f}x; every example agrees: {all_agree}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(limit=args.limit, fraction=None if args.limit else args.fraction, threads=torch.get_num_threads(), batched_s=fast_total, sequential_s=slow_total,
                           speedup=speedup, tasks=rows), fh, indent=1)
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
