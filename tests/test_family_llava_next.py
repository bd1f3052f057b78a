"""LLaVA-NeXT / LLaVA-OneVision views beyond what the conformance suite sees.

The conformance entries use one wide image; here many sizes and aspect ratios go through the real
processor and model, and the adapter's arithmetic (from ``image_sizes`` and the grid pinpoints) must
agree with what the model actually packs: token counts, where the ``image_newline`` vectors land,
which projector row each tiles cell holds (the stitching order), OneVision's downsampling and its
multi-image layout, and the layout found inside ``generate`` from the packed features alone.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

import embedlens
from embedlens.capture import run_captured
from embedlens.errors import EmbedLensError, InputError
from embedlens.interventions import Prune, intervene
from embedlens.models.anyres import AnyresAdapter, downsampled, unpadded_area
from embedlens.models.llava_next import LlavaNextAdapter
from embedlens.models.llava_onevision import LlavaOnevisionAdapter
from embedlens.models.tiny import build_tiny_tokenizer
from helpers import generate_forwards, random_image
from tiny_llava_next import TinyAnyres, save_llava_next, save_llava_onevision, tokenizer_with_video

#: (width, height) of images around and across the tile layouts: wide, tall, square, near-square,
#: tiny, and far larger than any layout.
SIZES = [
    (200, 40),
    (40, 200),
    (56, 56),
    (61, 60),
    (30, 100),
    (100, 30),
    (57, 113),
    (113, 57),
    (90, 500),
    (20, 20),
]
#: Aspect ratios so extreme that unpadding leaves no whole row (300 x 7) or column (7 x 300) of tiles.
EXTREME = [(300, 7), (7, 300)]


@pytest.fixture(scope="module")
def next_session(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    return embedlens.load(str(save_llava_next(tmp_path_factory.mktemp("next") / "model")), device="cpu")


@pytest.fixture(scope="module")
def onevision_session(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    return embedlens.load(str(save_llava_onevision(tmp_path_factory.mktemp("ov") / "model")), device="cpu")


@pytest.fixture(scope="module")
def capped_session(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """OneVision capped at ``anyres_max_1``: any tile grid over ~1.2 base grids is downsampled."""
    spec = TinyAnyres(max_tiles=1)
    return embedlens.load(str(save_llava_onevision(tmp_path_factory.mktemp("ov1") / "model", spec)), device="cpu")


def _sessions(request: pytest.FixtureRequest, names: str) -> list[embedlens.Session]:
    return [request.getfixturevalue(name) for name in names.split()]


def _run(session: embedlens.Session, sizes: list[tuple[int, int]]):
    """One sample per size; the prepared batch, the hidden states at layer 0 and the projector rows."""
    adapter = session.adapter
    batch = adapter.prepare([[random_image(i, w, h)] for i, (w, h) in enumerate(sizes)], ["what is this"] * len(sizes))
    rows: list[torch.Tensor] = []
    handle = adapter.projector.register_forward_hook(lambda _m, _a, out: rows.append(out.detach()))
    try:
        with torch.no_grad():
            out = session.model(**batch.inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return batch, out, torch.cat(rows)


class TestGeometry:
    """The unpadding and downsampling arithmetic on hand-worked cases."""

    def test_unpadding_keeps_the_image_rows(self):
        # 40 x 200 on 4 x 12 patches: the image is 2.4 patches tall -> 2 rows, one padding row each side
        assert unpadded_area((40, 200), 4, 12) == (1, 0, 2, 12)
        # 200 x 40 (tall) on 12 x 4: columns unpadded instead
        assert unpadded_area((200, 40), 12, 4) == (0, 1, 12, 2)
        # same aspect as the grid: nothing removed
        assert unpadded_area((56, 112), 4, 8) == (0, 0, 4, 8)

    def test_downsampling_only_past_the_cap(self):
        assert downsampled(8, 8, 4, None) == (8, 8)
        assert downsampled(8, 8, 4, 4) == (8, 8)  # exactly 4 tiles' worth: ratio 1
        assert downsampled(8, 8, 4, 1) == (4, 4)  # ratio 2
        assert downsampled(4, 9, 4, 2) == (4, 9)  # ratio sqrt(36/32) = 1.06 <= 1.1


@pytest.mark.parametrize("names", ["next_session", "onevision_session", "capped_session"])
class TestLayoutAgainstTheModel:
    """The adapter's layout from ``image_sizes`` equals what the processor and model produce."""

    def test_token_counts_and_newline_slots(self, request: pytest.FixtureRequest, names: str):
        (session,) = _sessions(request, names)
        adapter: AnyresAdapter = session.adapter
        batch, out, _ = _run(session, SIZES)
        embeds = out.hidden_states[0]
        newline = adapter.image_newline
        tiles_seen = set()
        for sample, spans in enumerate(batch.spans):
            assert [span.view for span in spans] == ["base", "tiles"]
            base, tiles = spans
            assert base.grid == (4, 4) and base.extra_positions.numel() == 0
            rows, cols = tiles.grid
            tiles_seen.add(tiles.grid)
            assert tiles.extra_positions.numel() == rows, "one newline slot per row"
            # the newline slot closes each row: right after the row's last cell
            grid = tiles.positions.view(rows, cols)
            assert torch.equal(tiles.extra_positions, grid[:, -1] + 1)
            assert bool((embeds[sample, tiles.extra_positions] == newline).all())
            cells = torch.cat([base.positions, tiles.positions])
            assert not bool((embeds[sample, cells] == newline).all(dim=-1).any()), "a grid cell holds the newline"
        assert len(tiles_seen) > 3, "the sizes should give several tiles grids"

    def test_no_tiles_view_when_unpadding_leaves_no_cells(self, request: pytest.FixtureRequest, names: str):
        """300 x 7: the 4 x 12 tile grid keeps no row (no tiles tokens at all); 7 x 300: the 12 x 4
        grid keeps no column, but the model still packs one newline slot per row: extra positions of
        the base view."""
        (session,) = _sessions(request, names)
        batch, out, _ = _run(session, EXTREME)
        wide, tall = batch.spans
        assert [(s.view, s.grid, s.extra_positions.numel()) for s in wide] == [("base", (4, 4), 0)]
        assert [(s.view, s.grid, s.extra_positions.numel()) for s in tall] == [("base", (4, 4), 12)]
        assert bool((out.hidden_states[0][1, tall[0].extra_positions] == session.adapter.image_newline).all())
        assert len(batch.views) == 2

    @pytest.mark.parametrize("sizes", [SIZES, EXTREME], ids=["sizes", "extreme"])
    def test_generate_path_finds_the_same_spans(self, request: pytest.FixtureRequest, names: str, sizes):
        """Inside ``generate`` the forward gets the packed features without ``image_sizes``; the
        layout read from the newline vectors there equals the one computed from the sizes."""
        (session,) = _sessions(request, names)
        batch, out, _ = _run(session, sizes)
        inputs = {"input_ids": batch.inputs["input_ids"], "mm_encoder_outputs": {"image": out.image_outputs}}
        found = session.adapter.find_spans(inputs)
        for mine, theirs in zip(found, batch.spans, strict=True):
            assert [(s.view, s.grid, s.positions.tolist(), s.extra_positions.tolist()) for s in mine] == [
                (s.view, s.grid, s.positions.tolist(), s.extra_positions.tolist()) for s in theirs
            ]


