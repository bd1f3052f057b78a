"""Every command on every class of bad input: exit 2 (130 when interrupted), one line on stderr, no
traceback, and nothing half-written; plus positive controls that must succeed.

The matrix is one list, :data:`CASES`, run by one parametrised test. Each case is a real process that
runs the command line's ``run()`` entry point, with its own stdout, stderr and exit status:

- Most cases are forked from a *zygote*, a fresh interpreter that imports torch, transformers and
  EmbedLens once (each interpreter start costs about 5 CPU-seconds of imports, too much for 70 cases
  on 2 cores). A child does exactly what ``python -c "from embedlens.cli import run; run()" ARGS``
  does after its imports: sets ``sys.argv``, calls ``run()``, prints an uncaught exception through
  ``sys.excepthook`` and runs the ``atexit`` handlers. What the imports themselves print would show in
  every real run, so the zygote's own stdout and stderr must be empty.
- Cases marked ``fresh`` start a new interpreter as users do, a cross-check of the zygote.

All cases run once, in the module fixture :func:`outcomes` (two at a time); each test then checks its
case's recorded outcome and files. The tiny random LLaVA of ``conftest.py`` keeps model runs short.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from PIL import Image

#: How a fresh interpreter runs the command line (works for ``embedlens/cli.py`` and an ``embedlens/cli/`` package).
CLI = ("-c", "from embedlens.cli import run; run()")
#: Commands that take ``--device`` (``cpu`` is added) and ``--progress`` (``--no-progress`` is added).
DEVICE_COMMANDS = {"probe", "classify", "generate", "stats", "discover-anchors", "eval", "align", "inject-sweep"}
PROGRESS_COMMANDS = {"stats", "discover-anchors", "make-patchbench", "eval", "align", "inject-sweep"}
#: Seconds one case may run before it is killed (a hang is a failure, not a stuck suite).
CASE_TIMEOUT = 90.0
#: Temporary files of ``embedlens.files`` (``.NAME.XXXX.tmp``): none may survive a failed or interrupted run.
TEMP_NAME = re.compile(r"^\..*\.tmp$")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "mkfifo"), reason="needs fork and FIFOs")


@dataclass(frozen=True)
class Case:
    """One command line and what must come of it.

    Attributes:
        id: Test id: ``command-what``.
        args: Arguments after the program name; ``{name}`` is replaced by the workspace path ``name``.
        expect: ``"error"`` (exit 2, one stderr line), ``"ok"`` (exit 0, stderr empty), ``"warn"`` (exit
            0, one stderr line: the skipped rows) or ``"interrupt"`` (exit 130 after SIGINT, one line).
        out: The placeholder the case passes as ``--out``: ``out`` (does not exist yet), ``out_file``
            (an existing file), ``out_full`` (an existing directory with content) or ``ro_out`` (under a
            read-only location). After an error nothing may be left in a new ``--out`` and an existing
            one must be byte-for-byte unchanged.
        stderr: Regex the stderr line must contain.
        stdout: Regex stdout must contain.
        check: Further checks, ``check(case, outcome, workspace)``.
        fresh: Run in a new interpreter instead of a child of the zygote.
        interrupt_after: Seconds after the start at which SIGINT is sent (``expect="interrupt"``).
        resumable: After an interrupt, committed batches may stay in ``--out`` (temporary files may not).
    """

    id: str
    args: tuple[str, ...]
    expect: str = "error"
    out: str | None = None
    stderr: str | None = None
    stdout: str | None = None
    check: Callable[[Case, Outcome, Workspace], None] | None = None
    fresh: bool = False
    interrupt_after: float | None = None
    resumable: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one case's process did."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


@dataclass
class Workspace:
    """Files the cases use (``paths``: placeholder -> path) and per-case folders under ``root/cases``."""

    root: Path
    paths: dict[str, str]
    references: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)

    def case_dir(self, case: Case) -> Path:
        return self.root / "cases" / case.id

    def case_paths(self, case: Case) -> dict[str, str]:
        """The shared paths plus this case's own ``out``, ``out_file``, ``out_full`` and ``ro_out``."""
        folder = self.case_dir(case)
        own = {
            "out": folder / "out",
            "out_file": folder / "out.txt",
            "out_full": folder / "full",
            "ro_out": Path(self.paths["readonly"]) / case.id / "out",
        }
        return {**self.paths, **{name: str(path) for name, path in own.items()}}

    def argv(self, case: Case) -> list[str]:
        paths = self.case_paths(case)
        return [arg.format(**paths) for arg in case.args]

    def out_path(self, case: Case) -> Path | None:
        return None if case.out is None else Path(self.case_paths(case)[case.out])


