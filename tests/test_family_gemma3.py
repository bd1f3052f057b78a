"""Gemma 3 specifics the conformance suite cannot see, on the tiny random checkpoint (``tiny_gemma3``).

Why each matters: the pooled grid and the image markers are what every picture and prune is drawn on;
the per-layer mask and rotary hooks are what the intervention engine hands each decoder layer, so they
must be exactly what the stock forward gives it; the sqrt(d) scale of text embeddings must not leak into
the tables the lenses search; the prompt must carry one ``<bos>`` as Gemma expects.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import embedlens
from embedlens.capture import run_captured
from embedlens.errors import InputError
from embedlens.interventions import Prune, intervene, parse
from embedlens.models.gemma3 import Gemma3Adapter
from helpers import generate_forwards, random_image, recorded_inputs
from tiny_gemma3 import TinyGemma3Spec, build, build_tiny_gemma3
from tiny_parts import session_fixtures

PROMPTS = ["what is this", "is there a red thing in the picture"]


session, adapter = session_fixtures("gemma3", build, Gemma3Adapter)


# --------------------------------------------------------------------------- views and markers
class TestSpans:
    """One "full" view per image on the pooled grid, whatever the image's size, between its markers."""

    @pytest.mark.parametrize("size", [(80, 60), (30, 200), (400, 100), (112, 112)], ids=str)
    def test_one_pooled_view_per_image_any_size(self, adapter: Gemma3Adapter, size: tuple[int, int]):
        batch = adapter.prepare([[random_image(0, *size), random_image(1, *size)]], [PROMPTS[0]])
        assert [(s.view, s.grid, s.image, s.num_tokens) for s in batch.spans[0]] == [
            ("full", (4, 4), 0, 16),
            ("full", (4, 4), 1, 16),
        ]
        assert [view.size for view in batch.views] == [(112, 112)] * 2
        assert batch.inputs["pixel_values"].shape[0] == 2

    def test_markers_are_start_and_end_of_image(self, adapter: Gemma3Adapter):
        batch = adapter.prepare([[random_image(0), random_image(1)], [random_image(2)]], PROMPTS)
        boi, eoi = adapter.tokenizer.boi_token_id, adapter.tokenizer.eoi_token_id
        assert (boi, eoi) == adapter.marker_ids
        for row, spans in zip(batch.inputs["input_ids"], batch.spans, strict=True):
            for span in spans:
                first, last = int(span.positions[0]), int(span.positions[-1])
                assert span.markers.tolist() == [first - 1, last + 1]
                assert [int(row[p]) for p in span.markers] == [boi, eoi]
                assert span.extra_positions.numel() == 0

    def test_pan_and_scan_is_never_asked_for(self, adapter: Gemma3Adapter):
        """A wide image the processor would split into crops under pan-and-scan stays one view."""
        wide = random_image(0, 1200, 400)
        batch = adapter.prepare([[wide]], [PROMPTS[0]])
        assert len(batch.spans[0]) == 1 and batch.inputs["pixel_values"].shape[0] == 1
        # inputs built elsewhere with crops: each crop is a marked run of its own, reported as an image
        crops = adapter.processor(images=[[wide]], text=[batch.texts[0]], return_tensors="pt", do_pan_and_scan=True)
        spans = adapter.find_spans(crops)[0]
        assert crops["pixel_values"].shape[0] > 1
        assert [s.global_image for s in spans] == list(range(crops["pixel_values"].shape[0]))

    def test_spans_inside_generate_from_encoded_images(self, adapter: Gemma3Adapter):
        """generate encodes the images first: the prefill forward gets ``mm_encoder_outputs``, and
        find_spans must read the same spans from it."""
        batch = adapter.prepare([[random_image(0), random_image(1)], [random_image(2)]], PROMPTS)
        seen = generate_forwards(adapter.model, batch.inputs)
        prefill = seen[0]
        assert prefill.get("pixel_values") is None and prefill["mm_encoder_outputs"]["image"] is not None
        again = adapter.find_spans(prefill)
        assert [[s.positions.tolist() for s in row] for row in again] == [
            [s.positions.tolist() for s in row] for row in batch.spans
        ]
        # token_type_ids reach the prefill only (the bidirectional image mask), not the decode steps
        assert prefill["token_type_ids"] is not None and seen[1].get("token_type_ids") is None

    def test_grey_and_transparent_images_become_rgb(self, adapter: Gemma3Adapter):
        images = [random_image(0).convert("L"), random_image(1).convert("RGBA")]
        batch = adapter.prepare([images], [PROMPTS[0]])
        assert [view.mode for view in batch.views] == ["RGB", "RGB"] and len(batch.spans[0]) == 2

    def test_samples_without_images(self, adapter: Gemma3Adapter):
        batch = adapter.prepare([[random_image(0)], []], PROMPTS)
        assert [len(spans) for spans in batch.spans] == [1, 0]
        assert adapter.prepare([[], []], PROMPTS).spans == [[], []]

    def test_wrong_token_count_is_an_input_error(self, adapter: Gemma3Adapter):
        batch = adapter.prepare([[random_image(0)]], [PROMPTS[0]])
        cut = dict(batch.inputs)
        keep = torch.ones_like(cut["input_ids"], dtype=torch.bool)
        keep[0, int(batch.spans[0][0].positions[3])] = False
        cut["input_ids"] = cut["input_ids"][keep][None]
        with pytest.raises(InputError, match="not a multiple"):
            adapter.find_spans(cut)
        with pytest.raises(InputError, match="images given"):
            adapter.find_spans({"input_ids": batch.inputs["input_ids"], "pixel_values": torch.zeros(2, 3, 112, 112)})


