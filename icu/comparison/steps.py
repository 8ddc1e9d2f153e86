"""One method's steps in a comparison: the commands that train and evaluate it, running them
with their output logged, and what a folder already holds (so a killed comparison resumes).

Every step runs a project script in a subprocess (the trainer, eval.py, valid.py): memory is
returned between methods and the numbers are exactly the scripts' own.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import IcuError
from ..checkpoint import CHECKPOINT, find_checkpoint
from .config import REPO_ROOT

logger = logging.getLogger("icu")

TRAINER_SCRIPTS = {
    "torch": "train_neo_meanwhile_update.py",
    "deepspeed": "train_neo_meanwhile_update_deepspeed.py",
}
# A subprocess line worth echoing: the scripts' log lines (tqdm bars and library chatter stay
# in the step's .out file).
_SHOWN = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR) (.*)$")


@dataclass(frozen=True)
class MethodDir:
    """``{dir}/{method}/``: train/ (the trainer's --dir), eval/ (eval.py's), valid/ (valid.py's),
    row.json (the method's numbers, written step by step) and each step's console output."""

    root: str

    @property
    def train(self) -> str:
        return os.path.join(self.root, "train")

    @property
    def eval(self) -> str:
        return os.path.join(self.root, "eval")

    @property
    def valid(self) -> str:
        return os.path.join(self.root, "valid")

    @property
    def row_file(self) -> str:
        return os.path.join(self.root, "row.json")

    def out_file(self, step: str) -> str:
        return os.path.join(self.root, f"{step}.out")


def read_json(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when the file is missing or unreadable (a run killed
    while writing: treated as not there)."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def train_state(train_dir: str) -> tuple[str, Optional[dict]]:
    """What ``train_dir`` holds: ("finished", run) with a saved model, ("partial", run) with a
    checkpoint to --resume from, ("stale", run) with files but nothing to resume, or ("empty", None)."""
    run = read_json(os.path.join(train_dir, "run.json"))
    if run and run.get("status") == "finished" and run.get("model_dir") and os.path.isfile(
        os.path.join(run["model_dir"], "config.json")
    ):
        return "finished", run
    # The trainer's own test of what --resume can continue from (a complete checkpoint, also one
    # a kill during the checkpoint swap left as checkpoint.tmp / .old)
    if find_checkpoint(train_dir) is not None:
        return "partial", run
    ckpts = glob.glob(os.path.join(glob.escape(train_dir), CHECKPOINT + "*"))
    if run is not None or ckpts:
        return "stale", run
    return "empty", None


def run_step(cmd: list[str], out_file: str, tag: str) -> int:
    """Run ``cmd``; its whole output goes to ``out_file`` (appended), its log lines also to our
    log as ``[tag] ...``. Returns the exit code."""
    logger.info("[%s] $ %s", tag, shlex.join(cmd))
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    with open(out_file, "a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        # text mode splits tqdm's carriage returns into lines as well
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                shown = _SHOWN.match(line.rstrip())
                if shown:
                    logger.info("[%s] %s", tag, shown.group(2)[:300])
        except BaseException:
            # compare.py interrupted or terminated: stop the step too, so no orphan keeps
            # writing into a folder the next comparison will read (it resumes from the checkpoint)
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def last_error_line(out_file: str) -> str:
    """The last ``error: ...`` line a script printed (its one-line bad-input message)."""
    try:
        with open(out_file, encoding="utf-8", errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def check_step(rc: int, out_file: str, what: str) -> Optional[str]:
    """None when the step succeeded; a failure note otherwise. Exit 2 (the script refused its
    input) is the user's to fix: it stops the comparison with the script's own message."""
    if rc == 0:
        return None
    if rc == 2:
        raise IcuError(f"{what} refused its input: {last_error_line(out_file)} (full output: {out_file})")
    return f"{what} failed (exit {rc}); see {out_file}"


def script(name: str) -> str:
    return os.path.join(REPO_ROOT, name)


def model_flags(args, model_dir: str, tokenizer: Optional[str]) -> list[str]:
    flags = ["--model_name", model_dir, "--gpt2_name", args.gpt2_name, "--bert_name", args.bert_name,
             "--dtype", args.dtype]
    return flags + (["--tokenizer_name", tokenizer] if tokenizer else [])


def data_flags(args) -> list[str]:
    return ["--exp", args.exp, "--data_dir", args.data_dir, "--prefix_length", str(args.prefix_length),
            "--suffix_length", str(args.suffix_length), "--target_length", str(args.target_length)]


def trainer_command(args, method: str, flag_list: list[str], train_dir: str, mode: Optional[str]) -> list[str]:
    """The trainer's command line: shared flags, then the method's own (they win), then --dir and
    ``mode`` (--resume / --overwrite / None)."""
    if args.trainer == "deepspeed":
        head = ["deepspeed", *shlex.split(args.launcher_args or ""), script(TRAINER_SCRIPTS["deepspeed"])]
        device = []
    else:
        head = [sys.executable, script(TRAINER_SCRIPTS["torch"])]
        device = ["--device", args.device]
    cmd = [*head, *data_flags(args), *model_flags(args, args.model_name, args.tokenizer_name), *device,
           "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers), "--method", method]
    cmd += [*flag_list, "--dir", train_dir]
    return cmd + ([f"--{mode}"] if mode else [])


def eval_command(args, model_dir: str, tokenizer: Optional[str], eval_dir: str) -> list[str]:
    return [sys.executable, script("eval.py"), *data_flags(args), *model_flags(args, model_dir, tokenizer),
            "--device", args.device, "--batch_size", str(args.eval_batch_size or args.batch_size),
            "--el_n", args.el_n, "--dir", eval_dir, "--no_progress"]


def valid_command(args, model_dir: str, tokenizer: Optional[str], tasks: list[str], valid_dir: str) -> list[str]:
    cmd = [sys.executable, script("valid.py"), "--model_name", model_dir, "--dtype", args.dtype,
           "--device", args.device, "--batch_size", str(args.eval_batch_size or args.batch_size),
           "--tasks", ",".join(tasks), "--dir", valid_dir]
    cmd += ["--tokenizer_name", tokenizer] if tokenizer else []
    cmd += ["--data_dir", args.task_dir] if args.task_dir else []
    for spec in args.task_file:
        cmd += ["--task_file", spec]
    return cmd + (["--limit", str(args.task_limit)] if args.task_limit else [])
