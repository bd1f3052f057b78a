"""Layer alignment (embedlens align): the whole-word filter, the measures, planted alignment, resume, CLI.

On random weights no layer is "where the visual tokens belong", so the decisive test plants it: the
projector is replaced so that the visual tokens are copies of text hidden states of layer ``p``, and
every measure must then point at ``p``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import embedlens
from embedlens import InputError
from embedlens.analysis import alignment
from embedlens.analysis.alignment import (
    VISUAL_GROUPS,
    AlignOptions,
    reference_passages,
    run_align,
    text_reference,
    wasserstein_1d,
)
from embedlens.analysis.words import is_whole_word, uses_markers, word_table
from embedlens.datasets import open_dataset
from helpers import assert_user_error, random_image, run_cli
from taxonomy_planting import NUM_TOKENS, PlantedProjector

FAST = AlignOptions(batch_size=2, lens_top_k=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five noise images."""
    root = tmp_path_factory.mktemp("align-images")
    for i in range(5):
        random_image(200 + i).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def baseline_run(tiny, folder, tmp_path_factory):
    return run_align(tiny, open_dataset(folder), tmp_path_factory.mktemp("align") / "out", options=FAST, progress=False)


class TestWholeWords:
    """The readability measure is only as good as its filter; these are the documented cases."""

    @pytest.mark.parametrize(
        ("piece", "marked", "expected"),
        [
            ("Ġyoung", True, True),
            ("▁blue", True, True),
            ("▁jav", True, True),  # word-initial fragment: the filter has no dictionary (documented)
            ("igh", True, False),  # continuation without the marker
            ("Ġa", True, False),  # a single letter
            ("Ġ7", True, False),
            ("Ġ...", True, False),
            ("्", True, False),  # the paper's dead anchor: a combining mark
            ("<0x0A>", True, False),
            ("red", False, True),  # vocabularies without markers: every alphabetic piece is word-initial
            ("tok12", False, False),
        ],
    )
    def test_pieces(self, piece, marked, expected):
        assert is_whole_word(piece, marked=marked) is expected

    def test_special_tokens_are_not_words(self):
        assert not is_whole_word("Ġhello", special=True)

    def test_marker_detection(self):
        assert uses_markers(["Ġa", "Ġb", "c"]) and not uses_markers(["a", "b", "c"] * 10) and not uses_markers([])

    def test_tiny_table(self, tiny):
        tokenizer = tiny.adapter.tokenizer
        table = word_table(tokenizer, 1000)
        assert table[tokenizer.convert_tokens_to_ids("red")] and table[tokenizer.convert_tokens_to_ids("picture")]
        for piece in ("<s>", "<0x41>", "<image>", "tok100"):
            assert not table[tokenizer.convert_tokens_to_ids(piece)], piece


class TestMeasures:
    def test_wasserstein_hand_cases(self):
        rng = np.random.default_rng(0)
        a = rng.normal(size=500)
        assert wasserstein_1d(a, a) == pytest.approx(0, abs=1e-12)
        assert wasserstein_1d(a, a + 2.5) == pytest.approx(2.5)
        assert wasserstein_1d(np.zeros(3), np.ones(7)) == pytest.approx(1.0)
        assert np.isnan(wasserstein_1d(np.zeros(0), a))

    def test_text_reference_leaves_out_first_positions_and_padding(self, tiny):
        passages = ["the red picture", "a blue shape is in the image of the object"]
        reference = text_reference(tiny, passages, batch_size=2)
        counts = [len(tiny.adapter.tokenizer(p).input_ids) - 1 for p in passages]
        assert reference.unit.shape == (tiny.num_layers + 1, sum(counts), 64)
        assert torch.allclose(reference.unit.norm(dim=-1), torch.ones(()), atol=1e-5)
        assert reference.norms.shape == (tiny.num_layers + 1, sum(counts))
        # batching cannot change the reference (padding never enters it)
        single = text_reference(tiny, passages, batch_size=1)
        assert np.allclose(np.sort(single.norms, axis=1), np.sort(reference.norms, axis=1), atol=1e-5)

    def test_packaged_passages(self):
        passages = reference_passages(None)
        assert len(passages) == 60 and all(p.endswith(".") for p in passages)