def test_vision_token_features_are_the_pooled_patches(adapter: Gemma3Adapter):
    """Each grid token's vision features are what the projector's average pool gives that token."""
    batch = adapter.prepare([[random_image(0), random_image(1)], [random_image(2)]], PROMPTS)
    pooled: list[torch.Tensor] = []
    pool = adapter.projector.avg_pool
    handle = pool.register_forward_hook(lambda _m, _a, out: pooled.append(out.flatten(2).transpose(1, 2)))
    try:
        captured = run_captured(adapter, batch.inputs, [0], vision_features=True)
    finally:
        handle.remove()
    assert captured.vision_features.shape[1] == 64  # the 8 x 8 patch grid before pooling
    for spans in batch.spans:
        for span in spans:
            mine = adapter.vision_token_features(captured.vision_features, span)
            torch.testing.assert_close(mine, pooled[0][span.global_image])


# --------------------------------------------------------------------------- prompt
class TestPrompt:
    def test_one_bos_and_the_gemma_turns(self, adapter: Gemma3Adapter):
        batch = adapter.prepare([[random_image(0)]], [PROMPTS[0]])
        ids = batch.inputs["input_ids"][0].tolist()
        bos = adapter.tokenizer.bos_token_id
        assert ids.count(bos) == 1 and ids[0] == bos
        assert batch.texts[0].startswith("<bos><start_of_turn>user\n<start_of_image>what is this")
        assert batch.texts[0].endswith("<start_of_turn>model\n")
        # a raw prompt copied from the template keeps one <bos> too, and one without it gets the tokenizer's
        for raw in (batch.texts[0], batch.texts[0][len("<bos>") :]):
            again = adapter.prepare([[random_image(0)]], [raw], raw=True)
            assert torch.equal(again.inputs["input_ids"], batch.inputs["input_ids"])

    def test_without_template_the_placeholder_goes_first(self, tmp_path: Path):
        path = build(tmp_path / "model", TinyGemma3Spec(chat_template=None))
        adapter = embedlens.load(str(path), device="cpu").adapter
        assert adapter.format_prompt("what", num_images=2) == "<start_of_image><start_of_image>\nwhat"


# --------------------------------------------------------------------------- engine hooks
class TestLayerHooks:
    """``mask_key`` and ``position_embeddings`` give each layer exactly what the stock forward does."""

    def test_layer_types_mix_and_rotary_bases_differ(self, adapter: Gemma3Adapter):
        kinds = [adapter.mask_key(layer) for layer in range(adapter.num_layers)]
        assert kinds == ["sliding_attention", "full_attention", "sliding_attention"]
        hidden = torch.zeros(1, 8, 64)
        positions = torch.arange(8)[None]
        local, full = (
            adapter.position_embeddings(hidden, positions, 0),
            adapter.position_embeddings(hidden, positions, 1),
        )
        assert not torch.allclose(local[0], full[0])

    def test_each_layer_gets_its_mask_and_rotary(self, adapter: Gemma3Adapter):
        batch = adapter.prepare([[random_image(0)], [random_image(1)]], PROMPTS)
        stack, layers = recorded_inputs(adapter, batch.inputs)
        masks = stack["attention_mask"]
        assert isinstance(masks, dict) and set(masks) == {"full_attention", "sliding_attention"}
        hidden = stack["inputs_embeds"]
        positions = torch.arange(hidden.shape[1])[None]
        for index, got in enumerate(layers):
            assert got["attention_mask"] is masks[adapter.mask_key(index)]
            mine = adapter.position_embeddings(hidden, positions, index)
            for a, b in zip(mine, got["position_embeddings"], strict=True):
                assert torch.equal(a, b), f"layer {index}"

    def test_image_tokens_see_each_other_both_ways(self, adapter: Gemma3Adapter):
        """The bidirectional block over each image needs ``token_type_ids``, which encode keeps."""
        batch = adapter.prepare([[random_image(0)], [random_image(1)]], PROMPTS)
        assert "token_type_ids" in batch.inputs
        stack, _ = recorded_inputs(adapter, batch.inputs)
        for key in ("full_attention", "sliding_attention"):
            mask = stack["attention_mask"][key]
            allowed = mask if mask.dtype == torch.bool else mask == 0
            for sample, spans in enumerate(batch.spans):
                first, last = int(spans[0].positions[0]), int(spans[0].positions[-1])
                assert bool(allowed[sample, 0, first, last]), key  # an image token sees a later one
                text = int(spans[0].markers[1]) + 1
                assert not bool(allowed[sample, 0, first, text]), key  # but not the text after it


