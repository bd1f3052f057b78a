"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL beyond the conformance suite: grids on several image shapes checked
against the model's own M-RoPE geometry, markers, spans inside ``generate``, the pictures of the views, the
position hooks against what the decoder layers really receive, and Qwen3-VL's DeepStack contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import embedlens
from embedlens.errors import InputError
from embedlens.interventions import intervene, parse
from embedlens.models.base import VisualSpan
from embedlens.models.qwen_vl import rope_planes
from helpers import generate_forwards, random_image
from tiny_qwen_vl import TOKENIZER_SIZE, QwenSpec, save_qwen

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Pixels per visual token a side (patch * merge).
FACTOR = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}
#: Visual-token grids (rows, cols) to lay out: wide, tall, square, one row.
GRIDS = ((2, 3), (3, 2), (2, 2), (1, 4))


@pytest.fixture(scope="module", params=FAMILIES)
def session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    family = request.param
    layers = 3 if family == "qwen3_vl" else 1
    path = save_qwen(tmp_path_factory.mktemp(family) / "model", QwenSpec(family, vision_layers=layers))
    return embedlens.load(str(path), device="cpu")


def _image(session: embedlens.Session, grid: tuple[int, int], seed: int = 0):
    factor = FACTOR[session.adapter.family]
    return random_image(seed, grid[1] * factor, grid[0] * factor)


def _mixed_batch(session: embedlens.Session):
    """A left-padded batch: a wide image, then a tall and a one-row image in one sample."""
    images = [[_image(session, (2, 3), 0)], [_image(session, (3, 2), 1), _image(session, (1, 4), 2)]]
    return session.adapter.prepare(images, ["what is this", "is there a red thing in the picture"])


def _keep_input(store: dict, key: object):
    """A decoder-layer pre-hook that keeps the first hidden state it sees under ``store[key]``."""

    def hook(_module, args, kwargs) -> None:
        if key not in store:
            store[key] = (args[0] if args else kwargs["hidden_states"]).clone()

    return hook


@pytest.fixture
def pre_hooks() -> Iterator[list]:
    handles: list = []
    yield handles
    for handle in handles:
        handle.remove()


