"""Ctrl-C ends a command with exit code 130 and one line on stderr: ``embedlens: interrupted; rerun the
same command to resume`` for the commands that resume (stats, eval, align, inject-sweep, train-mini),
``embedlens: interrupted`` for the others. Never exit code 0, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from embedlens.cli.app import RESUMABLE
from embedlens.models import loading
from helpers import random_image, run_cli

RESUME_LINE = "embedlens: interrupted; rerun the same command to resume\n"
PLAIN_LINE = "embedlens: interrupted\n"

#: Runs the command line with every image opening slowed down, so that a batch is committed well
#: before the run ends (PIL is a stable seam, whatever the run engine looks like).
SLOW_MAIN = """
import signal, sys, time
# Started from a background job, a process may inherit SIGINT ignored (then Python installs no handler):
# give it the Ctrl-C handler a command run from a terminal has.
signal.signal(signal.SIGINT, signal.default_int_handler)
import PIL.Image
_open = PIL.Image.open
def slow_open(*args, **kwargs):
    time.sleep(0.25)
    return _open(*args, **kwargs)
PIL.Image.open = slow_open
from embedlens.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def interrupting_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model loader raises KeyboardInterrupt, as if Ctrl-C came while the model loads."""

    def interrupt(name: str, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_adapter", interrupt)


class TestInProcess:
    def test_probe_is_not_resumable(self, capsys, interrupting_loader, image_path, tiny_dir):
        code, out, err = run_cli(capsys, "probe", image_path, "-m", tiny_dir)
        assert (code, out, err) == (130, "", PLAIN_LINE)

    def test_discover_anchors_is_not_resumable(self, capsys, interrupting_loader, image_folder, tmp_path):
        code, out, err = run_cli(capsys, "discover-anchors", image_folder, "--out", tmp_path / "a.json")
        assert (code, out, err) == (130, "", PLAIN_LINE)

    def test_stats_is_resumable(self, capsys, interrupting_loader, image_folder, tiny_anchor_file, tmp_path):
        args = ["stats", image_folder, "--anchors", tiny_anchor_file, "--out", tmp_path / "o"]
        code, out, err = run_cli(capsys, *args)
        assert (code, out, err) == (130, "", RESUME_LINE)

    def test_resumable_commands_exist(self):
        import typer

        from embedlens.cli import app

        names = set(typer.main.get_command(app).commands)
        assert names >= RESUMABLE


def _wait_for(predicate, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the command ended (rc {process.returncode}) before a batch was committed: {err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no batch was committed in time")
        time.sleep(0.05)


def test_stats_sigint_after_a_commit_then_resume(capsys, tiny_dir, tiny_anchor_file, tmp_path):
    """A real process: SIGINT once the first batch is committed -> 130 and the resume line; the same
    command run again (here in-process, to spare a second interpreter start) finishes the dataset."""
    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):
        random_image(i).save(data / f"{i:02d}.png")
    out = tmp_path / "out"
    args = ["stats", str(data), "-m", str(tiny_dir), "--anchors", str(tiny_anchor_file), "--out", str(out)]
    args += ["--device", "cpu", "--batch-size", "1", "--bootstrap", "10", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_MAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    _wait_for(lambda: any((out / "parts").glob("*.json")), process, seconds=120)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == RESUME_LINE
    assert stdout == ""

    assert any((out / "parts").glob("*.json"))  # the committed batch is kept
    code, again, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "16 images used of 16" in again
