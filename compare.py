"""Compare unlearning methods on one split: train each, evaluate every final model the same way,
and write one table, one trade-off plot and one results.json.

    python compare.py --exp exp0 --data_dir datasets/exp --model_name EleutherAI/gpt-neo-125m \\
        --methods original,ga,kl,llmu,po,npo,icu --dir result/compare_exp0 \\
        [--config my.yaml] [--tasks piqa,copa] [--heldout heldout_rows.npy]
        [--exp exp0,exp1 --seeds 0,1,2 --baseline ga] [--lr_grid 1e-4,5e-5 --tune_exp tune]

Big models: ``--trainer deepspeed --launcher_args "--num_gpus 4"`` runs
``deepspeed --num_gpus 4 train_neo_meanwhile_update_deepspeed.py ...`` for each method.

Hyper-parameters per method come from config/compare.yaml (the paper's values), with --config on
top. Writes ``{dir}/comparison.csv``, ``comparison.md``, ``tradeoff.png``, ``results.json``,
``compare.log`` and per method ``{dir}/{method}/`` (train/, eval/, valid/, row.json, *.out).
A method already finished in --dir is reused; an unfinished trainer run continues (--resume).

Exit codes: 0 done; 1 a method failed (the others are reported); 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from icu.cli import add_data_args, add_model_args, add_runtime_args, check_positive, setup_logging
from icu.errors import IcuError, exit_on_user_error


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare unlearning methods (train, evaluate, tabulate).")
    add_data_args(p)
    add_model_args(p)
    add_runtime_args(p)
    p.set_defaults(dir=os.path.join("result", "compare"))
    p.add_argument("--methods", default="all",
                   help="comma-separated methods: original (the untrained model) and the trainer's "
                        "--method choices; all = every one of them")
    p.add_argument("--config", default=None,
                   help="YAML/JSON hyper-parameters per method, read on top of config/compare.yaml")
    p.add_argument("--thresholds", default=None,
                   help="thresholds.json from eval.py --calibrate: every method's stop and flag rule "
                        "(the trainer's --thresholds; replaces config/compare.yaml's acc / el, a "
                        "--config file's acc / el still win)")
    p.add_argument("--heldout", default=None,
                   help="(N, 200) uint16 .npy of rows no method trains on: their LM loss at every "
                        "validation of every run (the trajectory) and per final model")
    p.add_argument("--seeds", default=None,
                   help="comma-separated trainer seeds, e.g. 0,1,2: every method runs once per seed "
                        "(and per split of --exp); the table gives mean ± 95%% CI over the runs")
    p.add_argument("--baseline", default=None,
                   help="method(s) the others are compared with, run by run, e.g. ga or ga,kl (paired "
                        "differences with their 95%% CI in differences.csv / .md)")
    p.add_argument("--lr_grid", default=None,
                   help="comma-separated learning rates tried for every trained method on --tune_exp "
                        "(or lr lists per method in the config); the chosen lr runs the reported splits")
    p.add_argument("--tune_exp", default=None,
                   help="split of tuning targets for the lr grid; must share no target with --exp")
    p.add_argument("--tune_seed", type=int, default=None,
                   help="trainer seed of the tuning runs (default: the first of --seeds). Fix it to split "
                        "a study's seeds over workers: --seeds 0,1 here and --seeds 2 there, both --tune_seed 0")
    p.add_argument("--tune_heldout", default=None,
                   help="held-out rows the tuning runs are scored on (default --heldout); other rows than "
                        "the reported ones keep the choice from fitting the reported numbers")
    p.add_argument("--unseen", default=None,
                   help="(N, 200) uint16 .npy of rows no model saw: membership-inference AUCs of the "
                        "forget targets against them (LOSS, zlib, Min-K%%, Min-K%%++) per model")
    p.add_argument("--tasks", default=None, help="valid.py tasks to score every model on (comma-separated)")
    p.add_argument("--task_dir", default=None, help="valid.py's --data_dir: folder of local task files")
    p.add_argument("--task_file", action="append", default=[], metavar="TASK=PATH",
                   help="a local file for one task (valid.py's --task_file); repeatable")
    p.add_argument("--task_limit", default=None,
                   help="valid.py's --limit: rows per task, N and/or TASK=N items (e.g. 100,wikitext=5)")
    p.add_argument("--task_runs", type=int, default=None,
                   help="valid.py on the first N runs only (default every run): downstream tasks are the "
                        "slowest step, and one run gives their level. 0: a worker taking later seeds "
                        "scores only --every_run_tasks")
    p.add_argument("--every_run_tasks", default=None,
                   help="of --tasks, those valid.py scores on every run even past --task_runs: cheap ones "
                        "such as wikitext,pile, so that they get a spread over runs")
    p.add_argument("--el_n", default="10", help="eval.py's extraction-likelihood n, comma-separated")
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="batch of eval.py, valid.py and the held-out loss (default --batch_size)")
    p.add_argument("--trainer", default="torch", choices=["torch", "deepspeed"],
                   help="torch: train_neo_meanwhile_update.py; deepspeed: the DeepSpeed trainer "
                        "through the deepspeed launcher")
    p.add_argument("--launcher_args", default="",
                   help='arguments of the deepspeed launcher, e.g. "--num_gpus 4"')
    args = p.parse_args(argv)
    check_positive(args, "batch_size", "prefix_length", "suffix_length", "target_length")
    if args.eval_batch_size is not None:
        check_positive(args, "eval_batch_size")
    if args.task_runs is not None and args.task_runs < 0:
        raise IcuError(f"--task_runs must be 0 or more (got {args.task_runs}); 0 scores only --every_run_tasks")
    if args.task_limit is not None:
        from icu.downstream import parse_limits

        parse_limits(args.task_limit, "--task_limit")
    return args


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from icu.comparison import known_methods, run_comparison

    if args.methods.strip() == "all":
        args.methods = ",".join(known_methods())
    # The log goes into --dir only once the inputs passed their checks (see run_comparison).
    setup_logging(None)
    return run_comparison(args)


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds through the running step, which then stops its subprocess as well.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
