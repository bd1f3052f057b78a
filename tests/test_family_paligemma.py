"""PaliGemma specifics the conformance suite cannot see, on tiny random checkpoints (``tiny_paligemma``).

Why each matters: the whole prompt (images, ``<bos>``, text) attends both ways, through ``token_type_ids``
that :meth:`encode` must keep and the masks each decoder layer takes by its layer type; the suite's own
prune reference ends at the LM head and its decoding reference grows ``token_type_ids`` by 0 (a prompt
token), while PaliGemma soft-caps its logits and marks generated tokens 1, so both checks are redone here
the model's way, on the checkpoint as released (soft-capping on); inside ``generate`` the first forward
gets ``mm_encoder_outputs`` instead of ``pixel_values``; PaliGemma 1 (a Gemma decoder) passes one mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import embedlens
from embedlens.errors import InputError
from embedlens.interventions import Prune, intervene, parse
from embedlens.models.paligemma import PaliGemmaAdapter
from helpers import assert_pixel_changes_its_cell, generate_forwards, random_image, recorded_inputs, weightless_geometry
from tiny_paligemma import TinyPaliGemmaSpec, build
from tiny_parts import session_fixtures

PROMPTS = ["what is this", "is there a red thing in the picture"]
#: Every intervention kind, as the conformance suite's KV-cache check runs them (3 decoder layers).
SETTINGS = {
    "prune-keep": ["prune:[0,5,8,15]"],
    "prune-reindex": ["prune:[0,5,8,15],positions=reindex"],
    "skip": ["skip:[0,5,8,15]@0-1.5"],
    "inject": ["inject@1"],
    "exit": ["exit@1"],
    "scale": ["scale:0.01"],
    "combined": ["prune:[0,5,8,15],positions=reindex", "inject@1", "skip:visual@1.5", "exit@2"],
}


session, adapter = session_fixtures("paligemma", build, PaliGemmaAdapter)


def _images(count: int) -> list[list]:
    return [[random_image(seed, 80, 60)] for seed in range(count)]


def test_layout_and_token_types(adapter: PaliGemmaAdapter):
    batch = adapter.prepare(_images(2), PROMPTS)
    assert "labels" not in batch.inputs and "token_type_ids" in batch.inputs
    tokenizer = adapter.tokenizer
    for row, (ids, spans, real) in enumerate(
        zip(batch.inputs["input_ids"], batch.spans, batch.inputs["attention_mask"], strict=True)
    ):
        (span,) = spans
        first = int(torch.nonzero(real).flatten()[0])
        assert span.grid == (4, 4) and span.positions.tolist() == list(range(first, first + 16))
        assert span.markers.numel() == 0 and span.extra_positions.numel() == 0
        text = tokenizer.convert_ids_to_tokens(ids[first + 16 :].tolist())
        assert text == ["<bos>", *PROMPTS[row].split()]
        assert batch.inputs["token_type_ids"][row].tolist() == [0] * ids.numel()  # all prefix
    assert batch.views[0].size == (56, 56)


def test_prompt_attends_both_ways_with_each_layers_mask(adapter: PaliGemmaAdapter):
    """Decoder layer ``i`` gets the mask dict's ``mask_key(i)`` entry, in which the first image token
    sees the last prompt token (a causal mask would hide it) and padding stays hidden."""
    batch = adapter.prepare(_images(2), PROMPTS)
    stack, layers = recorded_inputs(adapter, batch.inputs)
    masks = stack["attention_mask"]
    assert isinstance(masks, dict) and set(masks) == {"full_attention", "sliding_attention"}
    for index, kwargs in enumerate(layers):
        assert kwargs["attention_mask"] is masks[adapter.mask_key(index)]
    assert [adapter.mask_key(i) for i in range(3)] == ["sliding_attention", "full_attention", "sliding_attention"]
    for row, spans in enumerate(batch.spans):
        first_image = int(spans[0].positions[0])
        for mask in masks.values():
            allowed = mask[row, 0] == 0 if mask.dtype != torch.bool else mask[row, 0]
            assert bool(allowed[first_image, -1]), "the image does not see the end of the prompt"
            assert not bool(allowed[-1, :first_image].any()), "padding is visible"


def _reference_prune(adapter: PaliGemmaAdapter, sample_images: list, prompt: str, cells: Sequence[int]) -> torch.Tensor:
    """Last-token logits of one unpadded sample with ``cells`` left out by hand (positions kept): each
    layer's own mask at the kept columns, rotary embeddings of the kept positions, then final norm, LM head
    and the model's soft-capping."""
    batch = adapter.prepare([sample_images], [prompt])
    stack, layers = recorded_inputs(adapter, batch.inputs)
    removed = {int(span.positions[cell]) for span in batch.spans[0] for cell in cells}
    kept = torch.tensor([p for p in range(batch.inputs["input_ids"].shape[1]) if p not in removed])
    hidden = layers[0]["hidden"][:, kept]
    positions = stack["position_ids"][:, kept]
    with torch.no_grad():
        for index, layer in enumerate(adapter.decoder_layers):
            mask = layers[index]["attention_mask"][:, :, kept][:, :, :, kept]
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=adapter.position_embeddings(hidden, positions, index),
            )
            hidden = out[0] if isinstance(out, tuple) else out
        logits = adapter.lm_head(adapter.final_norm(hidden))[0, -1]
    cap = adapter.model.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def test_prune_prefill_equals_the_capped_reference(session: embedlens.Session, adapter: PaliGemmaAdapter):
    assert adapter.model.config.text_config.final_logit_softcapping == 30.0
    cells = (0, 5, 8, 15)
    batch = adapter.prepare(_images(2), PROMPTS)
    with intervene(session, [Prune(indices=cells)]), torch.no_grad():
        hooked = adapter.model(**batch.inputs).logits[:, -1]
    for row, prompt in enumerate(PROMPTS):
        expected = _reference_prune(adapter, _images(2)[row], prompt, cells)
        torch.testing.assert_close(hooked[row], expected, rtol=0, atol=1e-5)
        with torch.no_grad():
            untouched = adapter.model(**batch.inputs).logits[row, -1]
        assert not torch.allclose(untouched, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["none", *SETTINGS])