class TestGrids:
    """Each image's span is its merged grid, row-major, as the model itself numbers the cells."""

    @pytest.mark.parametrize("grid", GRIDS, ids=str)
    def test_grid_follows_the_image_shape(self, session: embedlens.Session, grid: tuple[int, int]):
        batch = session.adapter.prepare([[_image(session, grid)]], ["what is this"])
        (span,) = batch.spans[0]
        assert span.grid == grid
        assert span.view == "full" and span.extra_positions.numel() == 0
        assert span.positions.tolist() == list(
            range(int(span.positions[0]), int(span.positions[0]) + grid[0] * grid[1])
        )

    def test_cells_are_row_major_in_the_models_own_positions(self, session: embedlens.Session):
        """The height and width M-RoPE planes the model computes give every cell its (row, col): a swapped
        or transposed grid fails here."""
        adapter = session.adapter
        batch = _mixed_batch(session)
        inputs = batch.inputs
        planes, _ = adapter.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        grids = []
        for spans in batch.spans:
            for span in spans:
                rows, cols = span.rows_cols()
                heights, widths = planes[1, span.sample, span.positions], planes[2, span.sample, span.positions]
                assert torch.equal(heights - heights[0], rows)
                assert torch.equal(widths - widths[0], cols)
                grids.append(span.grid)
        assert grids == [(2, 3), (3, 2), (1, 4)]

    def test_markers_are_the_vision_start_and_end(self, session: embedlens.Session):
        adapter = session.adapter
        batch = _mixed_batch(session)
        start, end = (adapter.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
        for spans in batch.spans:
            for span in spans:
                row = batch.inputs["input_ids"][span.sample]
                first, last = int(span.positions[0]), int(span.positions[-1])
                assert span.markers.tolist() == [first - 1, last + 1]
                assert [int(row[first - 1]), int(row[last + 1])] == [start, end]

    def test_grid_positions_hold_the_vision_towers_rows_in_order(self, session: embedlens.Session):
        """Layer 0 at cell ``i`` is row ``i`` of the image's merged features as the model scatters them (for
        Qwen2.5-VL after the window order is undone), across several windows and images."""
        adapter = session.adapter
        batch = _mixed_batch(session)
        inputs = batch.inputs
        seen: dict[str, torch.Tensor] = {}
        handle = adapter.decoder_layers[0].register_forward_pre_hook(_keep_input(seen, "layer0"), with_kwargs=True)
        try:
            with torch.no_grad():
                adapter.model(**inputs)
                features = adapter.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        finally:
            handle.remove()
        per_image = features.pooler_output
        for spans in batch.spans:
            for span in spans:
                assert torch.equal(seen["layer0"][span.sample, span.positions], per_image[span.global_image])

    def test_pictures_are_the_images_the_tower_sees(self, session: embedlens.Session):
        """Undoing the patch layout gives back the input (its size is already a multiple of the factor)."""
        images = [_image(session, (2, 3), 4), _image(session, (3, 2), 5)]
        batch = session.adapter.prepare([[images[0]], [images[1]]], ["what is this", "what is this"])
        assert [view.size for view in batch.views] == [image.size for image in images]
        for view, image in zip(batch.views, images, strict=True):
            difference = np.abs(np.asarray(view, dtype=int) - np.asarray(image, dtype=int))
            assert difference.max() <= 1

    def test_without_a_chat_template_the_image_block_goes_first(self, session: embedlens.Session):
        adapter = session.adapter
        saved = adapter.processor.chat_template, adapter.tokenizer.chat_template
        adapter.processor.chat_template = adapter.tokenizer.chat_template = None
        try:
            text = adapter.format_prompt("what is this", num_images=2)
            batch = adapter.prepare([[_image(session, (2, 3)), _image(session, (1, 4))]], ["what is this"])
        finally:
            adapter.processor.chat_template, adapter.tokenizer.chat_template = saved
        assert text == "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "\nwhat is this"
        assert [span.grid for span in batch.spans[0]] == [(2, 3), (1, 4)]
        assert all(span.markers.numel() == 2 for span in batch.spans[0])

    def test_extreme_aspect_ratio_is_an_input_error(self, session: embedlens.Session):
        with pytest.raises(InputError, match="aspect ratio"):
            session.adapter.prepare([[random_image(0, 250, 1)]], ["what is this"])

    def test_more_images_than_placeholders_is_an_input_error(self, session: embedlens.Session):
        adapter = session.adapter
        batch = adapter.prepare([[_image(session, (2, 2))]], ["what is this"])
        inputs = dict(batch.inputs)
        inputs["image_grid_thw"] = torch.cat([inputs["image_grid_thw"]] * 2)
        with pytest.raises(InputError, match="2 images given"):
            adapter.find_spans(inputs)


class TestInsideGenerate:
    """``generate`` passes encoded images and position ids instead of pixels and grids."""

    def test_first_forward_gives_the_same_spans(self, session: embedlens.Session):
        adapter = session.adapter
        batch = _mixed_batch(session)
        first = generate_forwards(adapter.model, batch.inputs)[0]
        assert "image_grid_thw" not in first and "pixel_values" not in first
        assert first["mm_encoder_outputs"]["image"] is not None and first["position_ids"].shape[0] == 4
        spans = adapter.find_spans(first)
        for mine, theirs in zip(spans, batch.spans, strict=True):
            assert [(s.grid, s.positions.tolist(), s.markers.tolist()) for s in mine] == [
                (s.grid, s.positions.tolist(), s.markers.tolist()) for s in theirs
            ]

    def test_encoded_images_without_positions_is_an_input_error(self, session: embedlens.Session):
        adapter = session.adapter
        batch = adapter.prepare([[_image(session, (2, 2))]], ["what is this"])
        with torch.no_grad():
            encoded = adapter.model.model.get_image_features(
                batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]
            )
        with pytest.raises(InputError, match="position ids"):
            adapter.find_spans({"input_ids": batch.inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}})