# --------------------------------------------------------------------------- embeddings and lenses
class TestScaledEmbeddings:
    def test_table_is_unscaled_and_tied(self, adapter: Gemma3Adapter):
        table = adapter.input_embeddings.weight
        ids = torch.tensor([[5, 9, 400]])
        scale = math.sqrt(table.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(adapter.input_embeddings(ids)[0], table[ids[0]] * scale)
        assert adapter.lm_head.weight.data_ptr() == table.data_ptr()

    def test_lens_never_returns_rows_past_the_tokenizer(self, tmp_path: Path):
        """Rows 1000..1023 (past the 1000-token tokenizer) are planted as the image's exact layer-0 vectors:
        both lenses must still return real tokens only."""
        model, processor = build_tiny_gemma3()
        image = random_image(0)
        encoded = processor(images=[[image]], text=["<start_of_image>"], return_tensors="pt")
        with torch.no_grad():
            hidden = model.model(**encoded, output_hidden_states=True).hidden_states[0][0]
            visual = hidden[encoded["input_ids"][0] == model.config.image_token_id]
            table = model.get_input_embeddings().weight
            table[1000 : 1000 + visual.shape[0]] = visual
            unit = torch.nn.functional.normalize
            # the plant works: over the whole table, every visual token's nearest row is past the tokenizer
            assert bool(((unit(visual, dim=-1) @ unit(table, dim=-1).T).argmax(dim=-1) >= 1000).all())
        model.save_pretrained(tmp_path / "model")
        processor.save_pretrained(tmp_path / "model")
        session = embedlens.load(str(tmp_path / "model"), device="cpu")
        assert session.adapter.input_embeddings.weight.shape[0] == 1024
        probe = session.probe(image, PROMPTS[0], lens=["embedding", "logit"], layers=[0, 3])
        for result in probe.results:
            assert int(result.top_ids.max()) < len(session.adapter.tokenizer), (result.lens, result.layer)


# --------------------------------------------------------------------------- sliding window
def test_window_shorter_than_the_sequence_changes_the_sliding_layers(tmp_path: Path):
    """With a window of 8 the sliding layers no longer see the image from the prompt's end: the
    sliding mask differs from the full one and the logits change."""
    image = random_image(0)
    logits = []
    for window in (512, 8):
        path = build(tmp_path / f"w{window}", TinyGemma3Spec(sliding_window=window))
        adapter = embedlens.load(str(path), device="cpu").adapter
        batch = adapter.prepare([[image]], [PROMPTS[1]])
        stack, _ = recorded_inputs(adapter, batch.inputs)
        masks = stack["attention_mask"]
        assert torch.equal(masks["full_attention"], masks["sliding_attention"]) == (window == 512)
        with torch.no_grad():
            logits.append(adapter.model(**batch.inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_inject_past_a_short_window_is_one_input_error(tmp_path: Path):
    """Inject gives later layers masks of their own; past a sliding window (whose cache drops old tokens)
    decoding stops with one clear error, while pruning alone keeps working."""
    path = build(tmp_path / "w8", TinyGemma3Spec(sliding_window=8))
    session = embedlens.load(str(path), device="cpu")
    batch = session.adapter.prepare([[random_image(0)]], [PROMPTS[1]])
    with torch.no_grad():
        with intervene(session, [parse("inject@1")]), pytest.raises(InputError, match="sliding-window layers"):
            session.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        with intervene(session, [Prune(indices=(0, 5))]):
            session.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------- session
def test_generate_and_prune_under_intervene(session: embedlens.Session):
    """The public generate works, and a prune inside ``generate`` removes the cells of every image
    (the bidirectional image mask is read at the kept columns, so the answer changes)."""
    image = random_image(0)
    plain = session.generate(image, prompt=PROMPTS[0], max_new_tokens=3)
    assert isinstance(plain, str) and plain
    adapter = session.adapter
    batch = adapter.prepare([[image, random_image(1)]], [PROMPTS[0]])
    cells = tuple(range(12))
    with torch.no_grad():
        base = adapter.model(**batch.inputs).logits[0, -1]
        with intervene(session, [Prune(indices=cells)]) as run:
            adapter.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
            pruned = adapter.model(**batch.inputs).logits[0, -1]
    expected = sorted(int(span.positions[cell]) for span in batch.spans[0] for cell in cells)
    assert sorted(run.records[0].samples[0].pruned_positions) == expected
    assert not torch.allclose(base, pruned)


def test_classify_without_anchors_is_one_input_error(session: embedlens.Session):
    with pytest.raises(InputError, match="no built-in anchors"):
        session.classify(random_image(0), PROMPTS[0])
