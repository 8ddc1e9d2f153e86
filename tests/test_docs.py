"""The docs' commands name scripts and flags that exist, and their links lead somewhere.

Every command in README.md and docs/*.md — each line of a fenced code block (backslash
continuations joined, ``$ `` prompts and ``FOO=1`` prefixes understood) and each inline code span
that is a command (``python …``, ``bash …``, ``deepspeed …``, ``torchrun …``, or ``X.py --flag …``)
— is checked: the script (``X.py``, ``scripts/*.sh``, ``python -m`` module of this repository)
exists, and every ``--flag`` given to a Python script or module is an option string of the parser
that script builds. A launcher's own flags (``deepspeed --num_gpus 4 X.py``) are not checked, and
neither are the arguments of shell scripts or of modules outside the repository (``python -m pytest``).
The commands in scripts/*.sh get the same check, and every relative link and image of the docs
must lead to a file (and to a heading, where it names one).

The parser is taken without doing the script's work: its ``__main__`` code is run with
``argparse.ArgumentParser.parse_known_args`` replaced by a stub that raises with the parser, so
the checked parser is the first one the script parses with (the trainers' distributed flags
included) and nothing after argument parsing runs. No script needs a parser function for this.
Flags must be written in full: argparse would accept an unambiguous prefix, the docs should not
rely on it.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LAUNCHERS = {"deepspeed", "torchrun"}  # their own flags come before the script and are not checked
PYTHONS = {"python", "python3"}
SHELLS = {"bash", "sh"}
COMMANDS = LAUNCHERS | PYTHONS | SHELLS
NOT_SHELL = {"python", "py", "json", "yaml", "yml", "toml", "ini", "csv", "diff"}  # fence languages skipped
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LONG_FLAG = re.compile(r"^--[A-Za-z][A-Za-z0-9_-]*(=.*)?$")
SEPARATORS = {"&&", "||", ";", "|"}
PLACEHOLDERS = {"...", "…"}  # `python …` in prose names no script


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str
    bare_script: bool = False  # an inline `X.py --flag` span: a Python script without "python"


# --- finding the commands -------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` at the start or after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def block_commands(lines: list[str], first_line: int, path: str) -> Iterator[Command]:
    """The command lines of one fenced block (``lines`` without the fences; ``first_line`` is
    the 1-based number of its first line). With ``$ `` prompts only the prompted lines count."""
    prompted = any(line.lstrip().startswith("$ ") for line in lines)
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(lines):
        line = raw.strip()
        if not pending:
            if prompted:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            start = first_line + offset
        line = strip_comment(line).rstrip()
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line.strip())
        text = " ".join(part for part in pending if part)
        pending = []
        if text:
            yield Command(f"{path}:{start}", text)
    if pending:
        yield Command(f"{path}:{start}", " ".join(part for part in pending if part))


def inline_commands(text: str, first_line: int, path: str) -> Iterator[Command]:
    """Inline code spans of a stretch of prose that read as commands."""
    for match in re.finditer(r"`([^`]+)`", text):
        span = match.group(1)
        if "\n\n" in span:  # not a span: backticks of two paragraphs
            continue
        span = " ".join(span.split())
        tokens = span.split()
        i = 0
        while i < len(tokens) and ENV_ASSIGNMENT.match(tokens[i]):
            i += 1
        rest = tokens[i:]
        if not rest:
            continue
        is_command = rest[0] in COMMANDS and len(rest) > 1
        is_script_call = rest[0].endswith(".py") and len(rest) > 1 and rest[1].lstrip("[").startswith("--")
        if is_command or is_script_call:
            line = first_line + text.count("\n", 0, match.start())
            yield Command(f"{path}:{line}", span, bare_script=is_script_call and not is_command)


def doc_commands(path: str, text: str) -> Iterator[Command]:
    """Every command of one Markdown file: fenced blocks line by line, inline spans in prose."""
    lines = text.split("\n")
    prose: list[str] = []
    prose_start = 1
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            if not prose:
                prose_start = i + 1
            prose.append(lines[i])
            i += 1
            continue
        yield from inline_commands("\n".join(prose), prose_start, path)
        prose = []
        marker, language = fence.group(1), fence.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(marker):
            j += 1
        if language not in NOT_SHELL:
            yield from block_commands(lines[i + 1:j], i + 2, path)
        i = j + 1
    yield from inline_commands("\n".join(prose), prose_start, path)


# --- the scripts' parsers -------------------------------------------------------------------------


class _Parsed(BaseException):
    """Raised instead of parsing: carries the parser (BaseException, so no ``except Exception``
    in a script's start-up catches it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


_OPTIONS: dict[str, frozenset[str]] = {}


def script_options(target: str, module: bool = False) -> frozenset[str]:
    """The option strings of the parser that ``target`` (a repository path, or a module name with
    ``module=True``) parses its command line with."""
    key = ("-m " if module else "") + target
    if key in _OPTIONS:
        return _OPTIONS[key]

    def stub(self, args=None, namespace=None):
        raise _Parsed(self)

    path = module_path(target) if module else target
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        source = f.read()
        if "parse_args" not in source and "main" not in source:  # no command line: no flags (not run)
            _OPTIONS[key] = frozenset()
            return _OPTIONS[key]
    saved_argv, saved_parse = sys.argv[:], argparse.ArgumentParser.parse_known_args
    # what a script's __main__ block sets process-wide before parsing (valid.py turns autograd
    # off, compare.py installs a SIGTERM handler) must not leak into the tests that run after
    import signal

    import torch

    saved_grad, saved_term = torch.is_grad_enabled(), signal.getsignal(signal.SIGTERM)
    sys.argv = [target]
    argparse.ArgumentParser.parse_known_args = stub
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules after import"
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(os.path.join(REPO, target), run_name="__main__")
    except _Parsed as parsed:
        options = frozenset(parsed.parser._option_string_actions)
    else:  # pragma: no cover - every script of ours with parse_args in it parses
        raise AssertionError(f"{target} ran without parsing a command line")
    finally:
        argparse.ArgumentParser.parse_known_args = saved_parse
        sys.argv = saved_argv
        torch.set_grad_enabled(saved_grad)
        signal.signal(signal.SIGTERM, saved_term)
    _OPTIONS[key] = options
    return options


def module_path(name: str) -> Optional[str]:
    """The repository file ``python -m name`` runs, "" when it belongs to this repository but
    is missing, None when it is another package's (pytest, pip)."""
    base = os.path.join(REPO, *name.split("."))
    for candidate in (base + ".py", os.path.join(base, "__main__.py")):
        if os.path.isfile(candidate):
            return os.path.relpath(candidate, REPO)
    top = os.path.join(REPO, name.split(".")[0])
    return "" if os.path.isdir(top) or os.path.isfile(top + ".py") else None


# --- checking one command -------------------------------------------------------------------------


def split_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose-like usage text
        return text.split()


def split_pipeline(words: list[str]) -> list[list[str]]:
    """Commands joined by ``&&``, ``||``, ``;`` or ``|``; a ``|`` inside ``[...]`` is usage
    syntax (``[--limit N | --limit 100]``), not a pipe."""
    parts, current, depth = [], [], 0
    for word in words:
        if word in SEPARATORS and depth == 0:
            parts.append(current)
            current = []
            continue
        depth += word.count("[") - word.count("]")
        current.append(word)
    parts.append(current)
    return [part for part in parts if part]


def flag_of(word: str) -> Optional[str]:
    """The long flag a word of a usage line gives (``[--el_n`` -> ``--el_n``), else None."""
    word = word.strip("[](),")
    if not LONG_FLAG.match(word):
        return None
    return word.split("=", 1)[0]


def check_words(words: list[str], bare_script: bool = False) -> list[str]:
    """What is wrong with one command (empty when nothing is, or when it is not a command of ours)."""
    if bare_script:
        words = ["python"] + words
    i = 0
    while i < len(words) and ENV_ASSIGNMENT.match(words[i]):
        i += 1
    words = words[i:]
    if not words:
        return []
    head = os.path.basename(words[0])
    if head not in COMMANDS:
        return []
    args = words[1:]
    module = None
    if args and args[0] in PLACEHOLDERS:
        return []
    if head in SHELLS:
        if not args or args[0] == "-c":
            return []
        script = args[0]
        if "$" in script:
            return []
        return [] if os.path.isfile(os.path.join(REPO, script)) else [f"no script {script}"]
    if head in LAUNCHERS:
        found = [k for k, word in enumerate(args) if word.endswith(".py")]
        if not found:  # the launcher alone (`deepspeed --num_gpus 4`) or a placeholder
            return []
        script, args = args[found[0]], args[found[0] + 1:]
    else:
        if not args:
            return []
        if args[0] == "-m" and len(args) > 1:
            module, args = args[1], args[2:]
            script = module_path(module)
            if script is None:  # another package's module: its flags are not ours to check
                return []
            if not script:
                return [f"no module {module} in the repository"]
        elif args[0] == "-c" or args[0].startswith("-"):
            return []
        else:
            script, args = args[0], args[1:]
    if "$" in script:
        return []
    if not os.path.isfile(os.path.join(REPO, script)):
        return [f"no script {script}"]
    options = script_options(module, module=True) if module else script_options(script)
    problems = []
    for word in args:
        flag = flag_of(word)
        if flag is not None and flag not in options:
            problems.append(f"{module or script} has no flag {flag}")
    return problems


def check_command(command: Command) -> list[str]:
    """``file:line: `command`: problem`` for each problem of the command."""
    problems = []
    for words in split_pipeline(split_words(command.text)):
        problems += check_words(words, command.bare_script)
        command = Command(command.where, command.text)  # only the first part can be a bare script
    return [f"{command.where}: `{command.text}`: {problem}" for problem in problems]


def check_markdown(path: str, text: str) -> list[str]:
    problems = []
    for command in doc_commands(path, text):
        problems += check_command(command)
    return problems


def doc_files() -> list[str]:
    return ["README.md"] + sorted(
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
    )


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", doc_files())
def test_doc_commands_name_real_scripts_and_flags(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        problems = check_markdown(doc, f.read())
    assert not problems, "commands in the docs that do not match the scripts:\n" + "\n".join(problems)


@pytest.mark.parametrize("script", sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "scripts", "*.sh"))))
def test_shell_scripts_call_real_flags(script):
    """The same check on the commands the bash entry points run (their lines read as one block)."""
    with open(os.path.join(REPO, script), encoding="utf-8") as f:
        lines = f.read().split("\n")
    problems = []
    for command in block_commands(lines, 1, script):
        problems += check_command(command)
    assert not problems, "commands in scripts/ that do not match the scripts:\n" + "\n".join(problems)