class TestPositionHooks:
    """``position_embeddings`` and ``layer_position_ids`` give the decoder layers what the model gives them."""

    def _record(self, session: embedlens.Session, pre_hooks: list, generate: bool) -> tuple[dict, dict]:
        adapter = session.adapter
        llm: dict = {}
        layer: dict = {}

        def llm_hook(_m, _args, kwargs) -> None:
            llm.setdefault("position_ids", kwargs.get("position_ids"))

        pre_hooks.append(adapter.language_model.register_forward_pre_hook(llm_hook, with_kwargs=True))

        def hook(_m, args, kwargs) -> None:
            if "hidden" not in layer:
                layer.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

        pre_hooks.append(adapter.decoder_layers[1].register_forward_pre_hook(hook, with_kwargs=True))
        batch = _mixed_batch(session)
        with torch.no_grad():
            if generate:
                adapter.model.generate(**batch.inputs, max_new_tokens=1, do_sample=False)
            else:
                adapter.model(**batch.inputs)
        return llm, layer

    @pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
    def test_hooks_reproduce_the_layer_inputs(self, session: embedlens.Session, pre_hooks: list, generate: bool):
        adapter = session.adapter
        llm, layer = self._record(session, pre_hooks, generate)
        positions = llm["position_ids"]
        assert positions.shape[0] == (4 if generate else 3)
        expected = layer.get("position_ids")
        got = adapter.layer_position_ids(positions)
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.equal(got, expected)
        cos, sin = adapter.position_embeddings(layer["hidden"], positions, layer=1)
        assert torch.equal(cos, layer["position_embeddings"][0]) and torch.equal(sin, layer["position_embeddings"][1])

    def test_flat_positions(self, session: embedlens.Session):
        """``[B, T]`` positions are the same in every plane; Qwen3-VL passes them on to its layers."""
        adapter = session.adapter
        flat = torch.arange(6)[None].expand(2, 6)
        assert torch.equal(rope_planes(flat), flat[None].expand(3, 2, 6))
        hidden = torch.zeros(2, 6, adapter.input_embeddings.weight.shape[1])
        cos, _ = adapter.position_embeddings(hidden, flat)
        assert torch.equal(cos, adapter.position_embeddings(hidden, flat[None].expand(3, 2, 6))[0])
        passed = adapter.layer_position_ids(flat)
        assert passed is flat if adapter.family == "qwen3_vl" else passed is None
        with pytest.raises(InputError):
            rope_planes(torch.zeros(2, 2, 6, dtype=torch.long))


class TestUnderInterventions:
    """Pruning a left-padded batch whose second sample holds two images of other shapes: cached decoding
    equals recomputing the whole sequence (M-RoPE positions kept or renumbered, DeepStack at the kept
    tokens), and the recorded prune hits every image."""

    @pytest.mark.parametrize("notation", ["prune:[0,2,3]", "prune:[0,2,3],positions=reindex"])
    def test_cached_decoding_equals_recomputing(self, session: embedlens.Session, notation: str):
        steps = 3
        model = session.model
        batch = _mixed_batch(session)
        items = [parse(notation)]
        with intervene(session, items) as run, torch.no_grad():
            cached = model.generate(
                **batch.inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
            )
        assert [sample.pruned for sample in run.last.samples] == [[0, 2, 3], [0, 2, 3] * 2]  # cells of each image
        inputs = dict(batch.inputs)
        recomputed = []
        for _ in range(steps):
            with intervene(session, items), torch.no_grad():
                logits = model(**inputs, use_cache=False).logits[:, -1]
            recomputed.append(logits)
            step = logits.argmax(dim=-1, keepdim=True)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], step], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(step)], dim=1)
        torch.testing.assert_close(torch.stack(cached.logits, dim=1), torch.stack(recomputed, dim=1), rtol=0, atol=1e-5)


class TestUserFacing:
    def test_tiny_processor_matches_the_vision_config(self, session: embedlens.Session):
        vision = session.adapter.model.config.vision_config
        image_processor = session.adapter.processor.image_processor
        assert image_processor.patch_size == vision.patch_size
        assert image_processor.merge_size == vision.spatial_merge_size
        assert image_processor.temporal_patch_size == vision.temporal_patch_size
        batch = session.adapter.prepare([[_image(session, (2, 3))]], ["what is this"])
        types = batch.inputs["mm_token_type_ids"][0]
        assert torch.equal(types.bool(), batch.inputs["input_ids"][0] == session.adapter.image_token_id)

    def test_probe_never_returns_ids_past_the_tokenizer(self, session: embedlens.Session):
        result = session.probe(_image(session, (2, 3)), layer=0, top_k=50)
        assert result.provenance.rows_left_out == session.adapter.input_embeddings.weight.shape[0] - TOKENIZER_SIZE > 0
        assert int(np.asarray(result.top_ids).max()) < TOKENIZER_SIZE

    def test_generate(self, session: embedlens.Session):
        text = session.generate(_image(session, (2, 3)), prompt="what is this", max_new_tokens=3)
        assert isinstance(text, str)


# --------------------------------------------------------------------------- DeepStack
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    path = save_qwen(tmp_path_factory.mktemp("qwen3-deepstack") / "model", QwenSpec("qwen3_vl", vision_layers=3))
    return embedlens.load(str(path), device="cpu")