def cmd(text: str, *, model: bool = True) -> tuple[str, ...]:
    """``"probe {image} -k 0"`` -> argument tuple, with ``--model {model}``, ``--device cpu`` and
    ``--no-progress`` added where the command takes them (split on spaces before placeholders are filled,
    so paths with spaces stay whole)."""
    args = text.split()
    command = args[0]
    if model and command != "train-mini" and "--model" not in args:
        args += ["--model", "{model}"]
    if command in DEVICE_COMMANDS:
        args += ["--device", "cpu"]
    if command in PROGRESS_COMMANDS:
        args.append("--no-progress")
    return tuple(args)


# --------------------------------------------------------------------------- positive-control checks
def _same_probe(reference: str) -> Callable[[Case, Outcome, Workspace], None]:
    """The probe JSON equals the in-process probe of ``reference`` (and differs from a white image's)."""

    def check(case: Case, outcome: Outcome, workspace: Workspace) -> None:
        tokens = json.loads(outcome.stdout)["tokens"]
        ids = [token["top_ids"] for token in tokens]
        norms = np.array([token["norm"] for token in tokens])
        expected, white = workspace.references[reference], workspace.references["white"]
        assert ids == expected.top_ids.tolist()
        np.testing.assert_allclose(norms, expected.norm, rtol=1e-4)
        assert not np.allclose(norms, white.norm, rtol=1e-3), "the image was decoded as white"

    return check


def _files_written(*names: str) -> Callable[[Case, Outcome, Workspace], None]:
    """The run wrote ``names`` into its ``--out`` folder."""

    def check(case: Case, outcome: Outcome, workspace: Workspace) -> None:
        out = workspace.out_path(case) or Path(workspace.case_paths(case)["out"])
        for name in names:
            assert (out / name).is_file(), f"{name} missing in {out}"

    return check


def _anchors_written(case: Case, outcome: Outcome, workspace: Workspace) -> None:
    """``discover-anchors`` wrote an anchors file that reads back."""
    from embedlens.taxonomy import Anchors

    Anchors.load(Path(workspace.case_paths(case)["out"]))


SKIPS_LINE_2 = r"line 2\b"
INTERVENE = "generate {good} --prompt {question} --intervene"
STATS = "stats {ds_good} --anchors {anchors} --out {out}"
ALIGN = "align {ds_good} --anchors {anchors} --out {out}"

