"""Dataset statistics: planted groups come out exactly, intervals, resume after a kill, settings
checks, and two gloo processes merging into the same result as one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import embedlens
from embedlens import InputError
from embedlens.datasets import open_dataset
from embedlens.runs import bootstrap_interval
from embedlens.runs import directory as run_directory
from embedlens.taxonomy.stats import (
    IMAGES_FILE,
    SUMMARY_FILE,
    TOKENS_FILE,
    StatsOptions,
    run_stats,
)
from helpers import as_launched, free_port
from taxonomy_planting import NUM_TOKENS, PLANTED, expected_groups, plant

GOOD = 5


@pytest.fixture
def dataset_dir(tmp_path, make_image) -> Path:
    """Five noise images and one file that is not an image (third in sorted order)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(GOOD):
        make_image(i).save(folder / f"im{i}{'a' if i < 2 else 'b'}.png")
    (folder / "im2-broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture
def planted(fresh_tiny):
    anchors, _ = plant(fresh_tiny)
    return fresh_tiny, anchors


def read_tokens(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / TOKENS_FILE)


class TestPlanted:
    def test_counts_rows_and_heatmap(self, planted, dataset_dir, tmp_path):
        session, anchors = planted
        dataset = open_dataset(dataset_dir)
        summary = run_stats(
            session, dataset, tmp_path / "out", anchors=anchors, options=StatsOptions(batch_size=2), progress=False
        )
        data = summary.data
        expected = expected_groups()
        assert data["images"]["total"] == GOOD + 1 and data["images"]["used"] == GOOD
        assert [s["key"] for s in data["images"]["skipped_list"]] == ["im2-broken.png"]
        assert "cannot read image" in data["images"]["skipped_list"][0]["reason"]
        assert data["tokens"] == GOOD * NUM_TOKENS
        for name in ("vit_sink", "llm_sink", "dead", "alive"):
            share = expected.count(name) / NUM_TOKENS
            entry = data["groups"][name]
            assert entry["tokens"] == GOOD * expected.count(name)
            assert entry["fraction"] == pytest.approx(share)
            assert entry["ci"] == pytest.approx([share, share])  # every image is the same
        assert data["overlaps"]["vit_sink+llm_sink"] == GOOD

        tokens = read_tokens(tmp_path / "out")
        assert len(tokens) == GOOD * NUM_TOKENS
        ok = [item for item in dataset.items if item.key != "im2-broken.png"]
        assert tokens["image_index"].tolist() == [item.index for item in ok for _ in range(NUM_TOKENS)]
        assert tokens["image"].tolist() == [item.key for item in ok for _ in range(NUM_TOKENS)]
        assert tokens["index"].tolist() == list(range(NUM_TOKENS)) * GOOD
        assert tokens["group"].tolist() == expected * GOOD
        assert tokens.loc[0, "anchor_id"] == anchors.groups["vit_sink"][0]
        assert tokens["top_ids"].map(len).eq(3).all()

        images = pd.read_parquet(tmp_path / "out" / IMAGES_FILE)
        assert images["status"].tolist() == ["ok", "ok", "unreadable", "ok", "ok", "ok"]
        assert images["count_dead"].dropna().tolist() == [1] * GOOD

        heat = data["heatmap"]
        assert heat["grid"] == [4, 4] and heat["images"] == GOOD
        for name, patch in PLANTED.items():
            cells = np.asarray(heat["fractions"][name])
            assert cells[divmod(patch, 4)] == 1.0
            assert cells.sum() == (2.0 if name == "vit_sink" else 1.0)  # the overlap patch is vit_sink
        assert np.asarray(heat["fractions"]["alive"]).sum() == expected.count("alive")
        assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()) == data
        assert not list((tmp_path / "out").glob(".*.tmp"))

    def test_jsonl_prompts_reach_the_model(self, planted, tmp_path, make_image):
        session, anchors = planted
        make_image(0).save(tmp_path / "a.png")
        lines = [{"image": "a.png", "prompt": "Count the dots."}, {"image": "a.png"}, {"image": 7}]
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
        dataset = open_dataset(tmp_path / "d.jsonl")
        seen = []
        original = session.prepare

        def spy(images, prompts=None, **kwargs):
            seen.extend(prompts)
            return original(images, prompts, **kwargs)

        session.prepare = spy
        options = StatsOptions(prompt="Default?")
        summary = run_stats(session, dataset, tmp_path / "out", anchors=anchors, options=options, progress=False)
        assert seen == ["Count the dots.", "Default?"]
        assert summary.data["dataset"]["malformed"] == ['line 3: no "image" path']


class TestInterval:
    """Group shares: the one bootstrap of :mod:`embedlens.runs` with each image weighted by its tokens."""

    def test_two_opposite_images(self):
        counts = np.array([[4, 0], [0, 4]])
        low, high = bootstrap_interval(counts, 2000, 0.95, seed=0, weights=counts.sum(axis=1))
        assert low.tolist() == [0.0, 0.0] and high.tolist() == [1.0, 1.0]

    def test_width_shrinks_like_the_standard_error(self):
        rng = np.random.default_rng(1)
        fractions = rng.uniform(0.2, 0.6, size=400)
        counts = np.stack([np.round(fractions * 100), 100 - np.round(fractions * 100)], axis=1).astype(int)
        low, high = bootstrap_interval(counts, 2000, 0.95, seed=0, weights=counts.sum(axis=1))
        share = counts[:, 0] / 100
        expected = 2 * 1.96 * share.std(ddof=1) / np.sqrt(len(share))
        assert high[0] - low[0] == pytest.approx(expected, rel=0.15)
        assert low[0] < share.mean() < high[0]

    def test_reproducible(self):
        counts = np.random.default_rng(2).integers(0, 10, size=(30, 4))
        first = bootstrap_interval(counts, 500, 0.9, seed=3, weights=counts.sum(axis=1))
        second = bootstrap_interval(counts, 500, 0.9, seed=3, weights=counts.sum(axis=1))
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


