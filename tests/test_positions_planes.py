"""Position planes under pruning (:mod:`embedlens.interventions.positions`), on hand-worked examples.

Qwen-style M-RoPE gives every token three positions (temporal, height, width): text tokens the same value
in all three, an image's tokens ``start + (t, h, w)``, and the text after an image continues one past its
largest value. ``generate`` adds a plain text plane in front (four planes). These checks spell out what
``keep`` and ``reindex`` give, value by value, so the definition in the module docstring is pinned down.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.interventions.positions import from_planes, next_positions, prefill_positions, to_planes


def _mrope_row() -> tuple[torch.Tensor, torch.Tensor]:
    """Three text tokens, one image of 2 x 3 cells (t=1), two text tokens: planes ``[3, 1, 11]`` and the
    image each column belongs to ``[1, 11]``."""
    h = torch.tensor([0, 0, 0, 1, 1, 1])
    w = torch.tensor([0, 1, 2, 0, 1, 2])
    text_before = torch.arange(3)
    image = torch.stack([torch.full((6,), 3), 3 + h, 3 + w])
    text_after = torch.tensor([6, 7])
    planes = torch.cat([text_before.expand(3, 3), image, text_after.expand(3, 2)], dim=1)[:, None]
    segment = torch.tensor([[-1] * 3 + [0] * 6 + [-1] * 2])
    return planes, segment


def test_to_and_from_planes():
    flat = torch.arange(5)[None].expand(2, 5)
    assert to_planes(flat, 2, 5, torch.device("cpu")).shape == (1, 2, 5)
    assert torch.equal(from_planes(to_planes(flat, 2, 5, torch.device("cpu")), planar=False), flat)
    assert torch.equal(to_planes(None, 2, 5, torch.device("cpu"))[0, 1], torch.arange(5))
    planar = torch.zeros(3, 2, 5, dtype=torch.long)
    assert from_planes(to_planes(planar, 2, 5, torch.device("cpu")), planar=True).shape == (3, 2, 5)


def test_keep_leaves_positions_and_shift_zero():
    planes, segment = _mrope_row()
    mask = torch.ones(1, 11, dtype=torch.bool)
    kept = mask.clone()
    kept[0, [4, 7]] = False
    positions, shift = prefill_positions(planes, mask, kept, segment, "keep")
    assert torch.equal(positions, planes)
    assert shift.tolist() == [[0], [0], [0]]


def test_reindex_closes_an_emptied_column():
    """Pruning the middle column (w = 1) of both rows: the image becomes 2 x 2, the text after it moves up one."""
    planes, segment = _mrope_row()
    mask = torch.ones(1, 11, dtype=torch.bool)
    kept = mask.clone()
    kept[0, [4, 7]] = False
    positions, shift = prefill_positions(planes, mask, kept, segment, "reindex")
    columns = torch.nonzero(kept[0]).flatten()
    got = positions[:, 0, columns].tolist()
    assert got == [
        [0, 1, 2, 3, 3, 3, 3, 5, 6],  # t: one frame
        [0, 1, 2, 3, 3, 4, 4, 5, 6],  # h: two rows
        [0, 1, 2, 3, 4, 3, 4, 5, 6],  # w: two columns left
    ]
    # the untouched sequence continues at 8 in every plane, the reindexed one at 7
    assert next_positions(planes, mask).tolist() == [[8], [8], [8]]
    assert shift.tolist() == [[1], [1], [1]]


def test_reindex_keeps_a_scattered_grid_spatial():
    """Pruning two cells that empty no row or column changes no image position, only nothing after it."""
    planes, segment = _mrope_row()
    mask = torch.ones(1, 11, dtype=torch.bool)
    kept = mask.clone()
    kept[0, [3, 8]] = False  # cells (0, 0) and (1, 2)
    positions, shift = prefill_positions(planes, mask, kept, segment, "reindex")
    columns = torch.nonzero(kept[0]).flatten()
    assert torch.equal(positions[:, 0, columns], planes[:, 0, columns])
    assert shift.tolist() == [[0], [0], [0]]


def test_reindex_of_one_plane_is_plain_renumbering_with_left_padding():
    original = torch.tensor([[[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]])
    mask = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    segment = torch.tensor([[-1, -1, -1, 0, 0, -1, -1], [-1, 0, 0, 0, -1, -1, -1]])
    kept = mask.clone()
    kept[0, 3] = False
    kept[1, [1, 3]] = False
    positions, shift = prefill_positions(original, mask, kept, segment, "reindex")
    assert positions[0, 0, kept[0]].tolist() == [0, 1, 2, 3]
    assert positions[0, 1, kept[1]].tolist() == [0, 1, 2, 3, 4]
    assert shift.tolist() == [[1, 2]]


def test_reindex_with_a_text_plane_in_front():
    """Four planes: the text plane renumbers as 1-D positions, the three M-RoPE planes as above."""
    planes, segment = _mrope_row()
    text = torch.arange(11)[None, None]
    four = torch.cat([text, planes])
    mask = torch.ones(1, 11, dtype=torch.bool)
    kept = mask.clone()
    kept[0, [4, 7]] = False
    positions, shift = prefill_positions(four, mask, kept, segment, "reindex")
    columns = torch.nonzero(kept[0]).flatten()
    assert positions[0, 0, columns].tolist() == list(range(9))
    assert torch.equal(positions[1:], prefill_positions(planes, mask, kept, segment, "reindex")[0])
    assert shift.tolist() == [[2], [1], [1], [1]]


def test_planes_need_the_image_of_every_column_only_to_reindex():
    planes, _ = _mrope_row()
    mask = torch.ones(1, 11, dtype=torch.bool)
    assert torch.equal(prefill_positions(planes, mask, mask, None, "keep")[0], planes)
    with pytest.raises(ValueError, match="image of every visual column"):
        prefill_positions(planes, mask, mask, None, "reindex")