class TestPlanted:
    """Visual tokens planted as text states of layer p: every alignment measure must land on p."""

    @pytest.mark.parametrize("planted", [1, 2, 3])
    def test_measures_land_on_the_planted_layer(self, tiny_dir, folder, tmp_path, planted):
        session = embedlens.load(str(tiny_dir), device="cpu")  # private: its projector is replaced
        reference = text_reference(session, reference_passages(None))
        order = np.argsort(reference.norms[planted])
        chosen = order[np.linspace(0, len(order) - 1, NUM_TOKENS).round().astype(int)]  # spread over the norms
        rows = reference.unit[planted][chosen] * torch.from_numpy(reference.norms[planted][chosen]).float()[:, None]
        session.model.model.multi_modal_projector = PlantedProjector(rows)
        result = run_align(session, open_dataset(folder), tmp_path / "out", options=FAST, progress=False)
        found = result.summary["groups"]["visual"]
        assert found["best_cos_layer"] == planted and found["best_cos_max"] == pytest.approx(1.0, abs=1e-5)
        assert found["norm_matched_layer"] == planted
        assert found["norm_w1_layer"] == planted
        assert found["direction_distance_layer"] == planted


class TestRun:
    def test_outputs(self, baseline_run, tiny):
        out = baseline_run.out
        for name in ("layers.parquet", "summary.json", "table.md", "norms.png", "alignment.png", "readability.png"):
            assert (out / name).is_file(), name
        table = pd.read_parquet(out / "layers.parquet")
        layers = tiny.num_layers + 1
        assert set(table["group"]) == {"visual", "text", "prompt"}  # the tiny model has no anchors
        assert (table.groupby("group").size() == layers).all()
        visual = table[table["group"] == "visual"].sort_values("layer")
        assert (visual["tokens"] == 5 * NUM_TOKENS).all()
        assert visual["cross_layer_cos"].iloc[0] == pytest.approx(1.0)
        for column in ("readable_embedding", "readable_logit", "word_share_embedding", "word_share_logit"):
            assert visual[column].between(0, 1).all(), column
        prompt = table[table["group"] == "prompt"]
        assert prompt["best_cos"].between(-1, 1).all() and (prompt["direction_distance"] >= 0).all()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == 5 and summary["focus_group"] == "visual"
        assert "no anchors" in summary["groups_from"]

    def test_prompt_tokens_counted(self, tiny, baseline_run):
        """Prompt text = real, non-visual positions after the first: counted from the tokenization."""
        batch = tiny.prepare([random_image(200)], ["Describe the image."])
        ids = batch.inputs["input_ids"][0]
        expected = int((ids != tiny.adapter.image_token_id).sum()) - 1
        prompt = next(r for r in baseline_run.rows if r["group"] == "prompt")
        assert prompt["tokens"] == 5 * expected

    def test_groups_with_anchors(self, tiny, folder, tiny_anchor_file, tmp_path):
        options = AlignOptions(batch_size=5, lens_top_k=3, anchors=str(tiny_anchor_file))
        result = run_align(tiny, open_dataset(folder), tmp_path / "out", options=options, progress=False)
        groups = result.summary["groups"]
        assert result.summary["focus_group"] == "alive"
        counted = sum(groups[g]["tokens"] for g in VISUAL_GROUPS[1:] if g in groups)
        assert counted == groups["visual"]["tokens"] == 5 * NUM_TOKENS
        assert len(groups) > 2  # the anchors hit some tokens

    def test_batching_does_not_change_the_result(self, tiny, folder, baseline_run, tmp_path):
        other = run_align(
            tiny,
            open_dataset(folder),
            tmp_path / "out",
            options=AlignOptions(batch_size=5, lens_top_k=3),
            progress=False,
        )
        for a, b in zip(baseline_run.rows, other.rows, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5, nan_ok=True), key
                else:
                    assert a[key] == b[key], key

    def test_resume_after_interruption(self, tiny, folder, baseline_run, tmp_path, monkeypatch):
        calls = {"n": 0}
        original = alignment._batch_totals

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(alignment, "_batch_totals", dying)
        with pytest.raises(KeyboardInterrupt):
            run_align(tiny, open_dataset(folder), tmp_path / "out", options=FAST, progress=False)
        assert len(list((tmp_path / "out" / "parts").glob("b*.json"))) == 1
        monkeypatch.setattr(alignment, "_batch_totals", original)
        resumed = run_align(tiny, open_dataset(folder), tmp_path / "out", options=FAST, progress=False)
        assert resumed.summary == baseline_run.summary
        assert pd.read_parquet(tmp_path / "out" / "layers.parquet").equals(
            pd.read_parquet(baseline_run.out / "layers.parquet")
        )

    def test_a_batch_committed_twice_counts_once(self, tiny, folder, baseline_run, tmp_path):
        """Merged totals are sums: a part committed twice would double its images; the merge keeps the first."""
        out = tmp_path / "out"
        shutil.copytree(baseline_run.out, out)
        for part in (out / "parts").glob("b0000000.*"):
            shutil.copy(part, part.with_name("b9999999" + part.suffix))
        again = run_align(tiny, open_dataset(folder), out, options=FAST, progress=False)
        assert again.summary == baseline_run.summary and again.summary["images"] == 5

    def test_other_settings_refused(self, tiny, folder, baseline_run):
        with pytest.raises(InputError, match="other settings"):
            run_align(tiny, open_dataset(folder), baseline_run.out, options=AlignOptions(lens_top_k=4), progress=False)

    def test_unreadable_images_skipped(self, tiny, folder, tmp_path):
        root = tmp_path / "mixed"
        root.mkdir()
        random_image(1).save(root / "a.png")
        (root / "b.png").write_bytes(b"not an image")
        result = run_align(tiny, open_dataset(root), tmp_path / "out", options=FAST, progress=False)
        assert result.summary["images"] == 1 and len(result.unreadable) == 1 and "b.png" in result.unreadable[0]

    @pytest.mark.parametrize(
        ("options", "fragment"),
        [
            (AlignOptions(lens_layers=(0, 9)), "outside 0..4"),
            (AlignOptions(text="/nonexistent/passages.txt"), "text file not found"),
        ],
    )
    def test_bad_options(self, tiny, folder, tmp_path, options, fragment):
        with pytest.raises(InputError, match=fragment):
            run_align(tiny, open_dataset(folder), tmp_path / "out", options=options, progress=False)

    def test_empty_text_file(self, tmp_path):
        (tmp_path / "t.txt").write_text("\n  \n")
        with pytest.raises(InputError, match="no passages"):
            reference_passages(tmp_path / "t.txt")

    @pytest.mark.parametrize("bad", [{"lens_top_k": 0}, {"batch_size": -1}])
    def test_bad_numbers(self, bad):
        with pytest.raises(InputError):
            AlignOptions(**bad)


