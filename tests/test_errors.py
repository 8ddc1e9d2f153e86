"""The shared output-location checks: one IcuError line instead of a traceback."""

from __future__ import annotations

import errno

import pytest

from icu.errors import IcuError, check_writable_dir, disk_errors


def test_writable_dir_created_and_left_clean(tmp_path):
    target = tmp_path / "a" / "b"
    check_writable_dir(str(target), "--dir")
    assert target.is_dir() and list(target.iterdir()) == []


def test_writable_dir_refuses_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(IcuError, match="--dir .* is a file"):
        check_writable_dir(str(f), "--dir")


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_disk_errors_name_the_cause(code, words):
    with pytest.raises(IcuError, match=words):
        with disk_errors("out/x.csv"):
            raise OSError(code, "boom")


def test_disk_errors_translate_torch_full_disk_message():
    with pytest.raises(IcuError, match="no space left"):
        with disk_errors("ckpt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 7104 vs 6996")


def test_disk_errors_pass_other_errors_through():
    with pytest.raises(FileNotFoundError):
        with disk_errors("x"):
            raise FileNotFoundError(errno.ENOENT, "missing")



def test_disk_errors_translate_safetensors_full_disk_message():
    from safetensors import SafetensorError

    with pytest.raises(IcuError, match="no space left"):
        with disk_errors("model"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(SafetensorError):  # any other safetensors problem passes through
        with disk_errors("model"):
            raise SafetensorError("Error while deserializing header: HeaderTooLarge")
