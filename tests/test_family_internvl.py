"""InternVL specifics the conformance suite cannot see: how images become tiles and a thumbnail, which
tile is which part of the picture, the ``<img>`` / ``</img>`` markers, pixel shuffle's token order,
and finding the spans inside ``generate`` (where the images arrive already encoded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embedlens
import tiny_internvl
from embedlens.capture import run_captured
from embedlens.errors import EmbedLensError, InputError
from embedlens.interventions import Prune, intervene
from embedlens.models.internvl import InternVLAdapter, view_names
from helpers import generate_forwards, random_image
from tiny_parts import session_fixtures

#: Colours of the quadrants of :func:`_quadrants` (top-left, top-right, bottom-left, bottom-right).
COLOURS = ((230, 20, 20), (20, 20, 230), (20, 200, 20), (230, 230, 20))


#: The tiny InternVL (56 px tiles, 2 x 2 tokens per view, up to 4 tiles), loaded by path.
session, adapter = session_fixtures("internvl", tiny_internvl.build, InternVLAdapter)


def _quadrants(width: int, height: int, parts: tuple[int, int]) -> Image.Image:
    """A ``width x height`` picture split into ``parts`` = ``(rows, cols)`` blocks of flat colour,
    coloured row-major from :data:`COLOURS`."""
    rows, cols = parts
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        block = (
            slice(row * height // rows, (row + 1) * height // rows),
            slice(col * width // cols, (col + 1) * width // cols),
        )
        array[block] = COLOURS[index]
    return Image.fromarray(array, "RGB")


def _mean_colour(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture, dtype=np.float32).reshape(-1, 3).mean(axis=0)


class TestViews:
    """Each image becomes its tiles (row-major over the processor's canvas) then, when there are
    several, a thumbnail; each view is its own 2 x 2 grid with its own picture."""

    @pytest.mark.parametrize(
        ("width", "height", "layout"),
        [(56, 56, (1, 1)), (112, 56, (1, 2)), (56, 112, (2, 1)), (224, 56, (1, 4)), (200, 200, (2, 2))],
        ids=["square", "wide", "tall", "very-wide", "big-square"],
    )
    def test_tiles_then_thumbnail_on_every_aspect(self, adapter: InternVLAdapter, width, height, layout):
        image = _quadrants(width, height, layout)
        assert adapter.tile_layout(image) == layout
        batch = adapter.prepare([[image]], ["what is this"])
        tiles = layout[0] * layout[1]
        names = [f"tile-{i}" for i in range(tiles)] + (["thumbnail"] if tiles > 1 else [])
        spans = batch.spans[0]
        assert [span.view for span in spans] == names
        assert all(span.grid == (2, 2) and span.image == 0 and span.global_image == 0 for span in spans)
        assert [span.picture for span in spans] == list(range(len(names)))
        assert len(batch.views) == batch.inputs["pixel_values"].shape[0] == len(names)
        # tile i shows block i of the picture (row-major over the canvas), in its flat colour
        for index in range(tiles):
            colour = _mean_colour(batch.views[spans[index].picture])
            assert np.abs(colour - np.asarray(COLOURS[index])).max() < 3, f"tile {index}: {colour}"
        if tiles > 1:
            thumbnail = np.asarray(batch.views[spans[-1].picture].resize(layout[::-1], Image.BOX), dtype=np.float32)
            expected = np.asarray(COLOURS[:tiles], dtype=np.float32).reshape(*layout, 3)
            assert np.abs(thumbnail - expected).max() < 12, "the thumbnail is the whole picture"
        # the views' runs follow one another without a gap, in span order
        positions = torch.cat([span.positions for span in spans]).tolist()
        assert positions == list(range(positions[0], positions[0] + 4 * len(names)))

    def test_view_names(self):
        assert view_names(1) == ["tile-0"]
        assert view_names(3) == ["tile-0", "tile-1", "thumbnail"]
        assert view_names(5)[-2:] == ["tile-3", "thumbnail"]

    def test_markers_around_each_image(self, adapter: InternVLAdapter):
        batch = adapter.prepare(
            [[random_image(0, 112, 56), random_image(1)], [random_image(2, 56, 112)]], ["what is this", "a"]
        )
        start, end = adapter.marker_ids
        assert adapter.tokenizer.convert_ids_to_tokens([start, end]) == ["<img>", "</img>"]
        for row, spans in zip(batch.inputs["input_ids"], batch.spans, strict=True):
            images = sorted({span.image for span in spans})
            for image in images:
                views = [span for span in spans if span.image == image]
                first, rest = views[0], views[1:]
                assert first.markers.tolist() == [int(first.positions[0]) - 1, int(views[-1].positions[-1]) + 1]
                assert row[first.markers].tolist() == [start, end]
                assert all(span.markers.numel() == 0 for span in rest)
            assert int((row == start).sum()) == int((row == end).sum()) == len(images)
        assert [span.global_image for span in batch.spans[0]] == [0, 0, 0, 1]
        assert [span.picture for span in batch.spans[1]] == [4, 5, 6]


class TestPixelShuffle:
    """The grid claim rests on pixel shuffle keeping row-major order: token ``(r, c)`` of a view is made of
    patches ``2r..2r+1`` x ``2c..2c+1``. Checked on the model's own ``pixel_shuffle``."""

    def test_token_r_c_holds_the_patches_of_block_r_c(self, session: embedlens.Session):
        side = 4
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        features = torch.stack([rows, cols], dim=-1).float()[None]  # [1, 4, 4, 2]: each patch holds its (row, col)
        shuffled = session.model.model.pixel_shuffle(features, scale_factor=0.5).reshape(1, -1, 8)[0]
        for token in range(4):
            r, c = divmod(token, 2)
            patches = {tuple(shuffled[token, i : i + 2].int().tolist()) for i in range(0, 8, 2)}
            assert patches == {(2 * r + dr, 2 * c + dc) for dr in (0, 1) for dc in (0, 1)}, f"token {token}"


class TestSpansFromInputs:
    """``find_spans`` reads everything from the forward's inputs, also inside ``generate``."""

    def test_inside_generate_the_images_come_encoded(self, session: embedlens.Session, adapter: InternVLAdapter):
        batch = adapter.prepare([[random_image(0, 112, 56)], [random_image(1)]], ["what is this", "is it red"])
        first = generate_forwards(session.model, batch.inputs)[0]
        assert first.get("pixel_values") is None and first["mm_encoder_outputs"]["image"] is not None
        found = adapter.find_spans(first)
        assert [[(s.view, s.positions.tolist(), s.markers.tolist()) for s in spans] for spans in found] == [
            [(s.view, s.positions.tolist(), s.markers.tolist()) for s in spans] for spans in batch.spans
        ]

    def test_generate_under_a_prune(self, session: embedlens.Session):
        image = random_image(0, 112, 56)
        with intervene(session, [Prune(indices=(0, 3))]) as run:
            answer = session.generate(image, prompt="what is this", max_new_tokens=3)
        assert isinstance(answer, str)
        # cells 0 and 3 of each of the three views
        assert run.last.samples[0].pruned == [0, 3, 0, 3, 0, 3]

    def test_views_and_tokens_must_agree(self, adapter: InternVLAdapter):
        batch = adapter.prepare([[random_image(0, 112, 56)]], ["what is this"])
        inputs = dict(batch.inputs)
        with pytest.raises(InputError, match="3 image views given but the text has image tokens for 2"):
            adapter.find_spans({**inputs, "input_ids": _drop_one_view(inputs["input_ids"], adapter.image_token_id)})
        with pytest.raises(InputError, match="not a whole number of 2 x 2 views"):
            ids = inputs["input_ids"].clone()
            ids[0, int(batch.spans[0][0].positions[0])] = 5
            adapter.find_spans({**inputs, "input_ids": ids})
        with pytest.raises(InputError, match="no images were given"):
            adapter.find_spans({"input_ids": inputs["input_ids"]})


def _drop_one_view(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``input_ids`` ``[1, T]`` with the first view's 4 image tokens removed."""
    row = input_ids[0]
    first = int(torch.nonzero(row == image_token_id)[0])
    return torch.cat([row[:first], row[first + 4 :]])[None]


class TestSession:
    """The public API on the tiny InternVL."""

    def test_probe_and_generate(self, session: embedlens.Session):
        result = session.probe(random_image(0, 112, 56), top_k=3)
        assert result.grid == (2, 2)
        assert int(result.top_ids.max()) < len(session.adapter.tokenizer)
        assert isinstance(session.generate(random_image(0, 112, 56), prompt="what is this", max_new_tokens=3), str)

    def test_lens_never_returns_rows_past_the_tokenizer(self, tmp_path: Path):
        """With tables padded past the tokenizer and the padding rows made the visual tokens themselves,
        a lens that searched them would return them."""
        model, processor = tiny_internvl.build_model_and_processor()
        tokens = len(processor.tokenizer)
        model.resize_token_embeddings(tokens + 32, mean_resizing=False)
        image = random_image(0, 112, 56)
        encoded = processor(images=[image], text=[processor.image_token], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded, output_hidden_states=True).hidden_states[0]
            visual = hidden[0, encoded["input_ids"][0] == model.config.image_token_id]
            model.get_input_embeddings().weight[tokens : tokens + visual.shape[0]] = visual
            model.get_output_embeddings().weight[tokens : tokens + visual.shape[0]] = 10 * visual
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
        padded = embedlens.load(str(tmp_path), device="cpu")
        for lens in ("embedding", "logit"):
            result = padded.probe(image, top_k=5, lens=lens)
            assert int(result.top_ids.max()) < tokens, lens


class TestVisionFeatures:
    """The vision features behind each grid token (for the ViT-sink norms) are its view's own 2 x 2
    patches, for every view of every image in the batch."""

    def test_each_token_gets_its_own_patches(self, session: embedlens.Session, adapter: InternVLAdapter):
        batch = adapter.prepare(
            [[random_image(0, 112, 56)], [random_image(1), random_image(2, 56, 112)]], ["what is this", "a"]
        )
        captured = run_captured(adapter, batch.inputs, [0], vision_features=True)
        with torch.no_grad():
            patches = session.model.model.vision_tower(pixel_values=batch.inputs["pixel_values"]).last_hidden_state
        patches = patches[:, 1:].reshape(-1, 4, 4, patches.shape[-1])  # CLS dropped: [views, 4, 4, d]
        spans = [span for sample_spans in batch.spans for span in sample_spans]
        assert [span.picture for span in spans] == list(range(7))
        for span in spans:
            features = adapter.vision_token_features(captured.vision_features, span)
            assert features.shape == (4, 4 * patches.shape[-1])
            for token in range(4):
                r, c = divmod(token, 2)
                block = patches[span.picture, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, -1)
                # the same four patch vectors, in pixel shuffle's order within the token
                found = features[token].reshape(4, -1)
                assert sorted(map(tuple, found.tolist())) == sorted(map(tuple, block.tolist()))

    def test_without_features_or_with_the_wrong_ones(self, adapter: InternVLAdapter):
        span = adapter.prepare([[random_image(0)]], ["a"]).spans[0][0]
        with pytest.raises(EmbedLensError, match="not captured"):
            adapter.vision_token_features(None, span)
        with pytest.raises(EmbedLensError, match="does not hold view"):
            adapter.vision_token_features(torch.zeros(1, 16, 8), span)
