"""files.py: whole-or-nothing writes, the refusal to overwrite, and the one line for a write that failed."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from bdh_lightning import files
from bdh_lightning.errors import ResourceError, UsageError, one_line
from bdh_lightning.files import atomic_output, failure_reason, output_paths, write_atomically, write_failure


def test_failure_reason_words():
    assert failure_reason(OSError(28, "No space left on device")) == "No space left on device"
    assert failure_reason(OSError("plain")) == "plain"
    assert failure_reason(OSError()) == "OSError"
    assert failure_reason(RuntimeError("write failed\nat byte 7")) == "write failed at byte 7"


def test_write_failure_says_what_and_adds_the_disk_full_advice_once():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert str(write_failure("report.json", full)) == (
        "cannot write report.json (No space left on device); free some space or write elsewhere; nothing was written"
    )
    assert str(write_failure("x", full, "free some space and resume")) == (
        "cannot write x (No space left on device); free some space and resume"
    )
    denied = write_failure("x", OSError(errno.EACCES, "Permission denied"))
    assert str(denied) == "cannot write x (Permission denied); nothing was written" and denied.exit_code == 1


def test_output_paths_refuses_existing_files_folders_and_missing_folders(tmp_path):
    existing = tmp_path / "a.txt"
    existing.write_text("keep")
    assert output_paths([tmp_path / "new.txt"]) == [tmp_path / "new.txt"]
    assert output_paths([existing], overwrite=True) == [existing]
    with pytest.raises(UsageError, match=f"^--output: {existing} exists; give --overwrite true to replace it"):
        output_paths([existing])
    with pytest.raises(UsageError, match="is a directory; give a file name$"):
        output_paths([tmp_path])
    with pytest.raises(UsageError, match=f"the folder {tmp_path / 'no'} does not exist$"):
        output_paths([tmp_path / "no" / "a.txt"])
    with pytest.raises(UsageError, match=f"^--output: {tmp_path} exists"):  # a folder output (an hf export)
        output_paths([tmp_path], folders=True)
    assert output_paths([Path("/dev/null")]) == [Path("/dev/null")]  # devices are written in place
    assert existing.read_text() == "keep"


def test_write_atomically_replaces_whole_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and sorted(os.listdir(tmp_path)) == ["out.txt"]

    def full_disk(self, data):
        with open(self, "wb") as file:
            file.write(data[:3])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(ResourceError) as error:
        write_atomically(target, b"0123456789", what="--output out.txt")
    assert one_line(error.value).startswith("cannot write --output out.txt (No space left on device)")
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == "new ✓" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_output_folder_replaces_an_old_folder_only_when_whole(tmp_path):
    report = tmp_path / "report"
    with atomic_output(report, folder=True) as folder:
        (folder / "a.json").write_text("1")
    with pytest.raises(ResourceError, match="^cannot write report .*Permission denied"):
        with atomic_output(report, what="report", folder=True) as folder:
            (folder / "a.json").write_text("2")
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(KeyError):  # not a write failure: passed on, the temporary still removed
        with atomic_output(report, folder=True):
            raise KeyError("a bug")
    assert (report / "a.json").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["report"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """On a 64 kB tmpfs: writing 1 MB fails in one line, the old file stays whole, no temporary is left."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        write_atomically(mount / "kept.bin", b"good")
        with pytest.raises(ResourceError, match="No space left on device.*free some space or write elsewhere"):
            write_atomically(mount / "kept.bin", os.urandom(1 << 20))
        assert (mount / "kept.bin").read_bytes() == b"good" and os.listdir(mount) == ["kept.bin"]
    finally:
        subprocess.run(["umount", str(mount)])


def test_temporary_is_hidden_beside_the_target():
    assert files.temporary_beside(Path("a/b.ckpt")) == Path(f"a/.b.ckpt.part-{os.getpid()}")