class TestDeepStack:
    """Qwen3-VL's DeepStack features as dense per-layer additions (what the intervention engine adds)."""

    def test_popping_and_adding_by_hand_is_the_untouched_model(self, qwen3: embedlens.Session, pre_hooks: list):
        """A pre-hook on the language model pops the features and forward hooks add ``dense[i]`` to decoder
        layer ``i``'s output: the logits are bit-identical, and without the additions they are not."""
        adapter = qwen3.adapter
        batch = _mixed_batch(qwen3)
        with torch.no_grad():
            base = adapter.model(**batch.inputs).logits
        additions: dict[int, torch.Tensor] = {}

        def pop(_m, args, kwargs):
            length = kwargs["inputs_embeds"].shape[1]
            additions.update(adapter.pop_layer_additions(kwargs, length))
            assert "visual_pos_masks" not in kwargs and "deepstack_visual_embeds" not in kwargs
            return args, kwargs

        pre_hooks.append(adapter.language_model.register_forward_pre_hook(pop, with_kwargs=True))
        with torch.no_grad():
            dropped = adapter.model(**batch.inputs).logits
        assert not torch.allclose(dropped, base), "DeepStack should change the logits"
        for layer in range(adapter.num_layers):
            pre_hooks.append(
                adapter.decoder_layers[layer].register_forward_hook(
                    lambda _m, _a, out, layer=layer: out + additions[layer] if layer in additions else out
                )
            )
        with torch.no_grad():
            hooked = adapter.model(**batch.inputs).logits
        assert sorted(additions) == [0, 1, 2]
        assert torch.equal(hooked, base)
        visual = batch.inputs["input_ids"] == adapter.image_token_id
        for dense in additions.values():
            assert dense.shape == (*visual.shape, adapter.input_embeddings.weight.shape[1])
            assert bool((dense[~visual] == 0).all()) and bool((dense[visual] != 0).any())

    def test_nothing_to_pop(self, qwen3: embedlens.Session):
        kwargs: dict = {"inputs_embeds": torch.zeros(1, 4, 8)}
        assert qwen3.adapter.pop_layer_additions(kwargs, 4) == {}
        kwargs = {"visual_pos_masks": None, "deepstack_visual_embeds": None}
        assert qwen3.adapter.pop_layer_additions(kwargs, 4) == {} and kwargs == {}

    def test_lens_reads_what_the_decoder_layers_read(self, qwen3: embedlens.Session):
        """Layers 1..3 of the lens are the inputs of decoder layers 1..3, DeepStack additions included."""
        adapter = qwen3.adapter
        image = _image(qwen3, (2, 3))
        (probe,) = qwen3.probe_layers([image], ["what is this"], layers=[1, 2, 3], lens=["embedding"], top_k=3)
        batch = adapter.prepare([[image]], ["what is this"])
        inputs: dict[int, torch.Tensor] = {}
        handles = [
            adapter.decoder_layers[layer].register_forward_pre_hook(_keep_input(inputs, layer), with_kwargs=True)
            for layer in (1, 2, 3)
        ]
        try:
            with torch.no_grad():
                adapter.model(**batch.inputs)
        finally:
            for handle in handles:
                handle.remove()
        table = adapter.input_embeddings.weight[:TOKENIZER_SIZE].double()
        table = table / table.norm(dim=-1, keepdim=True)
        for result in probe.results:
            vectors = inputs[result.layer][0, torch.as_tensor(result.position)].double()
            scores = (vectors / vectors.norm(dim=-1, keepdim=True)) @ table.T
            expected = torch.sort(-scores, dim=-1, stable=True).indices[:, :3]
            assert torch.equal(torch.as_tensor(result.top_ids), expected), f"layer {result.layer}"


def test_tiny_builds_fast(tmp_path: Path):
    import time

    start = time.perf_counter()
    for family in FAMILIES:
        save_qwen(tmp_path / family, QwenSpec(family))
    assert time.perf_counter() - start < 3.0


def test_vision_token_features_are_what_the_merger_joins(session: embedlens.Session):
    """Feeding each token's patch features back through the merger, in grid order, gives layer 0 at the
    span's positions: the features belong to those tokens, in that order (Qwen2.5-VL: out of window order)."""
    from embedlens.capture import run_captured

    adapter = session.adapter
    batch = _mixed_batch(session)
    captured = run_captured(adapter, batch.inputs, [0], vision_features=True)
    merger = adapter.projector
    for spans in batch.spans:
        for span in spans:
            tokens = adapter.vision_token_features(captured.vision_features, span)
            assert tokens.shape[0] == span.num_tokens
            with torch.inference_mode():
                merged = merger(tokens.reshape(span.num_tokens * adapter.merge_size**2, -1))
            torch.testing.assert_close(merged, captured.hidden[0][span.sample, span.positions], rtol=0, atol=1e-6)
    last = batch.spans[1][-1]
    with pytest.raises(embedlens.EmbedLensError):
        adapter.vision_token_features(captured.vision_features[:-1], last)
    plain = VisualSpan(last.sample, last.image, last.global_image, last.positions, last.grid)
    with pytest.raises(embedlens.EmbedLensError):
        adapter.vision_token_features(captured.vision_features, plain)