class TestCli:
    def test_align_command(self, capsys, tiny_dir, folder, tmp_path):
        code, out, err = run_cli(
            capsys, "align", folder, "--model", tiny_dir, "--device", "cpu", "--out", tmp_path / "o",
            "--lens-layers", "0,2-4", "--batch-size", "3", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
        assert "norm-matched layer" in out and "wrote" in out
        table = pd.read_parquet(tmp_path / "o" / "layers.parquet")
        visual = table[table["group"] == "visual"].set_index("layer")
        assert visual.loc[1, "readable_embedding"] is None or pd.isna(visual.loc[1, "readable_embedding"])
        assert not pd.isna(visual.loc[2, "readable_embedding"])

    @pytest.mark.parametrize(
        ("extra", "fragment"),
        [
            (["--lens-layers", "two"], "--lens-layers takes layers"),
            (["--lens-layers", "4-2"], "bad layer range"),
            (["--lens-top-k", "0"], "lens-top-k must be a positive integer"),
            (["--text", "/no/such.txt"], "text file not found"),
        ],
    )
    def test_bad_input(self, capsys, tiny_dir, folder, tmp_path, extra, fragment):
        code, out, err = run_cli(
            capsys, "align", folder, "--model", tiny_dir, "--device", "cpu", "--out", tmp_path / "o", *extra
        )
        assert_user_error(code, out, err, fragment)

    def test_missing_dataset(self, capsys, tiny_dir, tmp_path):
        code, out, err = run_cli(capsys, "align", tmp_path / "nothing", "--model", tiny_dir, "--out", tmp_path / "o")
        assert_user_error(code, out, err, "dataset not found")