CASES: list[Case] = [
    # ---------------------------------------------------------------- probe: images
    Case("probe-missing-image", cmd("probe {missing}"), stderr="not found"),
    Case("probe-directory-as-image", cmd("probe {folder}"), stderr="directory"),
    Case("probe-corrupt-image", cmd("probe {corrupt}")),
    Case("probe-truncated-image", cmd("probe {truncated}")),
    Case("probe-zero-byte-image", cmd("probe {empty}")),
    Case("probe-fifo", cmd("probe {fifo}"), stderr="FIFO", fresh=True),
    Case("probe-device", cmd("probe /dev/zero"), stderr="device"),
    Case("probe-huge-image", cmd("probe {huge}"), stderr="megapixels", fresh=True),
    Case("probe-16-bit-png", cmd("probe {gray16} --json -k 3"), expect="ok", check=_same_probe("gray8")),
    Case("probe-half-transparent", cmd("probe {alpha} --json -k 3"), expect="ok", check=_same_probe("blend")),
    # ---------------------------------------------------------------- probe: options and files
    Case("probe-top-k-zero", cmd("probe {good} --top-k 0"), stderr="top-k"),
    Case("probe-top-k-negative", cmd("probe {good} -k -3"), stderr="top-k"),
    Case("probe-top-k-not-a-number", cmd("probe {good} --top-k many"), stderr="top-k"),
    Case("probe-layer-too-high", cmd("probe {good} --layer 99"), stderr="layer"),
    Case("probe-layer-too-low", cmd("probe {good} --layer -99"), stderr="layer"),
    Case("probe-out-is-a-file", cmd("probe {good} --out {out_file}"), out="out_file"),
    Case("probe-out-read-only", cmd("probe {good} --out {ro_out}"), out="ro_out"),
    Case("probe-out-under-a-file", cmd("probe {good} --out {out_file}/sub"), out="out_file"),
    Case("probe-model-dir-missing", cmd("probe {good} --model {missing_model}")),
    Case("probe-model-dir-empty", cmd("probe {good} --model {folder}")),
    # ---------------------------------------------------------------- classify
    Case("classify-anchors-corrupt", cmd("classify {good} --anchors {anchors_corrupt}"), stderr="anchors"),
    Case("classify-anchors-missing", cmd("classify {good} --anchors {missing}")),
    Case("classify-anchors-other-vocabulary", cmd("classify {good} --anchors {anchors_other}"), stderr="vocabulary"),
    Case("classify-top-k-zero", cmd("classify {good} --anchors {anchors} -k 0"), stderr="top-k"),
    Case("classify-huge-image", cmd("classify {huge} --anchors {anchors}"), stderr="megapixels"),
    Case("classify-16-bit-png", cmd("classify {gray16} --anchors {anchors} --json"), expect="ok"),
    Case("classify-out-is-a-file", cmd("classify {good} --anchors {anchors} --out {out_file}"), out="out_file"),
    # ---------------------------------------------------------------- generate: intervention notation
    Case("generate-scale-nan", cmd(f"{INTERVENE} scale:nan"), stderr="nan"),
    Case("generate-scale-inf", cmd(f"{INTERVENE} scale:inf"), stderr="inf"),
    Case("generate-unknown-group", cmd(f"{INTERVENE} prune:nosuchgroup"), stderr="nosuchgroup"),
    Case("generate-seed-not-integer", cmd(f"{INTERVENE} prune:dead,select=matched_random,seed=1.5"), stderr="seed"),
    Case("generate-layer-out-of-range", cmd(f"{INTERVENE} exit@99"), stderr="99"),
    Case("generate-missing-image", cmd("generate {missing} --prompt {question}"), stderr="not found"),
    Case("generate-fifo", cmd("generate {fifo} --prompt {question}"), stderr="FIFO"),
    Case("generate-max-new-tokens-zero", cmd("generate {good} --prompt {question} --max-new-tokens 0")),
    Case("generate-no-prompt", cmd("generate {good}"), stderr="prompt"),
    # ---------------------------------------------------------------- stats: datasets and options
    Case(
        "stats-dataset-bad-row",
        cmd("stats {ds_bad_row} --anchors {anchors} --out {out} --bootstrap 10"),
        expect="warn",
        stderr=SKIPS_LINE_2,
        stdout=r"2 images used of 2",
        check=_files_written("summary.json"),
    ),
    Case(
        "stats-dataset-image-token-in-prompt",
        cmd("stats {ds_image_token} --anchors {anchors} --out {out} --bootstrap 10"),
        expect="warn",
        stderr=SKIPS_LINE_2,
        check=_files_written("summary.json"),
    ),
    Case(
        "stats-dataset-bom",
        cmd("stats {ds_bom} --anchors {anchors} --out {out} --bootstrap 10"),
        expect="ok",
        stdout=r"2 images used of 2",
    ),
    Case(
        "stats-folder-with-bad-images",
        cmd("stats {ds_folder} --anchors {anchors} --out {out} --bootstrap 10"),
        expect="ok",
        stdout=r"(?s)3 images used of 7.*skipped 4 unreadable",
    ),
    Case("stats-batch-size-zero", cmd(STATS + " --batch-size 0"), out="out"),
    Case("stats-batch-size-negative", cmd(STATS + " --batch-size -2"), out="out"),
    Case("stats-top-k-zero", cmd(STATS + " -k 0"), out="out"),
    Case("stats-out-is-a-file", cmd("stats {ds_good} --anchors {anchors} --out {out_file}"), out="out_file"),
    Case("stats-out-read-only", cmd("stats {ds_good} --anchors {anchors} --out {ro_out}"), out="ro_out"),
    Case("stats-dataset-missing", cmd("stats {missing} --anchors {anchors} --out {out}"), out="out"),
    Case("stats-anchors-corrupt", cmd("stats {ds_good} --anchors {anchors_corrupt} --out {out}"), out="out"),
    Case("stats-model-dir-missing", cmd(STATS + " --model {missing_model}"), out="out"),
    Case(
        "stats-existing-run-kept-on-error",
        cmd("stats {ds_good} --anchors {anchors_corrupt} --out {out_full}"),
        out="out_full",
    ),
    Case(
        "stats-interrupted",
        cmd("stats {ds_long} --anchors {anchors} --out {out} --batch-size 1 --bootstrap 10"),
        expect="interrupt",
        out="out",
        interrupt_after=3.0,
        resumable=True,
    ),
    # ---------------------------------------------------------------- discover-anchors
    Case("discover-out-is-a-directory", cmd("discover-anchors {ds_good} --out {out_full}"), out="out_full"),
    Case("discover-out-read-only", cmd("discover-anchors {ds_good} --out {ro_out}"), out="ro_out"),
    Case("discover-batch-size-zero", cmd("discover-anchors {ds_good} --out {out} --batch-size 0"), out="out"),
    Case("discover-top-k-zero", cmd("discover-anchors {ds_good} --out {out} --top-k 0"), out="out"),
    Case("discover-min-fraction-above-1", cmd("discover-anchors {ds_good} --out {out} --min-fraction 1.5"), out="out"),
    Case("discover-dataset-missing", cmd("discover-anchors {missing} --out {out}"), out="out"),
    Case(
        "discover-dataset-bad-row",
        cmd("discover-anchors {ds_bad_row} --out {out}"),
        expect="warn",
        stderr=SKIPS_LINE_2,
        check=_anchors_written,
    ),
    # ---------------------------------------------------------------- make-patchbench
    Case("patchbench-per-category-zero", cmd("make-patchbench --out {out} --per-category 0"), out="out"),
    Case("patchbench-unknown-category", cmd("make-patchbench --out {out} --categories smell"), out="out"),
    Case("patchbench-out-is-a-file", cmd("make-patchbench --out {out_file} --per-category 1"), out="out_file"),
    Case("patchbench-out-read-only", cmd("make-patchbench --out {ro_out} --per-category 1"), out="ro_out"),
    Case("patchbench-model-dir-missing", cmd("make-patchbench --out {out} --model {missing_model}"), out="out"),
    Case(
        "patchbench-interrupted",
        cmd("make-patchbench --out {out} --per-category 100000"),
        expect="interrupt",
        out="out",
        interrupt_after=3.0,
    ),
    # ---------------------------------------------------------------- eval
    Case("eval-dataset-missing", cmd("eval {missing} --out {out}"), out="out"),
    Case("eval-scale-nan", cmd("eval {questions} --out {out} --intervention scale:nan"), out="out", stderr="nan"),
    Case("eval-unknown-group", cmd("eval {questions} --out {out} --intervention prune:nosuchgroup"), out="out"),
    Case("eval-batch-size-zero", cmd("eval {questions} --out {out} --batch-size 0"), out="out"),
    Case("eval-seeds-not-integers", cmd("eval {questions} --out {out} --preset paper-pruning --seeds 1.5"), out="out"),
    Case(
        "eval-anchors-corrupt",
        cmd("eval {questions} --out {out} --intervention prune:dead --anchors {anchors_corrupt}"),
        out="out",
    ),
    Case("eval-out-is-a-file", cmd("eval {questions} --out {out_file}"), out="out_file"),
    Case(
        "eval-dataset-bad-row",
        cmd("eval {questions_bad_row} --out {out} --max-new-tokens 2 --bootstrap 10"),
        expect="warn",
        stderr=SKIPS_LINE_2,
        check=_files_written("table.md"),
    ),
    # ---------------------------------------------------------------- align
    Case("align-lens-layer-out-of-range", cmd(ALIGN + " --lens-layers 99"), out="out"),
    Case("align-lens-layers-garbage", cmd(ALIGN + " --lens-layers x-y"), out="out"),
    Case("align-batch-size-zero", cmd(ALIGN + " --batch-size 0"), out="out"),
    Case("align-text-missing", cmd(ALIGN + " --text {missing}"), out="out"),
    Case("align-out-is-a-file", cmd("align {ds_good} --anchors {anchors} --out {out_file}"), out="out_file"),
    # ---------------------------------------------------------------- inject-sweep
    Case("sweep-layer-out-of-range", cmd("inject-sweep {questions} --out {out} --layers 99"), out="out"),
    Case("sweep-scale-nan", cmd("inject-sweep {questions} --out {out} --scales nan"), out="out"),
    Case("sweep-batch-size-zero", cmd("inject-sweep {questions} --out {out} --batch-size 0"), out="out"),
    Case("sweep-dataset-missing", cmd("inject-sweep {missing} --out {out}"), out="out"),
    # ---------------------------------------------------------------- train-mini
    Case("train-steps-zero", cmd("train-mini --out {out} --steps 0"), out="out"),
    Case("train-lora-rank-negative", cmd("train-mini --out {out} --lora-rank -1"), out="out"),
    Case("train-loss-per-unknown", cmd("train-mini --out {out} --loss-per word"), out="out"),
    Case("train-out-is-a-file", cmd("train-mini --out {out_file}"), out="out_file"),
    Case("train-out-read-only", cmd("train-mini --out {ro_out} --steps 1 --images 1"), out="ro_out"),
]