def test_tiles_cells_hold_the_stitched_projector_rows(next_session: embedlens.Session):
    """Cell ``(r, c)`` of the tiles view is patch ``(r + top, c + left)`` of the stitched tile grid:
    tile ``((r + top) // side, (c + left) // side)``, its cell ``((r + top) % side, (c + left) % side)``."""
    adapter: AnyresAdapter = next_session.adapter
    batch, out, projected = _run(next_session, SIZES)
    embeds = out.hidden_states[0]
    layouts = adapter.image_layouts(batch.inputs)
    first_patch = 0
    side = adapter.side
    for sample, (spans, layout) in enumerate(zip(batch.spans, layouts, strict=True)):
        top, left, rows, cols = layout.area
        assert spans[1].grid == (rows, cols)  # LLaVA-NeXT never downsamples
        assert torch.equal(embeds[sample, spans[0].positions], projected[first_patch])
        r, c = torch.meshgrid(torch.arange(rows) + top, torch.arange(cols) + left, indexing="ij")
        tile = 1 + (r // side) * layout.layout[1] + c // side
        expected = projected[first_patch + tile.flatten(), ((r % side) * side + c % side).flatten()]
        assert torch.equal(embeds[sample, spans[1].positions], expected), f"sample {sample}"
        first_patch += 1 + layout.layout[0] * layout.layout[1]
    assert first_patch == projected.shape[0]


@pytest.mark.parametrize("names", ["next_session", "onevision_session", "capped_session"])
def test_vision_token_features_follow_the_packing(request: pytest.FixtureRequest, names: str):
    """``vision_token_features`` only rearranges (and, downsampled, interpolates) the projector's
    rows, as the model does to the projector's outputs: given those outputs instead of its inputs it
    must return exactly the layer-0 vectors at each span's grid positions, every view, every size;
    given the captured inputs, the projector of its answer is the layer-0 vectors (no downsampling)."""
    (session,) = _sessions(request, names)
    adapter: AnyresAdapter = session.adapter
    batch, out, projected = _run(session, SIZES)
    embeds = out.hidden_states[0]
    captured = run_captured(adapter, batch.inputs, [0], vision_features=True)
    for spans in batch.spans:
        for span in spans:
            where = f"sample {span.sample} view {span.view}"
            expected = embeds[span.sample, span.positions]
            assert torch.equal(adapter.vision_token_features(projected, span), expected), where
            vision = adapter.vision_token_features(captured.vision_features, span)
            assert vision.shape == (span.num_tokens, captured.vision_features.shape[-1])
            if span.view == "base" or span.grid == span.anyres.area[2:]:
                with torch.no_grad():
                    torch.testing.assert_close(adapter.projector(vision), expected, rtol=0, atol=1e-6, msg=where)


def test_vision_token_features_need_the_layout(next_session: embedlens.Session):
    batch, out, projected = _run(next_session, [(200, 40)])
    inputs = {"input_ids": batch.inputs["input_ids"], "mm_encoder_outputs": {"image": out.image_outputs}}
    (spans,) = next_session.adapter.find_spans(inputs)  # as inside generate: no image sizes
    with pytest.raises(EmbedLensError, match="does not say which patches"):
        next_session.adapter.vision_token_features(projected, spans[1])
    with pytest.raises(EmbedLensError, match="not captured"):
        next_session.adapter.vision_token_features(None, batch.spans[0][1])
    with pytest.raises(EmbedLensError, match="does not hold image 0"):
        next_session.adapter.vision_token_features(projected[:2], batch.spans[0][1])


def test_downsampled_grid_is_what_the_tokens_show(capped_session: embedlens.Session):
    """anyres_max_1: a square image on 2 x 2 tiles (8 x 8 patches) is packed as 4 x 4 interpolated cells."""
    batch, _out, _ = _run(capped_session, [(112, 112), (200, 40)])
    assert batch.spans[0][1].grid == (4, 4)
    # 40 x 200: 2 x 12 unpadded, ratio sqrt(24 / 16) = 1.22 > 1.1 -> (1, 9)
    assert batch.spans[1][1].grid == (1, 9)
    assert batch.inputs["input_ids"][1].eq(capped_session.adapter.image_token_id).sum() == 16 + 1 * 10


def test_pictures(next_session: embedlens.Session):
    """Base picture: the tile-sized whole image; tiles picture: the stitched tiles cropped to the
    unpadded patches, whose pixels are the processor's tile pixels."""
    adapter: AnyresAdapter = next_session.adapter
    batch = adapter.prepare([[random_image(0, 200, 40)], [random_image(1, 40, 200)]], ["a", "b"])
    pictures = [batch.views[span.picture] for spans in batch.spans for span in spans]
    assert len(batch.views) == 4 and [span.picture for spans in batch.spans for span in spans] == [0, 1, 2, 3]
    assert [p.size for p in pictures] == [(56, 56), (12 * 14, 2 * 14), (56, 56), (2 * 14, 12 * 14)]
    # wide image: tiles picture row 0 is patch row 1 of the 1 x 3 tiles (one padding row cut off)
    pixel_values = batch.inputs["pixel_values"][0]
    tile = np.asarray(adapter.picture(pixel_values[2]))  # middle tile
    assert np.array_equal(np.asarray(pictures[1])[:, 56:112], tile[14:42])
    # tall image: 3 x 1 tiles, one padding column cut off each side
    tile = np.asarray(adapter.picture(batch.inputs["pixel_values"][1][2]))
    assert np.array_equal(np.asarray(pictures[3])[56:112], tile[:, 14:42])


class TestOnevisionMultiImage:
    """A OneVision sample with several images gets base views only, each followed by one newline slot."""

    def test_layout(self, onevision_session: embedlens.Session):
        adapter = onevision_session.adapter
        images = [[random_image(0, 200, 40), random_image(1, 40, 200)], [random_image(2, 200, 40)]]
        batch = adapter.prepare(images, ["what is this", "is there"])
        assert [[(s.image, s.view, s.grid) for s in spans] for spans in batch.spans] == [
            [(0, "base", (4, 4)), (1, "base", (4, 4))],
            [(0, "base", (4, 4)), (0, "tiles", (2, 12))],
        ]
        with torch.no_grad():
            out = onevision_session.model(**batch.inputs, output_hidden_states=True)
        embeds = out.hidden_states[0]
        for span in batch.spans[0]:
            assert span.extra_positions.tolist() == [int(span.positions[-1]) + 1]
            assert bool((embeds[0, span.extra_positions] == adapter.image_newline).all())
        assert len(batch.views) == 4 and [v.size for v in batch.views[:2]] == [(56, 56), (56, 56)]
        found = adapter.find_spans(
            {"input_ids": batch.inputs["input_ids"], "mm_encoder_outputs": {"image": out.image_outputs}}
        )
        assert [[(s.view, s.grid) for s in spans] for spans in found] == [
            [(s.view, s.grid) for s in spans] for spans in batch.spans
        ]

    def test_generate_with_a_prune(self, onevision_session: embedlens.Session):
        adapter = onevision_session.adapter
        images = [[random_image(0, 200, 40), random_image(1, 40, 200)], [random_image(2, 200, 40)]]
        batch = adapter.prepare(images, ["what is this", "is there"])
        with intervene(onevision_session, [Prune(indices=(0, 5))]) as run, torch.no_grad():
            tokens = onevision_session.model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
        assert tokens.shape == (2, batch.inputs["input_ids"].shape[1] + 3)
        # two cells of each of the four spans
        assert [len(sample.pruned) for sample in run.last.samples] == [4, 4]


def test_generate_forward_gets_no_image_sizes(next_session: embedlens.Session):
    """Why the adapter reads the layout from the features inside ``generate``: the sizes are gone."""
    batch = next_session.adapter.prepare([[random_image(0, 200, 40)]], ["what"])
    seen = generate_forwards(next_session.model, batch.inputs)
    assert "image_sizes" not in seen[0] and "pixel_values" not in seen[0]
    assert seen[0]["mm_encoder_outputs"]["image"] is not None


def test_pixel_values_without_image_sizes(next_session: embedlens.Session):
    batch = next_session.adapter.prepare([[random_image(0, 200, 40)]], ["what"])
    inputs = {k: v for k, v in batch.inputs.items() if k != "image_sizes"}
    with pytest.raises(InputError, match="image_sizes"):
        next_session.adapter.find_spans(inputs)


def test_too_few_image_tokens(next_session: embedlens.Session):
    batch = next_session.adapter.prepare([[random_image(0, 200, 40)]], ["what"])
    ids = batch.inputs["input_ids"].clone()
    ids[0, int(batch.spans[0][1].extra_positions[-1])] = 5
    with pytest.raises(InputError, match="expected 42 image tokens"):
        next_session.adapter.find_spans({**batch.inputs, "input_ids": ids})


def test_builders_are_fast(tmp_path: Path):
    import time

    start = time.perf_counter()
    save_llava_next(tmp_path / "a")
    save_llava_onevision(tmp_path / "b")
    assert time.perf_counter() - start < 2.0


#: (width, height): photo shapes, extreme strips, a near-square, a tiny and a large image.
REAL_SIZES = [(640, 480), (333, 1001), (1001, 333), (2000, 1500), (4000, 300), (100, 3000), (777, 779), (50, 50)]


def _real_shaped() -> list[tuple[AnyresAdapter, object, int]]:
    """Adapters over llava-v1.6-mistral-7b-hf's and llava-onevision-qwen2-7b-ov-hf's geometry (336 px
    CLIP tiles with 5 pinpoints; 384 px SigLIP tiles, 36 pinpoints, anyres_max_9), configs only, with
    their real image processor settings: (adapter, processor, image token id)."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
        image_grid_pinpoints=pinpoints,
        image_token_id=999,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    tokenizer = build_tiny_tokenizer(1000)
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    onevision = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),
        tokenizer=tokenizer_with_video(1000),
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=27 * 27,
        vision_feature_select_strategy="full",
    )
    return [
        (LlavaNextAdapter(SimpleNamespace(config=config), processor, "next"), processor, 999),
        (
            LlavaOnevisionAdapter(SimpleNamespace(config=LlavaOnevisionConfig(image_token_index=998)), onevision, "ov"),
            onevision,
            998,
        ),
    ]


def test_real_shaped_token_counts():
    """At the real checkpoints' sizes (24 x 24 and 27 x 27 grids, where the unpadding rounds and
    OneVision downsamples large images) the layout's token count equals the processor's."""
    for adapter, processor, token in _real_shaped():
        downsampled_seen = False
        for width, height in REAL_SIZES:
            encoded = processor(images=[random_image(0, width, height)], text=["<image>"], return_tensors="pt")
            layout = adapter.layout((height, width))
            where = f"{adapter.family} {width} x {height}"
            assert int(encoded["input_ids"].eq(token).sum()) == layout.tokens, where
            downsampled_seen |= layout.tiles != layout.area[2:]
        assert downsampled_seen == (adapter.family == "llava_onevision")
