"""File-system errors while writing results end in one line naming the path and the reason, exit code 2,
and leave no half-written or temporary files behind.

Read-only and full file systems are made with small tmpfs mounts (the tests run as root, so ``chmod``
alone would not stop a write); where the kernel refuses to mount, those cases are skipped with the
reason, and the cases that need no mount (a file where a directory should be, a directory where a file
should be) still run.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embedlens.cli.app import describe_os_error
from helpers import probe_args, run_cli

TMPFS_SIZE = "64k"


def _mount_tmpfs(target: Path, *options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("size=" + TMPFS_SIZE, *options)), "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root and mount rights"
        )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs (with extra mount options) at a fresh directory; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(*options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        _mount_tmpfs(target, *options)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def assert_fs_error(code: int, out: str, err: str, path: Path, reason: str) -> None:
    """Exit 2, empty stdout, one line on stderr naming ``path`` and ``reason``, no traceback."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("embedlens: error: "), err
    assert str(path) in err and reason in err, err


def leftovers(directory: Path) -> list[Path]:
    """Temporary files an interrupted atomic write would leave."""
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")] if directory.is_dir() else []


class TestNoMountNeeded:
    """Paths whose shape makes the write fail, on any file system."""

    def test_parent_of_out_is_a_file(self, capsys, tiny_dir, image_path, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "run"
        code, stdout, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", out))
        assert_fs_error(code, stdout, err, out, "Not a directory")
        assert blocker.read_text() == "x"

    def test_tokens_parquet_is_a_directory(self, capsys, tiny_dir, image_path, tmp_path):
        out = tmp_path / "run"
        (out / "tokens.parquet").mkdir(parents=True)
        code, stdout, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", out))
        assert_fs_error(code, stdout, err, out / "tokens.parquet", "Is a directory")
        assert sorted(p.name for p in out.iterdir()) == ["tokens.parquet"]  # nothing else, no temporary file
        assert list((out / "tokens.parquet").iterdir()) == []

    def test_stats_out_under_a_file(self, capsys, tiny_dir, image_folder, tiny_anchor_file, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args = ["stats", image_folder, "--model", tiny_dir, "--anchors", tiny_anchor_file, "--no-progress"]
        code, stdout, err = run_cli(capsys, *args, "--out", blocker / "o")
        assert_fs_error(code, stdout, err, blocker / "o", "Not a directory")


class TestMounts:
    def test_read_only_out(self, capsys, tiny_dir, image_path, tmpfs):
        mount = tmpfs("ro")
        out = mount / "run"
        code, stdout, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", out))
        assert_fs_error(code, stdout, err, out, "Read-only file system")
        assert list(mount.iterdir()) == []

    def test_read_only_existing_out(self, capsys, tiny_dir, image_path, tmp_path, tmpfs):
        """An existing directory on a read-only mount: the temporary file cannot be made; the error
        names the directory, not the temporary name."""
        mount = tmpfs()
        (mount / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        code, stdout, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", mount / "run"))
        assert_fs_error(code, stdout, err, mount / "run", "Read-only file system")
        assert ".tmp" not in err
        assert list((mount / "run").iterdir()) == []

    def test_stats_read_only(self, capsys, tiny_dir, image_folder, tiny_anchor_file, tmpfs):
        mount = tmpfs("ro")
        args = ["stats", image_folder, "--model", tiny_dir, "--anchors", tiny_anchor_file, "--no-progress"]
        code, stdout, err = run_cli(capsys, *args, "--out", mount / "o")
        assert_fs_error(code, stdout, err, mount / "o", "Read-only file system")

    def test_full_disk(self, capsys, tiny_dir, image_path, tmpfs):
        mount = tmpfs()
        out = mount / "run"
        out.mkdir()
        filler = mount / "filler"
        try:
            with filler.open("wb", buffering=0) as handle:  # take every free block
                while True:
                    handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        code, stdout, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", out))
        assert code == 2 and stdout == "" and "Traceback" not in err, err
        assert len(err.splitlines()) == 1 and "No space left on device" in err, err
        assert str(out) in err, err
        assert leftovers(mount) == []
        assert list(out.iterdir()) == []  # the first file could not be written, so nothing is there


class TestDescribe:
    """The message names the destination of a failed rename and the directory of a temporary file."""

    def test_rename_destination(self, tmp_path):
        exc = OSError(errno.EISDIR, "Is a directory", str(tmp_path / ".x.abc.tmp"), None, str(tmp_path / "x"))
        assert describe_os_error(exc) == f"{tmp_path / 'x'}: Is a directory"

    def test_temporary_file_named_by_its_directory(self, tmp_path):
        exc = OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tokens.parquet.k2j.tmp"))
        assert describe_os_error(exc) == f"{tmp_path}: Read-only file system"

    def test_no_file_name_falls_back_to_out(self, tmp_path):
        exc = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
        assert describe_os_error(exc, tmp_path) == f"{exc} (writing under {tmp_path})"