# --------------------------------------------------------------------------- the zygote
#: Imported once by the zygote so children skip it (third-party modules; EmbedLens modules that moved are skipped).
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.models.llava.modeling_llava",
    "pyarrow.parquet",
    "typer",
    "embedlens",
    "embedlens.cli",
    "embedlens.taxonomy.stats",
    "embedlens.taxonomy.discover",
    "embedlens.bench.runner",
    "embedlens.bench.patchbench",
    "embedlens.analysis.alignment",
    "embedlens.analysis.sweep",
)


def _zygote(requests_file: str, results_file: str) -> None:
    """Import :data:`PRELOAD`, then fork one child per job (``jobs`` at a time) and record each exit status."""
    # A process started from a background job of a non-interactive shell inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler; give the children the handler a terminal's command has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith("embedlens.") or exc.name != name:
                raise
    request = json.loads(Path(requests_file).read_text(encoding="utf-8"))
    waiting, running, results = list(request["cases"]), {}, {}
    while waiting or running:
        while waiting and len(running) < request["jobs"]:
            job = waiting.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = (job, time.monotonic(), False)
        time.sleep(0.02)
        for pid, (job, started, signalled) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.monotonic() - started
            if done:
                del running[pid]
                results[job["id"]] = {"code": os.waitstatus_to_exitcode(status), "seconds": elapsed, "timed_out": False}
            elif elapsed > request["timeout"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del running[pid]
                results[job["id"]] = {"code": -9, "seconds": elapsed, "timed_out": True}
            elif job["interrupt_after"] is not None and not signalled and elapsed > job["interrupt_after"]:
                os.kill(pid, signal.SIGINT)
                running[pid] = (job, started, True)
    Path(results_file).write_text(json.dumps(results), encoding="utf-8")


def _child(job: dict[str, Any]) -> NoReturn:
    """Become ``embedlens ARGS`` with stdout and stderr in files; never returns."""
    code = 1
    try:
        os.chdir(job["cwd"])
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        streams = [(os.devnull, os.O_RDONLY), (job["stdout"], write), (job["stderr"], write)]
        for fd, (target, flags) in enumerate(streams):
            os.dup2(os.open(target, flags, 0o644), fd)
        sys.argv = ["embedlens", *job["args"]]
        from embedlens.cli import run

        try:
            run()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                sys.stderr.write(f"{exc.code}\n")
        except BaseException:  # what the interpreter does with an uncaught exception
            sys.excepthook(*sys.exc_info())
        atexit._run_exitfuncs()
    except BaseException:  # the harness itself failed: say so in the case's stderr
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


# --------------------------------------------------------------------------- the workspace
def _huge_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels in a few kB (the header is what matters)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _noise(seed: int, path: Path) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _jsonl(path: Path, rows: list[Any], *, bom: bool = False) -> Path:
    text = "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def _readonly_location(root: Path) -> Path:
    """A folder nothing can be created in: mode 0o555, or for root (who ignores modes) a path in sysfs."""
    if os.geteuid() != 0:
        folder = root / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/embedlens-test-readonly")


def _snapshot(path: Path | None) -> Any:
    """Everything at ``path`` (names and bytes), to compare before and after a run."""
    if path is None or not (path.exists() or path.is_symlink()):
        return None
    if not path.is_dir():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(path.rglob("*"))}


