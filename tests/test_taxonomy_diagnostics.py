"""Per-token diagnostics (norms, anchor similarity, cross-layer and cross-image cosine, attention received), each
against an independent computation with plain ``transformers`` calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from embedlens import InputError
from embedlens.taxonomy import Anchors, attention_implementation, diagnose, eager_attention
from embedlens.taxonomy.diagnostics import cross_image_cosine
from taxonomy_planting import OVERLAP_PATCH, PLANTED, expected_groups, plant, unit_rows

CHEAP = ["row", "col", "group", "anchor_id", "vision_norm", "projected_norm", "anchor_cosine"]


def tiny_anchors(session) -> Anchors:
    return Anchors.for_tokenizer({"dead": [500]}, session.adapter.tokenizer, model="tiny")


def text_queries(input_ids: torch.Tensor, positions: torch.Tensor, image_id: int) -> list[int]:
    return [q for q in range(input_ids.shape[0]) if q > int(positions.max()) and int(input_ids[q]) != image_id]


class TestCheapDiagnostics:
    """Norms and anchor similarity explain why a token got its group; they must be the plain numbers."""

    def test_planted(self, fresh_tiny, make_image):
        planted_anchors, rows = plant(fresh_tiny)
        image = make_image(1)
        frame = diagnose(fresh_tiny, image, anchors=planted_anchors)
        assert list(frame.columns) == CHEAP
        assert frame.index.name == "index" and frame.index.tolist() == list(range(16))
        assert frame["group"].tolist() == expected_groups()
        assert frame.attrs == {"cross_layer": None, "attention_layers": [], "cross_image": False}
        np.testing.assert_allclose(frame["projected_norm"], rows.double().norm(dim=1).numpy(), rtol=1e-12)

        # vision norm: the projector's input = CLIP's penultimate layer without CLS ("default" strategy)
        batch = fresh_tiny.prepare([image])
        config = fresh_tiny.model.config
        assert config.vision_feature_select_strategy == "default"
        with torch.inference_mode():
            out = fresh_tiny.adapter.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[config.vision_feature_layer][0, 1:]
        np.testing.assert_allclose(frame["vision_norm"], features.double().norm(dim=1).numpy(), rtol=1e-6)

        # anchor cosine: 1 for the planted rows, cos(mix, vit row) for the overlap patch, NaN when alive
        for patch in PLANTED.values():
            assert frame.loc[patch, "anchor_cosine"] == pytest.approx(1.0, abs=1e-6)
        vit = planted_anchors.groups["vit_sink"][0]
        table = unit_rows(fresh_tiny.adapter.input_embeddings.weight)
        mix = unit_rows(rows[OVERLAP_PATCH : OVERLAP_PATCH + 1])[0]
        assert frame.loc[OVERLAP_PATCH, "anchor_cosine"] == pytest.approx(float(mix @ table[vit]), abs=1e-6)
        alive = frame["group"] == "alive"
        assert frame.loc[alive, "anchor_cosine"].isna().all() and frame.loc[alive, "anchor_id"].isna().all()
        assert frame.loc[~alive, "anchor_cosine"].notna().all()

    def test_batch_equals_single(self, tiny, make_image):
        images = [make_image(5), make_image(6, 70, 50)]
        prompts = ["Describe", "What colour is the big shape ?"]
        frames = diagnose(tiny, images, prompts, anchors=tiny_anchors(tiny))
        for image, prompt, frame in zip(images, prompts, frames, strict=True):
            single = diagnose(tiny, image, prompt, anchors=tiny_anchors(tiny))
            for column in ("vision_norm", "projected_norm"):
                np.testing.assert_allclose(frame[column], single[column], rtol=1e-5)
            assert frame["group"].tolist() == single["group"].tolist()


class TestCrossLayer:
    """Dead tokens are those the LLM barely changes: the cosine must compare the same token at layer 0
    and layer l of one forward pass."""

    @pytest.mark.parametrize("layer", [1, 3])
    def test_equals_hidden_states(self, tiny, make_image, layer):
        image = make_image(7)
        frame = diagnose(tiny, image, anchors=tiny_anchors(tiny), cross_layer=layer)
        batch = tiny.prepare([image])
        positions = batch.spans[0][0].positions
        with torch.inference_mode():
            hidden = tiny.model(**batch.inputs, output_hidden_states=True).hidden_states
        a, b = hidden[0][0, positions].double(), hidden[layer][0, positions].double()
        expected = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        np.testing.assert_allclose(frame["cross_layer_cosine"], expected.numpy(), rtol=1e-6, atol=1e-6)
        assert frame.attrs["cross_layer"] == layer
        assert (frame["cross_layer_cosine"] < 1.0 - 1e-6).any()

    def test_layer_zero_is_one(self, tiny, make_image):
        frame = diagnose(tiny, make_image(7), anchors=tiny_anchors(tiny), cross_layer=0)
        np.testing.assert_allclose(frame["cross_layer_cosine"], 1.0, atol=1e-12)

    def test_out_of_range(self, tiny, image_path):
        with pytest.raises(InputError, match="out of range"):
            diagnose(tiny, image_path, anchors=tiny_anchors(tiny), cross_layer=5)


class TestAttentionReceived:
    """Attention from the text after the image to each visual token, from eager weights; the model's
    attention implementation must be back to what it was afterwards, whatever happens."""

    def test_equals_output_attentions(self, fresh_tiny, tiny_dir, make_image):
        image = make_image(8)
        layers = [0, 2]
        frame = diagnose(fresh_tiny, image, anchors=tiny_anchors(fresh_tiny), attention_layers=layers, cross_layer=1)
        assert frame.attrs["attention_layers"] == layers
        reference = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
        batch = fresh_tiny.prepare([image])
        positions = batch.spans[0][0].positions
        queries = text_queries(batch.inputs["input_ids"][0], positions, fresh_tiny.adapter.image_token_id)
        assert len(queries) > 3  # "\nDescribe the image. ASSISTANT:"
        with torch.inference_mode():
            attentions = reference(**batch.inputs, output_attentions=True).attentions
        per_layer = [attentions[layer][0].double().mean(0)[queries][:, positions].mean(0) for layer in layers]
        expected = torch.stack(per_layer).mean(0).numpy()
        np.testing.assert_allclose(frame["text_attention"], expected, rtol=1e-5, atol=1e-9)
        assert 0 < frame["text_attention"].sum() < 1  # a text query's mean share of attention on the image
        np.testing.assert_allclose(frame["text_attention_share"].sum(), 1.0, atol=1e-12)
        np.testing.assert_allclose(frame["text_attention_share"], expected / expected.sum(), rtol=1e-5)

    def test_negative_layer_and_range(self, fresh_tiny, image_path):
        anchors = tiny_anchors(fresh_tiny)
        last = diagnose(fresh_tiny, image_path, anchors=anchors, attention_layers=-1)
        assert last.attrs["attention_layers"] == [3]
        explicit = diagnose(fresh_tiny, image_path, anchors=anchors, attention_layers=3)
        np.testing.assert_allclose(last["text_attention"], explicit["text_attention"])
        for bad in (4, -5):
            with pytest.raises(InputError, match="attention layer"):
                diagnose(fresh_tiny, image_path, anchors=anchors, attention_layers=[bad])

    def test_eager_only_when_asked_and_restored(self, fresh_tiny, image_path):
        adapter = fresh_tiny.adapter
        vision_before = fresh_tiny.model.config.vision_config._attn_implementation
        assert attention_implementation(adapter) == "sdpa"
        seen: list[str | None] = []
        handle = adapter.decoder_layers[0].register_forward_pre_hook(
            lambda *_: seen.append(attention_implementation(adapter))
        )
        try:
            diagnose(fresh_tiny, image_path, anchors=tiny_anchors(fresh_tiny))
            diagnose(fresh_tiny, image_path, anchors=tiny_anchors(fresh_tiny), attention_layers=[1])
        finally:
            handle.remove()
        assert seen == ["sdpa", "eager"]
        assert attention_implementation(adapter) == "sdpa"
        assert fresh_tiny.model.config.vision_config._attn_implementation == vision_before

    def test_restored_on_exception(self, fresh_tiny, image_path):
        adapter = fresh_tiny.adapter

        def boom(*_):
            raise RuntimeError("boom")

        handle = adapter.decoder_layers[1].register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                diagnose(fresh_tiny, image_path, anchors=tiny_anchors(fresh_tiny), attention_layers=[2])
        finally:
            handle.remove()
        assert attention_implementation(adapter) == "sdpa"
        assert all(not adapter.attention(layer)._forward_hooks for layer in range(adapter.num_layers))
        with pytest.raises(KeyError), eager_attention(adapter):
            assert attention_implementation(adapter) == "eager"
            raise KeyError("inside")
        assert attention_implementation(adapter) == "sdpa"

    def test_model_already_eager_stays_eager(self, fresh_tiny, image_path):
        fresh_tiny.model.set_attn_implementation({"text_config": "eager"})
        frame = diagnose(fresh_tiny, image_path, anchors=tiny_anchors(fresh_tiny), attention_layers=[0])
        assert frame["text_attention"].notna().all()
        assert attention_implementation(fresh_tiny.adapter) == "eager"


class VaryingProjector(nn.Module):
    """The planted projector, except that the unplanted patches also get an image-dependent term (a fixed
    linear map of the vision features, kept orthogonal to the anchor rows so those patches stay alive).
    Planted patches are identical in every image; the others differ per image."""

    def __init__(self, rows: torch.Tensor, anchor_rows: torch.Tensor, d_vision: int) -> None:
        super().__init__()
        basis, _ = torch.linalg.qr(anchor_rows.double().T)  # [d, 3]
        g = torch.Generator().manual_seed(11)
        weight = torch.randn(d_vision, rows.shape[1], generator=g, dtype=torch.float64)
        varying = torch.ones(rows.shape[0], 1, dtype=torch.float64)
        varying[[*PLANTED.values(), OVERLAP_PATCH]] = 0.0
        self.register_buffer("rows", rows.detach().double().clone())
        self.register_buffer("basis", basis)
        self.register_buffer("weight", weight)
        self.register_buffer("varying", varying)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        extra = features.double() @ self.weight  # [images, n, d]
        extra = extra - (extra @ self.basis) @ self.basis.T
        extra = extra / extra.norm(dim=-1, keepdim=True) * self.rows.norm(dim=-1, keepdim=True)
        return (self.rows + self.varying * extra).to(features.dtype)


def reference_cross_image(hidden0: torch.Tensor, positions: list[torch.Tensor], groups: list[list[str]]) -> np.ndarray:
    """Independent float64 loop: cosine of each token with the mean of the same cell and group in the
    other images; shape ``[images, n]``."""
    vectors = [hidden0[s, positions[s]].double() for s in range(len(positions))]
    out = np.full((len(vectors), vectors[0].shape[0]), np.nan)
    for s, own in enumerate(vectors):
        for i in range(own.shape[0]):
            others = [vectors[t][i] for t in range(len(vectors)) if t != s and groups[t][i] == groups[s][i]]
            if others:
                mean = torch.stack(others).mean(0)
                out[s, i] = float(own[i] @ mean / (own[i].norm() * mean.norm()))
    return out


class TestCrossImage:
    """Cross-image consistency: sinks and dead tokens are the same in every image, alive tokens are not."""

    def test_planted_batch(self, fresh_tiny, make_image):
        anchors, rows = plant(fresh_tiny)
        table = fresh_tiny.adapter.input_embeddings.weight.detach()
        anchor_rows = table[[anchors.groups[name][0] for name in PLANTED]]
        d_vision = fresh_tiny.model.config.vision_config.hidden_size
        fresh_tiny.model.model.multi_modal_projector = VaryingProjector(rows, anchor_rows, d_vision)
        images = [make_image(21), make_image(22, 70, 50), make_image(23)]
        frames = diagnose(fresh_tiny, images, anchors=anchors, cross_image=True)
        assert [frame.columns.tolist() for frame in frames] == [[*CHEAP, "cross_image_cosine"]] * 3
        assert all(frame.attrs["cross_image"] is True for frame in frames)
        assert all(frame["group"].tolist() == expected_groups() for frame in frames)

        planted = [*PLANTED.values(), OVERLAP_PATCH]
        alive = [i for i in range(16) if i not in planted]
        for frame in frames:
            np.testing.assert_allclose(frame.loc[planted, "cross_image_cosine"], 1.0, rtol=0, atol=1e-6)
            assert (frame.loc[alive, "cross_image_cosine"] < 0.99).all()

        batch = fresh_tiny.prepare(images)
        with torch.inference_mode():
            hidden0 = fresh_tiny.model(**batch.inputs, output_hidden_states=True).hidden_states[0]
        positions = [spans[0].positions for spans in batch.spans]
        expected = reference_cross_image(hidden0, positions, [frame["group"].tolist() for frame in frames])
        for frame, values in zip(frames, expected, strict=True):
            np.testing.assert_allclose(frame["cross_image_cosine"], values, rtol=1e-9, atol=1e-12)

    def test_single_image_is_nan(self, tiny, make_image):
        frame = diagnose(tiny, make_image(24), anchors=tiny_anchors(tiny), cross_image=True)
        assert frame.columns.tolist() == [*CHEAP, "cross_image_cosine"]
        assert frame["cross_image_cosine"].isna().all()
        assert frame.attrs["cross_image"] is True
        [only] = diagnose(tiny, [make_image(24)], anchors=tiny_anchors(tiny), cross_image=True)
        assert only["cross_image_cosine"].isna().all()

    def test_absent_by_default_and_checked(self, tiny, make_image):
        frames = diagnose(tiny, [make_image(25), make_image(26)], anchors=tiny_anchors(tiny))
        assert all(frame.columns.tolist() == CHEAP and frame.attrs["cross_image"] is False for frame in frames)
        with pytest.raises(InputError, match="cross_image"):
            diagnose(tiny, make_image(25), anchors=tiny_anchors(tiny), cross_image="yes")

    def test_same_group_and_cell_only(self):
        """Only tokens of the same group at the same cell are averaged; a lone (cell, group) is NaN."""
        g = torch.Generator().manual_seed(0)
        vectors = [torch.randn(4, 5, generator=g) for _ in range(3)]
        groups = [np.array(["dead", "alive", "alive", "alive"])] * 2 + [
            np.array(["vit_sink", "alive", "alive", "alive"])
        ]
        rows = [np.array([0, 0, 1, 1])] * 3
        cols = [np.array([0, 1, 0, 1])] * 3
        scores = cross_image_cosine(vectors, groups, rows, cols)
        v = [x.double() for x in vectors]

        def cos(a, b):
            return float(a @ b / (a.norm() * b.norm()))

        assert scores[0][0] == pytest.approx(cos(v[0][0], v[1][0]), abs=1e-12)  # image 2's cell 0 is vit_sink
        assert scores[1][0] == pytest.approx(cos(v[1][0], v[0][0]), abs=1e-12)
        assert np.isnan(scores[2][0])
        assert scores[2][3] == pytest.approx(cos(v[2][3], (v[0][3] + v[1][3]) / 2), abs=1e-12)
        # cells are matched by (row, col), not by position in the list
        perm = np.array([3, 1, 0, 2])
        permuted = cross_image_cosine(
            [vectors[0], vectors[1][perm], vectors[2]],
            [groups[0], groups[1][perm], groups[2]],
            [rows[0], rows[1][perm], rows[2]],
            [cols[0], cols[1][perm], cols[2]],
        )
        np.testing.assert_array_equal(permuted[0], scores[0])
        np.testing.assert_array_equal(permuted[1], scores[1][perm])
        assert cross_image_cosine([], [], [], []) == []