class TestResume:
    def test_killed_run_resumes_to_the_same_result(self, planted, dataset_dir, tmp_path):
        session, anchors = planted
        dataset = open_dataset(dataset_dir)
        options = StatsOptions(batch_size=2)
        whole = run_stats(session, dataset, tmp_path / "whole", anchors=anchors, options=options, progress=False)

        def kill_after_first(progress):
            if progress.batches == 1:
                raise KeyboardInterrupt

        out = tmp_path / "killed"
        with pytest.raises(KeyboardInterrupt):
            run_stats(
                session, dataset, out, anchors=anchors, options=options, progress=False, on_batch=kill_after_first
            )
        assert not (out / TOKENS_FILE).exists()
        calls = []
        resumed = run_stats(
            session, dataset, out, anchors=anchors, options=options, progress=False, on_batch=calls.append
        )
        assert calls[-1].resumed == 2 and calls[-1].classified + calls[-1].skipped == GOOD + 1 - 2
        assert resumed.data == whole.data
        pd.testing.assert_frame_equal(read_tokens(out), read_tokens(tmp_path / "whole"))

    def test_batch_without_its_record_is_redone(self, planted, dataset_dir, tmp_path, monkeypatch):
        """A kill between a batch's Parquet and its JSON record: the Parquet is ignored and redone."""
        session, anchors = planted
        dataset = open_dataset(dataset_dir)
        options = StatsOptions(batch_size=2)
        whole = run_stats(session, dataset, tmp_path / "whole", anchors=anchors, options=options, progress=False)
        real_write = run_directory.atomic_write_text
        records = []

        def dies_on_second_record(path, text):
            if path.suffix == ".json" and path.parent.name == "parts":
                records.append(path)
                if len(records) == 2:
                    raise KeyboardInterrupt
            real_write(path, text)

        monkeypatch.setattr(run_directory, "atomic_write_text", dies_on_second_record)
        out = tmp_path / "out"
        with pytest.raises(KeyboardInterrupt):
            run_stats(session, dataset, out, anchors=anchors, options=options, progress=False)
        monkeypatch.setattr(run_directory, "atomic_write_text", real_write)
        assert len(list((out / "parts").glob("*.parquet"))) == 2 and len(list((out / "parts").glob("*.json"))) == 1
        resumed = run_stats(session, dataset, out, anchors=anchors, options=options, progress=False)
        assert resumed.data == whole.data
        pd.testing.assert_frame_equal(read_tokens(out), read_tokens(tmp_path / "whole"))

    def test_other_settings_refused_then_restart(self, planted, dataset_dir, tmp_path):
        session, anchors = planted
        dataset = open_dataset(dataset_dir)
        out = tmp_path / "out"
        run_stats(session, dataset, out, anchors=anchors, progress=False)
        with pytest.raises(InputError, match=r"other settings \(top_k\); pass --restart"):
            run_stats(session, dataset, out, anchors=anchors, options=StatsOptions(top_k=5), progress=False)
        summary = run_stats(
            session, dataset, out, anchors=anchors, options=StatsOptions(top_k=5), restart=True, progress=False
        )
        assert summary.data["rule"]["top_k"] == 5
        assert read_tokens(out)["top_ids"].map(len).eq(5).all()

    def test_nothing_readable(self, planted, tmp_path):
        session, anchors = planted
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "a.png").write_bytes(b"junk")
        with pytest.raises(InputError, match="none of the 1 images"):
            run_stats(session, open_dataset(tmp_path / "images"), tmp_path / "out", anchors=anchors, progress=False)

    @pytest.mark.parametrize("bad", [{"batch_size": 0}, {"bootstrap": -1}, {"confidence": 1.0}])
    def test_bad_options(self, bad):
        with pytest.raises(InputError):
            StatsOptions(**bad)


# --------------------------------------------------------------------------- two processes
def _worker(rank: int, world: int, port: int, model_dir: str, dataset_dir: str, out: str) -> None:
    """One process of an ``accelerate launch``: the launcher's environment, then the plain ``run_stats``."""
    from embedlens.runs import process_state

    as_launched(rank, world, port)
    try:
        torch.set_num_threads(1)
        session = embedlens.load(model_dir, device="cpu")
        anchors, _ = plant(session)
        run_stats(
            session,
            open_dataset(dataset_dir),
            out,
            anchors=anchors,
            options=StatsOptions(batch_size=2),
            progress=False,
        )
    finally:
        process_state().destroy_process_group()


class TestTwoProcesses:
    def test_gloo_equals_one_process(self, tiny_dir, planted, dataset_dir, tmp_path):
        session, anchors = planted
        dataset = open_dataset(dataset_dir)
        one = run_stats(
            session, dataset, tmp_path / "one", anchors=anchors, options=StatsOptions(batch_size=2), progress=False
        )
        args = (2, free_port(), str(tiny_dir), str(dataset_dir), str(tmp_path / "two"))
        mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
        two = tmp_path / "two"
        assert json.loads((two / SUMMARY_FILE).read_text()) == one.data
        pd.testing.assert_frame_equal(read_tokens(two), read_tokens(tmp_path / "one"))
        pd.testing.assert_frame_equal(
            pd.read_parquet(two / IMAGES_FILE), pd.read_parquet(tmp_path / "one" / IMAGES_FILE)
        )
        ranks = {path.name[:4] for path in (two / "parts").glob("*.json")}
        assert ranks == {"r000", "r001"}
