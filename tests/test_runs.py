"""The run engine (embedlens.runs): one owner per run directory, identities that survive how a dataset
is addressed, parts that can never be mixed or duplicated, images that are skipped and listed, and the
stats run's reliability fixes on top of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedlens import InputError
from embedlens.datasets import open_dataset
from embedlens.runs import (
    LOCK_FILE,
    RunDir,
    RunLock,
    bootstrap_interval,
    contiguous_batches,
    load_readable,
    path_label,
    shard,
)
from embedlens.runs import items as run_items
from embedlens.taxonomy.stats import TOKENS_FILE, StatsOptions, run_identity, run_stats
from taxonomy_planting import NUM_TOKENS, plant

HOLD_LOCK = """
import sys
from embedlens.runs import RunLock
RunLock(sys.argv[1], "stats").acquire()
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of ``tmp_path / "out"`` until it is killed."""
    started: list[subprocess.Popen] = []

    def start(directory: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class TestLock:
    """Two processes writing one run directory would commit the same items twice; one owns it at a time,
    and a crashed owner must not block the directory forever."""

    def test_live_owner_refused_then_stale_lock_taken_over(self, tmp_path, holder):
        out = tmp_path / "out"
        proc = holder(out)
        with pytest.raises(InputError, match=rf"is in use by pid {proc.pid} on {socket.gethostname()}"):
            RunLock(out, "stats").acquire()
        proc.kill()
        proc.wait()
        lock = RunLock(out, "stats")
        lock.acquire()  # the dead owner's lock is stale
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
        assert list(out.iterdir()) == []  # no lock, no temporary or moved-aside file left behind

    def test_other_host_is_never_taken_over(self, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid"}))
        with pytest.raises(InputError, match=r"in use by pid 1 on elsewhere\.invalid"):
            RunLock(out).acquire()

    def test_damaged_lock_is_stale(self, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / LOCK_FILE).write_text("{half")
        with RunLock(out):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()

    def test_stats_run_into_a_directory_in_use(self, planted, dataset_dir, tmp_path, holder):
        session, anchors = planted
        out = tmp_path / "out"
        proc = holder(out)
        with pytest.raises(InputError, match=f"in use by pid {proc.pid}"):
            run_stats(session, open_dataset(dataset_dir), out, anchors=anchors, progress=False)
        assert not (out / "parts").exists() and not (out / "run.json").exists()

    def test_restart_never_deletes_a_live_run(self, tmp_path, holder):
        run = RunDir(tmp_path / "out", "eval")
        run.open({"a": 1}, restart=False)
        run.commit("s000-b0000000", [{"setting": 0, "index": 0}])
        run.close()
        holder(tmp_path / "out")
        with pytest.raises(InputError, match="in use"):
            RunDir(tmp_path / "out", "eval").open({"a": 2}, restart=True)
        assert (tmp_path / "out" / "parts" / "s000-b0000000.json").exists()


class TestRunDir:
    def test_other_settings_named(self, tmp_path):
        run = RunDir(tmp_path, "eval")
        run.open({"a": 1, "b": 2, "c": 3}, restart=False)
        run.commit("p", [{"index": 0}])
        run.close()
        with pytest.raises(InputError, match=r"holds a eval run with other settings \(b, d\); pass --restart"):
            RunDir(tmp_path, "eval").open({"a": 1, "b": 5, "c": 3, "d": 0}, restart=False)
        assert not (tmp_path / LOCK_FILE).exists()  # a refused open leaves no lock behind

    def test_identity_without_committed_parts_never_blocks(self, tmp_path):
        run = RunDir(tmp_path, "stats")
        run.open({"top_k": 0}, restart=False)  # a run that failed before committing anything
        run.close()
        again = RunDir(tmp_path, "stats")
        again.open({"top_k": 3}, restart=False)
        assert again.identity() == {"top_k": 3}
        again.close()

    def test_replaced_identity_takes_its_uncommitted_data_files_along(self, tmp_path):
        run = RunDir(tmp_path, "align")
        run.open({"batch_size": 2}, restart=False)
        (run.parts / "b0000000.npz").write_bytes(b"killed before its record")
        run.close()
        run.open({"batch_size": 3}, restart=False)
        assert list(run.parts.iterdir()) == [] and run.identity() == {"batch_size": 3}
        run.commit("b0000000", [{"index": 0}])
        run.close()
        (tmp_path / "run.json").write_text("{")
        with pytest.raises(InputError, match=r"run\.json is unreadable .*; pass --restart"):
            run.open({"batch_size": 3}, restart=False)

    def test_records_keep_the_first_commit_of_each_item(self, tmp_path):
        run = RunDir(tmp_path, "x")
        run.open({}, restart=False)
        run.commit("b0", [{"index": 0, "v": "first"}, {"index": 1, "v": "first"}])
        run.commit("b1", [{"index": 1, "v": "again"}, {"index": 2, "v": "first"}])
        (run.parts / "b2.json").write_text("[{")  # an interrupted write: not committed
        records = run.records(lambda r: r["index"])
        assert {k: r["v"] for k, r in records.items()} == {0: "first", 1: "first", 2: "first"}
        owners = run.claimed(lambda r: [r["index"]])
        assert owners[1].marker.name == "b0.json" and owners[2].marker.name == "b1.json"
        run.close()


class TestItems:
    def test_contiguous_batches_and_shards(self):
        class Item:
            def __init__(self, index: int) -> None:
                self.index = index

        items = [Item(i) for i in (0, 1, 2, 4, 5, 6, 7, 9)]
        batches = contiguous_batches(items, 3)
        assert [[i.index for i in b] for b in batches] == [[0, 1, 2], [4, 5, 6], [7], [9]]
        shares = [shard(items, r, 3) for r in range(3)]
        assert [i for s in shares for i in s] == items and max(map(len, shares)) - min(map(len, shares)) <= 1

    def test_unreadable_and_refused_images_are_listed(self, tmp_path, make_image, monkeypatch):
        good, broken, huge = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
        make_image(0).save(good)
        broken.write_bytes(b"junk")
        make_image(1).save(huge)
        real = run_items.load_image

        def refuses_huge(path):
            if Path(path) == huge:
                raise InputError(f"image {path} is too large")
            return real(path)

        monkeypatch.setattr(run_items, "load_image", refuses_huge)
        readable, skipped = load_readable([good, broken, huge], path=lambda p: p)
        assert [p for p, _ in readable] == [good] and readable[0][1].mode == "RGB"
        assert [p for p, _ in skipped] == [broken, huge]
        assert "cannot read image" in skipped[0][1] and "too large" in skipped[1][1]

    def test_path_labels(self, tmp_path):
        (tmp_path / "ds").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "ds")
        assert path_label(tmp_path / "link" / "a.png", tmp_path / "ds") == "a.png"
        assert path_label(tmp_path / "ds" / "x" / "a.png", tmp_path / "ds" / "q.jsonl") == "x/a.png"
        assert path_label(tmp_path / "b.png", tmp_path / "ds") == (tmp_path / "b.png").resolve().as_posix()

    def test_one_bootstrap_for_means_and_shares(self):
        values = np.random.default_rng(0).normal(size=200)
        low, high = bootstrap_interval(values, 500, 0.9, 1)
        assert low.shape == (1,) and low[0] < values.mean() < high[0]
        counts = np.array([[3, 1], [1, 3], [2, 2]])
        low, high = bootstrap_interval(counts, 300, 0.9, 1, weights=counts.sum(axis=1))
        assert np.allclose(low + high[::-1], 1.0)  # the two shares mirror each other in every resample
        assert np.isnan(bootstrap_interval(np.zeros((0, 2)), 10, 0.9, 0)[0]).all()
        assert np.isnan(bootstrap_interval(np.zeros(0), 10, 0.9, 0)[1]).all()


# --------------------------------------------------------------------------- stats on the engine
GOOD = 4


@pytest.fixture
def dataset_dir(tmp_path, make_image) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(GOOD):
        make_image(i).save(folder / f"im{i}.png")
    (folder / "im9-broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture
def planted(fresh_tiny):
    anchors, _ = plant(fresh_tiny)
    return fresh_tiny, anchors


def stats(session, anchors, source, out, **kwargs):
    calls: list[object] = []
    options = kwargs.pop("options", StatsOptions(batch_size=2))
    summary = run_stats(
        session, open_dataset(source), out, anchors=anchors, options=options, progress=False, on_batch=calls.append
    )
    return summary, calls


class TestStatsRuns:
    def test_addressed_differently_or_moved_still_resumes(self, planted, dataset_dir, tmp_path, monkeypatch):
        session, anchors = planted
        whole, calls = stats(session, anchors, dataset_dir, tmp_path / "out")
        assert calls  # work was done
        monkeypatch.chdir(dataset_dir.parent)
        again, calls = stats(session, anchors, Path(dataset_dir.name), tmp_path / "out")  # relative path
        assert calls == [] and again.data == whole.data
        (tmp_path / "link").symlink_to(dataset_dir)
        shutil.move(tmp_path / "out", tmp_path / "moved")
        again, calls = stats(session, anchors, tmp_path / "link", tmp_path / "moved")  # symlink, moved run
        assert calls == [] and again.data == whole.data
        assert whole.data["images"]["skipped"] == 1  # the unreadable image is listed, not fatal

    def test_identity_ignores_which_images_were_readable(self, planted, dataset_dir, tmp_path, make_image):
        session, anchors = planted
        before = run_identity(session, open_dataset(dataset_dir), anchors, StatsOptions())
        make_image(9).save(dataset_dir / "im9-broken.png")  # now readable
        assert run_identity(session, open_dataset(dataset_dir), anchors, StatsOptions()) == before

    def test_other_batch_size_refused_and_merge_never_duplicates(self, planted, dataset_dir, tmp_path):
        session, anchors = planted
        out = tmp_path / "out"
        whole, _ = stats(session, anchors, dataset_dir, out)
        with pytest.raises(InputError, match=r"other settings \(batch_size\)"):
            stats(session, anchors, dataset_dir, out, options=StatsOptions(batch_size=3))
        # even parts committed twice (by hand here) cannot duplicate a row
        for part in (out / "parts").glob("r000-b000000.*"):
            shutil.copy(part, out / "parts" / part.name.replace("r000", "r001"))
        merged, calls = stats(session, anchors, dataset_dir, out)
        tokens = pd.read_parquet(out / TOKENS_FILE)
        assert calls == [] and merged.data == whole.data
        assert len(tokens) == GOOD * NUM_TOKENS and not tokens.duplicated(["image_index", "index"]).any()

    def test_refused_settings_leave_nothing_that_blocks(self, planted, dataset_dir, tmp_path):
        session, anchors = planted
        out = tmp_path / "out"
        with pytest.raises(InputError, match="top-k must be a positive integer"):
            stats(session, anchors, dataset_dir, out, options=StatsOptions(top_k=0))
        assert not out.exists()
        summary, _ = stats(session, anchors, dataset_dir, out, options=StatsOptions(top_k=2))
        assert summary.data["rule"]["top_k"] == 2

    def test_out_inside_the_dataset_folder(self, planted, dataset_dir):
        session, anchors = planted
        out = dataset_dir / "results"
        first, _ = stats(session, anchors, dataset_dir, out)
        assert (out / "heatmap.png").is_file()
        again, calls = stats(session, anchors, dataset_dir, out)  # its heatmap is not a new image
        assert calls == [] and again.data == first.data and again.data["images"]["total"] == GOOD + 1

    def test_placeholder_prompt_row_skipped_before_any_work(self, planted, tmp_path, make_image):
        session, anchors = planted
        make_image(0).save(tmp_path / "a.png")
        rows = [{"image": "a.png"}, {"image": "a.png", "prompt": "Look: <image> here"}, {"image": "a.png"}]
        source = tmp_path / "d.jsonl"
        source.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows), encoding="utf-8")  # with a BOM
        summary, _ = stats(session, anchors, source, tmp_path / "out")
        assert summary.data["images"]["used"] == 2
        (problem,) = summary.data["dataset"]["malformed"]
        assert problem.startswith("line 2: the prompt contains the image placeholder '<image>'")
        with pytest.raises(InputError, match="--prompt: the prompt contains the image placeholder"):
            stats(session, anchors, source, tmp_path / "o2", options=StatsOptions(prompt="<image> what?"))
