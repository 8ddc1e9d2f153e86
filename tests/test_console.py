"""icu.console: the scripts' logs hold no carriage-return progress bars and their stdout holds
only their own output (no DeepSpeed accelerator warning), while a terminal still gets its bars."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from conftest import REPO
from tiny import family_rows

from icu.console import bar_disabled, is_terminal

# what a script does that draws bars: the trainer's style (disable=False), a library's (a
# transformers save), plus a DeepSpeed import, whose accelerator warning goes to stdout
BARS = """
import torch
from icu.console import setup_console
setup_console()
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="epoch 1", disable=False):
    pass
from transformers import GPT2Config, GPT2LMHeadModel
GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0)).save_pretrained({out!r})
import deepspeed
print("own output")
"""


def test_bar_disabled_follows_the_stream():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not bar_disabled(True, Tty()) and bar_disabled(False, Tty())
    assert bar_disabled(True, io.StringIO())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


@pytest.mark.slow
def test_no_bars_in_a_log_and_nothing_foreign_on_stdout(tmp_path):
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-c", BARS.format(out=str(tmp_path / "m"))], cwd=REPO, stdout=out,
                              stderr=err, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, stderr
    assert stdout == "own output\n"
    assert "\r" not in stderr and "epoch 1" not in stderr and "Writing model shards" not in stderr
    if "Setting accelerator to CPU" in stdout + stderr:  # a machine without an accelerator
        assert "Setting accelerator to CPU" in stderr


@pytest.mark.slow
def test_a_terminal_still_gets_its_bars(tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns draws nothing
    try:
        proc = subprocess.Popen([sys.executable, "-c", BARS.format(out=str(tmp_path / "m"))], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=secondary, env={**os.environ, "PYTHONPATH": REPO})
        os.close(secondary)
        seen = b""
        while True:  # read the terminal until the process closes it
            ready, _, _ = select.select([primary], [], [], 300)
            if not ready:
                break
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=300)
    finally:
        os.close(primary)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert stdout == b"own output\n"
    assert b"\r" in seen and b"epoch 1" in seen and b"Writing model shards" in seen


@pytest.mark.slow
def test_data_prep_log_has_no_embedding_bar(tmp_path, gpt2_tok):
    """The real script whose sentence-embedding bar flooded the real-model world's log."""
    rows = family_rows(gpt2_tok, 80, 8, seed=5)
    np.save(tmp_path / "train.npy", rows)
    log = tmp_path / "data_prep.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "--train_file",
                               str(tmp_path / "train.npy"), "--exp_dir", str(tmp_path / "exp"), "--num_targets", "4",
                               "--split_name", "mine", "--k", "4", "--batch_size", "8",
                               "--embedder", "builtin:all-MiniLM-L6-v2", "--gpt2_name", "builtin:gpt2"],
                              cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "embedding 80 rows" in text and "data_prep done" in text  # the plain lines are there
    assert "\r" not in text and "Batches" not in text