def _build(root: Path, tiny_dir: Path, anchors_file: Path) -> Workspace:
    images = root / "images"
    images.mkdir()
    good = _noise(0, images / "good.png")
    _noise(1, images / "other.png")
    Image.fromarray(np.full((56, 56), 32768, np.uint16)).save(images / "gray16.png")
    Image.new("RGB", (56, 56), (128, 128, 128)).save(images / "gray8.png")
    Image.new("RGB", (56, 56), (255, 255, 255)).save(images / "white.png")
    Image.new("RGBA", (56, 56), (255, 0, 0, 128)).save(images / "alpha.png")
    Image.new("RGB", (56, 56), (255, 127, 127)).save(images / "blend.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (images / "truncated.png").write_bytes(good.read_bytes()[:600])
    (images / "empty.png").write_bytes(b"")
    _huge_png(images / "huge.png")
    os.mkfifo(images / "fifo.png")

    folder = root / "folder-dataset"
    folder.mkdir()
    for name in ["good.png", "other.png", "gray16.png", "corrupt.png", "truncated.png", "empty.png", "huge.png"]:
        (folder / name).write_bytes((images / name).read_bytes())
    os.mkfifo(folder / "fifo.png")  # not a regular file: not listed at all

    row = {"image": "images/good.png", "prompt": "What is this?"}
    row2 = {"image": "images/other.png"}
    question = {"image": "images/good.png", "question": "Colour?", "answers": ["red"], "type": "exact"}
    anchors = json.loads(anchors_file.read_text(encoding="utf-8"))
    (root / "anchors-other.json").write_text(json.dumps({**anchors, "vocab_hash": "0" * 64}), encoding="utf-8")
    (root / "anchors-corrupt.json").write_text('{"model": "tiny", "groups": {"dead": [1, ', encoding="utf-8")
    (root / "full").mkdir()
    paths = {
        "model": str(tiny_dir),
        "missing_model": str(root / "no-such-model"),
        "question": "What is this?",
        "good": str(good),
        "missing": str(root / "missing.png"),
        "folder": str(root / "full"),
        "readonly": str(_readonly_location(root)),
        "anchors": str(anchors_file),
        "anchors_other": str(root / "anchors-other.json"),
        "anchors_corrupt": str(root / "anchors-corrupt.json"),
        "ds_folder": str(folder),
        "ds_bad_row": str(_jsonl(root / "bad-row.jsonl", [row, "{not json", row2])),
        "ds_image_token": str(
            _jsonl(root / "image-token.jsonl", [row, {"image": "images/good.png", "prompt": "Is <image> red?"}, row2])
        ),
        "ds_good": str(_jsonl(root / "good.jsonl", [row, row2])),
        "ds_bom": str(_jsonl(root / "bom.jsonl", [row, row2], bom=True)),
        "ds_long": str(_jsonl(root / "long.jsonl", [row2] * 2000)),
        "questions": str(_jsonl(root / "questions.jsonl", [question, {**question, "image": "images/other.png"}])),
        "questions_bad_row": str(_jsonl(root / "questions-bad.jsonl", [question, "[1, 2", question])),
    }
    paths.update({name: str(images / f"{name}.png") for name in ["gray16", "alpha", "corrupt", "truncated"]})
    paths.update({name: str(images / f"{name}.png") for name in ["empty", "huge", "fifo"]})
    return Workspace(root=root, paths=paths)


def _prepare_case(workspace: Workspace, case: Case) -> None:
    """Make the case's folder, its existing ``--out`` file and directory, and record what they hold."""
    folder = workspace.case_dir(case)
    folder.mkdir(parents=True)
    (folder / "out.txt").write_text("keep me\n", encoding="utf-8")
    (folder / "full").mkdir()
    (folder / "full" / "notes.txt").write_text("an earlier result\n", encoding="utf-8")
    (folder / "full" / "sub").mkdir()
    (folder / "full" / "sub" / "data.bin").write_bytes(bytes(range(64)))
    workspace.before[case.id] = _snapshot(workspace.out_path(case))


# --------------------------------------------------------------------------- fixtures and the test
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny, tiny_dir, tiny_anchor_file) -> Workspace:
    """Images, datasets, anchors and per-case folders; in-process probes of the reference images."""
    built = _build(tmp_path_factory.mktemp("bad-inputs"), tiny_dir, tiny_anchor_file)
    for name in ["gray8", "white", "blend"]:
        built.references[name] = tiny.probe(str(built.root / "images" / f"{name}.png"), top_k=3)
    return built


