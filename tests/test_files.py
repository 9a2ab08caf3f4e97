"""files.py: whole-or-nothing writes, the refusal to overwrite, and the one line for a write that failed."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

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


@pytest.mark.parametrize(
    "error, full",
    [(OSError(errno.ENOSPC, "disk is full"), True), (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
     (RuntimeError("[enforce fail] No space left on device"), True), (OSError(errno.EACCES, "Permission denied"), False),
     (RuntimeError("no space left"), False), (RuntimeError("unexpected pos 64"), False)],
)  # fmt: skip
def test_a_full_disk_is_known_by_its_errno_or_the_os_words(error, full):
    assert files.is_disk_full(error) is full


@pytest.mark.parametrize(
    "error, written",
    [(OSError(errno.EACCES, "Permission denied"), True), (RuntimeError("[enforce fail at inline_container.cc] write"), True),
     (RuntimeError("PytorchStreamWriter failed writing file data/0"), True), (RuntimeError("a bug"), False),
     (ValueError("write failed"), False)],
)  # fmt: skip
def test_a_write_error_is_an_oserror_or_torchs_writer_failing(error, written):
    assert files.is_write_error(error) is written


def test_torchs_unexpected_pos_on_a_nearly_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch):
    unexpected = RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 448 vs 342")
    free = {"bytes": files.NEARLY_FULL - 1}
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free["bytes"]))
    cause = files.write_cause(unexpected, tmp_path)
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC and cause.strerror == "No space left on device"
    full = OSError(errno.ENOSPC, "No space left on device: 'x'")
    assert files.write_cause(full, tmp_path) is full  # the OS's own words kept
    free["bytes"] = files.NEARLY_FULL  # exactly a mebibyte free: not nearly full
    assert files.write_cause(unexpected, tmp_path) is unexpected

    def unreadable(folder):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.shutil, "disk_usage", unreadable)
    assert files.write_cause(unexpected, tmp_path) is unexpected


def test_atomic_output_replaces_an_existing_folder_and_leaves_no_old_copy(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "stale.json").write_text("old")
    with atomic_output(report, folder=True) as folder:
        (folder / "a.json").write_text("new")
    assert sorted(os.listdir(report)) == ["a.json"] and (report / "a.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["report"]


def test_a_folder_written_over_a_link_replaces_the_link_not_what_it_points_to(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_text("keep")
    (tmp_path / "report").symlink_to(elsewhere)
    with atomic_output(tmp_path / "report", folder=True) as folder:
        (folder / "a.json").write_text("new")
    assert not (tmp_path / "report").is_symlink() and os.listdir(tmp_path / "report") == ["a.json"]
    assert (elsewhere / "keep.json").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["elsewhere", "report"]


def fail_first_unlink(monkeypatch):
    """os.unlink refuses its first file (whichever rmtree meets first), then works."""
    real, refused = os.unlink, []

    def unlink(path, *args, **kwargs):
        if not refused:
            refused.append(path)
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    return refused


def test_an_old_folder_that_cannot_be_fully_removed_does_not_fail_the_write(tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    (report / "stale.json").write_text("old")
    with atomic_output(report, folder=True) as folder:
        (folder / "a.json").write_text("new")
        refused = fail_first_unlink(monkeypatch)
    assert refused and (report / "a.json").read_text() == "new"


def test_a_failed_folder_write_removes_what_it_can_of_its_temporary(tmp_path, monkeypatch):
    """One file of the temporary cannot be removed: every other one still is."""
    with pytest.raises(ResourceError):
        with atomic_output(tmp_path / "report", folder=True) as folder:
            for name in "abcdef":
                (folder / f"{name}.json").write_text(name)
            refused = fail_first_unlink(monkeypatch)
            raise OSError(errno.EIO, "Input/output error")
    left = [path.name for path in tmp_path.rglob("*") if path.is_file()]
    assert len(refused) == 1 and left == [Path(refused[0]).name]


def test_removing_what_is_not_there_is_quiet(tmp_path):
    files.remove(tmp_path / "never-written")
    files.remove(tmp_path / "never-written-folder" / "x")
    assert os.listdir(tmp_path) == []


def test_every_file_of_a_written_folder_is_synced_to_disk(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def fsync(handle):
        synced.append(Path(os.readlink(f"/proc/self/fd/{handle}")).name)
        return real(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_output(tmp_path / "report", folder=True) as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "b.json").write_text("b")
        (folder / "a.json").write_text("a")
    assert synced[:2] == ["a.json", "b.json"] and synced[2:] == [tmp_path.name]  # then the rename, in its folder
    synced.clear()
    write_atomically(tmp_path / "one.txt", "x")
    assert synced[0].startswith(".one.txt.part-") and synced[1:] == [tmp_path.name]


def test_a_temporary_that_cannot_be_removed_still_fails_in_one_line(tmp_path, monkeypatch):
    def full_disk(self, data):
        self.write_text("half")
        fail_first_unlink(monkeypatch)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(ResourceError, match="^cannot write out.txt .No space left on device."):
        write_atomically(tmp_path / "out.txt", b"data", what="out.txt")
