"""Mistral 3 specifics the conformance suite cannot see, on the tiny random checkpoint (``tiny_mistral3``).

Why each matters: the grid follows each image's own size (aspect kept, resized to multiples of the
merged patch), and the ``[IMG_BREAK]`` / ``[IMG_END]`` tokens between rows are text tokens that must
never be taken for grid cells (every picture and prune is drawn on the grid); inside ``generate`` the
first forward gets neither ``pixel_values`` nor ``image_sizes``, so the spans must come from the token
layout alone; the ViT-sink evidence reads the patches the merger joins into each token, which must be
that token's ``2 x 2`` block of the right image in a batch of differently sized images.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import embedlens
from embedlens.bench.patchgeom import GREY
from embedlens.errors import InputError
from embedlens.interventions import Prune, intervene
from embedlens.models.mistral3 import Mistral3Adapter
from helpers import assert_pixel_changes_its_cell, generate_forwards, random_image, weightless_geometry
from tiny_mistral3 import TinyMistral3Spec, build
from tiny_parts import session_fixtures

session, adapter = session_fixtures("mistral3", build, Mistral3Adapter)


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (112, 84, (3, 4)),  # fits: 84 / 28 rows, 112 / 28 columns
        (56, 112, (4, 2)),  # tall
        (300, 200, (3, 4)),  # shrunk to 112 x 74, rounded up to 112 x 84
        (20, 10, (1, 1)),  # smaller than one token: padded up to one
        (112, 28, (1, 4)),  # a single row: [IMG_END] only, no break
    ],
)
def test_grid_and_markers_follow_the_image(adapter: Mistral3Adapter, width: int, height: int, grid: tuple[int, int]):
    batch = adapter.prepare([[random_image(0, width, height)]], ["what is this"])
    (span,) = batch.spans[0]
    row = batch.inputs["input_ids"][0].cpu()
    rows, cols = grid
    assert span.grid == grid and span.view == "full"
    assert batch.views[0].size == (cols * 28, rows * 28)
    brk, end = adapter.marker_ids
    # each row of the grid: cols image tokens in a run, then [IMG_BREAK] (the last row: [IMG_END])
    by_row = span.positions.reshape(rows, cols)
    assert torch.equal(by_row[:, 1:] - by_row[:, :-1], torch.ones(rows, cols - 1, dtype=torch.long))
    assert span.markers.tolist() == (by_row[:, -1] + 1).tolist()
    assert row[span.markers].tolist() == [brk] * (rows - 1) + [end]
    assert torch.equal(by_row[1:, 0], by_row[:-1, -1] + 2)  # the break sits between two rows
    assert span.extra_positions.numel() == 0
    assert bool((row[span.positions] == adapter.image_token_id).all())


def test_images_of_different_sizes_in_one_batch(adapter: Mistral3Adapter):
    images = [[random_image(0, 112, 84), random_image(1, 28, 56)], [random_image(2, 56, 112)]]
    batch = adapter.prepare(images, ["what is this", "is there a red thing in the picture"])
    assert [[span.grid for span in spans] for spans in batch.spans] == [[(3, 4), (2, 1)], [(4, 2)]]
    assert [view.size for view in batch.views] == [(112, 84), (28, 56), (56, 112)]
    assert [span.global_image for spans in batch.spans for span in spans] == [0, 1, 2]


def test_vision_features_are_each_tokens_merged_patches(adapter: Mistral3Adapter):
    """What the merger's linear receives for each token (unfolded, channel-major) is the normed
    ``vision_token_features`` row of that token, for every image of a batch of three sizes."""
    images = [[random_image(0, 112, 84), random_image(1, 28, 56)], [random_image(2, 56, 112)]]
    batch = adapter.prepare(images, ["what is this", "what is this"])
    projector = adapter.projector
    seen: dict[str, torch.Tensor] = {}
    handles = [
        projector.register_forward_pre_hook(lambda _m, args: seen.update(features=args[0].detach())),
        projector.patch_merger.merging_layer.register_forward_pre_hook(
            lambda _m, args: seen.update(merged=args[0].detach())
        ),
    ]
    try:
        with torch.no_grad():
            adapter.model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    merge = adapter.merge_size
    start = 0
    for span in (span for spans in batch.spans for span in spans):
        rows = adapter.vision_token_features(seen["features"], span).reshape(span.num_tokens, merge * merge, -1)
        with torch.no_grad():
            blocks = projector.norm(rows).transpose(1, 2).reshape(span.num_tokens, -1)
        torch.testing.assert_close(blocks, seen["merged"][start : start + span.num_tokens], rtol=0, atol=0)
        start += span.num_tokens
    assert start == seen["merged"].shape[0]
    assert adapter.patches_per_token == 4
    assert adapter.vision_passes(batch.spans[0][0]) == [12 * 4]


def test_spans_inside_generate_come_from_the_token_layout(adapter: Mistral3Adapter):
    """``generate`` gives the first forward ``mm_encoder_outputs``, no ``pixel_values`` nor ``image_sizes``;
    the spans found there are the ones ``prepare`` found."""
    images = [[random_image(0, 112, 84), random_image(1, 28, 56)], [random_image(2, 56, 112)]]
    batch = adapter.prepare(images, ["what is this", "is there a red thing in the picture"])
    encoded = [kwargs for kwargs in generate_forwards(adapter.model, batch.inputs) if kwargs.get("mm_encoder_outputs")]
    assert len(encoded) == 1
    assert encoded[0].get("pixel_values") is None and encoded[0].get("image_sizes") is None
    found = [adapter.find_spans(encoded[0])]
    for mine, theirs in zip(found[0], batch.spans, strict=True):
        assert [(s.grid, s.positions.tolist(), s.markers.tolist()) for s in mine] == [
            (s.grid, s.positions.tolist(), s.markers.tolist()) for s in theirs
        ]


def test_generate_under_a_prune_keeps_the_breaks(session: embedlens.Session, adapter: Mistral3Adapter):
    """A prune removes grid cells only: the [IMG_BREAK] / [IMG_END] text tokens stay in the sequence."""
    batch = adapter.prepare([[random_image(0, 112, 84)]], ["what is this"])
    with intervene(session, [Prune(indices=(0, 5, 11))]) as run, torch.no_grad():
        tokens = adapter.model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == batch.inputs["input_ids"].shape[1] + 3
    sample = run.last.samples[0]
    assert sample.pruned == [0, 5, 11]
    assert session.generate(random_image(0, 112, 84), prompt="what is this")


def test_layout_mismatch_is_an_input_error(adapter: Mistral3Adapter):
    batch = adapter.prepare([[random_image(0, 112, 84)]], ["what is this"])
    inputs = dict(batch.inputs)
    inputs["image_sizes"] = torch.tensor([[112, 84]])  # transposed: 4 x 3 tokens, the text holds 3 x 4
    with pytest.raises(InputError, match="3 x 4 grid"):
        adapter.find_spans(inputs)
    (span,) = batch.spans[0]
    brk, end = adapter.marker_ids
    ragged = batch.inputs["input_ids"].clone()
    ragged[0, span.positions[4]] = brk  # the second row loses its first token to a break
    with pytest.raises(InputError, match=r"rows of \[3, 4\] tokens"):
        adapter.find_spans({**batch.inputs, "input_ids": ragged})
    unclosed = batch.inputs["input_ids"].clone()
    unclosed[unclosed == end] = brk
    with pytest.raises(InputError, match="not closed by \\[IMG_END\\]"):
        adapter.find_spans({**batch.inputs, "input_ids": unclosed})
    with pytest.raises(InputError, match="1 images given but only 0"):
        adapter.find_spans({**batch.inputs, "input_ids": batch.inputs["input_ids"][:, :1]})


@pytest.mark.parametrize("adds_bos", [False, True])
def test_one_bos_whoever_writes_it(tmp_path, adds_bos: bool):
    """The chat template writes ``<s>``; a tokenizer that adds its own must not make it two."""
    path = build(tmp_path / "model", TinyMistral3Spec(adds_bos=adds_bos))
    adapter = embedlens.load(str(path), device="cpu").adapter
    batch = adapter.prepare([[random_image(0, 56, 56)]], ["what is this"])
    assert batch.texts[0].startswith("<s>[INST][IMG]")
    ids = batch.inputs["input_ids"][0].tolist()
    assert ids.count(adapter.tokenizer.bos_token_id) == 1 and ids[0] == adapter.tokenizer.bos_token_id


def test_benchmark_geometry_and_cells(tmp_path):
    """``make-patchbench``'s view of the family (config and processor only): a 112 px square of 28 px
    tokens the processor keeps, and one changed pixel changes exactly its token's cell, also in an image
    padded to a larger one in the same batch."""
    weightless, geometry = weightless_geometry(build(tmp_path / "model"))
    assert (geometry.width, geometry.height, geometry.patch, geometry.rows, geometry.cols) == (112, 112, 28, 4, 4)
    assert_pixel_changes_its_cell(weightless, geometry)
    before = Image.new("RGB", (112, 112), GREY)
    small = Image.new("RGB", (56, 28), GREY)  # 1 x 2 tokens, padded to 112 x 112 beside the square
    changed = small.copy()
    changed.putpixel((30, 5), (250, 10, 10))
    batch = weightless.prepare([[before, small], [before, changed]], ["what is this"] * 2)
    (_, old), (_, new) = weightless.cell_pixels(batch)
    assert old.shape == (2, 3 * 28 * 28)
    assert torch.nonzero((old != new).any(dim=1)).flatten().tolist() == [1]