def _environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"EMBEDLENS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    )
    return env


@pytest.fixture(scope="module")
def outcomes(workspace, embedlens_cache, request) -> dict[str, Outcome]:
    """Run every selected case once (zygote children two at a time, fresh interpreters beside them)."""
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)
    }
    chosen = [case for case in CASES if case.id in selected]
    for case in chosen:
        _prepare_case(workspace, case)
    env = _environment(embedlens_cache)
    jobs = [
        {
            "id": case.id,
            "args": workspace.argv(case),
            "cwd": str(workspace.root),
            "stdout": str(workspace.case_dir(case) / "stdout.txt"),
            "stderr": str(workspace.case_dir(case) / "stderr.txt"),
            "interrupt_after": case.interrupt_after,
        }
        for case in chosen
        if not case.fresh
    ]
    fresh = {
        case.id: subprocess.Popen(
            [sys.executable, *CLI, *workspace.argv(case)],
            cwd=workspace.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in chosen
        if case.fresh
    }
    started = time.monotonic()
    requests_file, results_file = workspace.root / "requests.json", workspace.root / "results.json"
    requests_file.write_text(json.dumps({"cases": jobs, "jobs": 2, "timeout": CASE_TIMEOUT}), encoding="utf-8")
    zygote = subprocess.run(
        [sys.executable, __file__, "--zygote", str(requests_file), str(results_file)],
        cwd=workspace.root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT * len(jobs) / 2 + 120,
        check=False,
    )
    assert (zygote.returncode, zygote.stdout, zygote.stderr) == (0, "", ""), "imports alone printed or failed"
    recorded = json.loads(results_file.read_text(encoding="utf-8"))
    results: dict[str, Outcome] = {}
    for job in jobs:
        entry = recorded[job["id"]]
        stdout, stderr = (Path(job[key]).read_text(encoding="utf-8", errors="replace") for key in ("stdout", "stderr"))
        results[job["id"]] = Outcome(entry["code"], stdout, stderr, entry["seconds"], entry["timed_out"])
    for name, process in fresh.items():
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, CASE_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            timed_out = True
        results[name] = Outcome(process.returncode, stdout, stderr, time.monotonic() - started, timed_out)
    return results


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if TEMP_NAME.match(p.name))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input(case: Case, workspace: Workspace, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    shown = f"exit {outcome.code} after {outcome.seconds:.1f} s\n--- stderr\n{outcome.stderr[-3000:]}"
    assert not outcome.timed_out, f"still running after {CASE_TIMEOUT:.0f} s (killed)\n{shown}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    wanted = {"error": 2, "ok": 0, "warn": 0, "interrupt": 130}[case.expect]
    assert outcome.code == wanted, shown
    if case.expect == "ok":
        assert lines == [], shown
    else:
        assert len(lines) == 1, f"expected one line on stderr\n{shown}"
        assert lines[0].startswith("embedlens: "), shown
    if case.stderr is not None:
        assert re.search(case.stderr, lines[0], re.IGNORECASE), shown
    if case.stdout is not None:
        assert re.search(case.stdout, outcome.stdout), f"stdout:\n{outcome.stdout[-3000:]}"
    out = workspace.out_path(case)
    assert _leftovers(workspace.case_dir(case)) == [], "temporary files left behind"
    if out is not None and case.expect in ("error", "interrupt"):
        before, after = workspace.before[case.id], _snapshot(out)
        if before is not None:
            assert after == before, f"the existing --out {out} was changed"
        elif not case.resumable:
            files = [name for name, value in after.items() if value != "<dir>"] if isinstance(after, dict) else after
            assert not files, f"partial output left in the new --out {out}: {files}"
    if case.check is not None:
        case.check(case, outcome, workspace)


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote(sys.argv[2], sys.argv[3])