def test_docs_hold_commands():
    """The checker finds the commands it is meant to check (a parser that found none would pass)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        texts = [c.text for c in doc_commands("README.md", f.read())]
    assert any(t.startswith("bash scripts/demo.sh") for t in texts)
    assert any(t.startswith("python train_neo_meanwhile_update.py --exp exp0") for t in texts)
    assert any("pytest" in t for t in texts)


FAKE_DOC = """\
Intro with `python eval.py --exp exp0 --no_such_inline_flag` inline, `valid.py [--bad_bare]` too.

```console
$ python eval.py --exp exp0 \\
    --model_name M [--bogus_flag X]     # a comment with --comment_flag
output line --not_a_command
```

```bash
FOO=1 python compare.py --methods ga --bogus_too=3
deepspeed --num_gpus 2 train_neo_meanwhile_update_deepspeed.py --deepspeed_config c.json --device cpu
python train_neo_meanwhile_update.py --deepspeed_config c.json --el_st 1
bash scripts/no_such_script.sh
python no_such_script.py --exp exp0
python -m icu.no_such_module
python -m icu.toy --out x --unknown
python -m pytest -m "not slow" tests --anything
python valid.py --model_name M [--limit N | --limit 100,wikitext=5] [--dtype bf16]
python -m icu.realworld --out x --num_targets 16 --bogus_rw
```
"""


def test_checker_reports_bad_flags_and_missing_scripts():
    problems = check_markdown("fake.md", FAKE_DOC)
    text = "\n".join(problems)
    expected = [
        ("fake.md:1:", "eval.py has no flag --no_such_inline_flag"),
        ("fake.md:1:", "valid.py has no flag --bad_bare"),
        ("fake.md:4:", "eval.py has no flag --bogus_flag"),
        ("fake.md:10:", "compare.py has no flag --bogus_too"),
        # the DeepSpeed trainer takes --deepspeed_config but not --device; the launcher's
        # --num_gpus is not checked
        ("fake.md:11:", "train_neo_meanwhile_update_deepspeed.py has no flag --device"),
        # the single-device trainer has no --deepspeed_config, and a prefix (--el_st) is refused
        ("fake.md:12:", "train_neo_meanwhile_update.py has no flag --deepspeed_config"),
        ("fake.md:12:", "train_neo_meanwhile_update.py has no flag --el_st"),
        ("fake.md:13:", "no script scripts/no_such_script.sh"),
        ("fake.md:14:", "no script no_such_script.py"),
        ("fake.md:15:", "no module icu.no_such_module in the repository"),
        ("fake.md:16:", "icu.toy has no flag --unknown"),
        ("fake.md:19:", "icu.realworld has no flag --bogus_rw"),  # through its __main__.py
    ]
    for where, message in expected:
        assert any(p.startswith(where) and p.endswith(message) for p in problems), (where, message, text)
    assert len(problems) == len(expected), text
    # the message names the file:line, the command and the flag
    assert "fake.md:4: `python eval.py --exp exp0 --model_name M [--bogus_flag X]`: " in text
    for unchecked in ("--comment_flag", "--not_a_command", "--num_gpus", "--anything", "--limit", "--dtype"):
        assert f"has no flag {unchecked}" not in text


# --- links ------------------------------------------------------------------------------------------


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the Markdown headings of ``text`` (fenced blocks skipped)."""
    anchors, seen, in_fence = set(), {}, None
    for line in text.split("\n"):
        fence = re.match(r"^\s*(```+|~~~+)", line)
        if fence:
            in_fence = None if in_fence and line.strip().startswith(in_fence) else (in_fence or fence.group(1))
            continue
        heading = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def check_links(path: str, text: str) -> list[str]:
    """``file:line: target: problem`` for each relative link or image of a Markdown file whose
    file or heading anchor does not exist."""
    problems = []
    base = os.path.dirname(os.path.join(REPO, path))
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = match.group(1)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        line = text.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, file_part)) if file_part else os.path.join(REPO, path)
        if file_part and not os.path.exists(full):
            problems.append(f"{path}:{line}: {target}: no file {os.path.relpath(full, REPO)}")
            continue
        if anchor and full.endswith(".md"):
            if file_part:
                with open(full, encoding="utf-8") as f:
                    anchors = heading_anchors(f.read())
            else:
                anchors = heading_anchors(text)
            if anchor not in anchors:
                problems.append(f"{path}:{line}: {target}: no heading #{anchor} in {os.path.relpath(full, REPO)}")
    return problems


@pytest.mark.parametrize("doc", doc_files())
def test_doc_links_resolve(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        problems = check_links(doc, f.read())
    assert not problems, "links in the docs that lead nowhere:\n" + "\n".join(problems)


def test_link_checker_reports_broken_links():
    text = "See [a](docs/method.md#loss), [b](docs/method.md#no-such-heading), [c](docs/nothing.md),\n" \
           "[d](#local-heading), [e](#missing), ![f](docs/img/tradeoff_real.png), [g](https://example.com).\n\n" \
           "## Local heading\n"
    problems = check_links("README.md", text)
    assert problems == [
        "README.md:1: docs/method.md#no-such-heading: no heading #no-such-heading in docs/method.md",
        "README.md:1: docs/nothing.md: no file docs/nothing.md",
        "README.md:2: #missing: no heading #missing in README.md",
    ], problems