def test_cached_decoding_equals_recomputing_with_generated_tokens_typed_1(
    session: embedlens.Session, adapter: PaliGemmaAdapter, name: str
):
    """The conformance KV-cache check, with the recomputed sequence's ``token_type_ids`` grown as
    PaliGemma's ``generate`` grows them (1: a generated token is not part of the prefix)."""
    items = [parse(text) for text in SETTINGS.get(name, [])]
    batch = adapter.prepare(_images(2), PROMPTS)
    model = adapter.model
    with intervene(session, items), torch.no_grad():
        cached = model.generate(
            **batch.inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    inputs = dict(batch.inputs)
    recomputed = []
    for _ in range(4):
        with intervene(session, items), torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
        recomputed.append(logits)
        step = logits.argmax(dim=-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], step], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(step)], dim=1)
    length = batch.inputs["input_ids"].shape[1]
    assert torch.equal(cached.sequences[:, length:], inputs["input_ids"][:, length:])
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), torch.stack(recomputed, dim=1), rtol=0, atol=1e-5)


def test_spans_inside_generate_and_two_images(adapter: PaliGemmaAdapter):
    images = [[random_image(0, 80, 60), random_image(1, 60, 80)], [random_image(2, 80, 60)]]
    batch = adapter.prepare(images, PROMPTS)
    assert [[(s.image, s.global_image) for s in spans] for spans in batch.spans] == [[(0, 0), (1, 1)], [(0, 2)]]
    encoded = [kwargs for kwargs in generate_forwards(adapter.model, batch.inputs) if kwargs.get("mm_encoder_outputs")]
    assert len(encoded) == 1 and encoded[0].get("pixel_values") is None
    found = [adapter.find_spans(encoded[0])]
    assert [[s.positions.tolist() for s in spans] for spans in found[0]] == [
        [s.positions.tolist() for s in spans] for spans in batch.spans
    ]
    with pytest.raises(InputError, match="2 images given but only 1"):
        adapter.find_spans({**batch.inputs, "input_ids": batch.inputs["input_ids"][1:], "pixel_values": torch.zeros(2)})


def test_paligemma1_passes_one_mask(tmp_path):
    """A Gemma (PaliGemma 1) decoder: no sliding layers, one 4-D mask, ``mask_key`` None; a prune still
    runs under ``generate``."""
    path = build(tmp_path / "model", TinyPaliGemmaSpec(gemma1=True))
    session = embedlens.load(str(path), device="cpu")
    adapter = session.adapter
    assert isinstance(adapter, PaliGemmaAdapter) and adapter.mask_key(0) is None
    batch = adapter.prepare(_images(2), PROMPTS)
    stack, _ = recorded_inputs(adapter, batch.inputs)
    assert isinstance(stack["attention_mask"], torch.Tensor) and stack["attention_mask"].dim() == 4
    with intervene(session, [Prune(indices=(0, 5))]) as run, torch.no_grad():
        tokens = adapter.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    assert tokens.shape[1] == batch.inputs["input_ids"].shape[1] + 2
    assert run.last.samples[0].pruned == [0, 5]


def test_benchmark_geometry_and_cells(tmp_path):
    """``make-patchbench``'s view of the family (config and processor only): the 56 px picture of 14 px
    patches, and one changed pixel changes exactly its patch's cell."""
    weightless, geometry = weightless_geometry(build(tmp_path / "model"))
    assert (geometry.width, geometry.height, geometry.patch, geometry.rows, geometry.cols) == (56, 56, 14, 4, 4)
    assert_pixel_changes_its_cell(weightless, geometry)
