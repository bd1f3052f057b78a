"""Embedding and logit lens on a tiny LLaVA, against an independent float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedlens
from embedlens import EmbeddingLens, InputError, LogitLens
from embedlens.capture import run_captured
from embedlens.lens import vocabulary_hash
from embedlens.models.tiny import TinySpec, build_tiny_tokenizer
from taxonomy_planting import PlantedProjector

PROMPT = "What is in this picture ?"
LAYERS = [0, 1, 2, 4, -1]  # 0, 1, middle, last (= num_layers), and -1
NUM_LAYERS = TinySpec().text_layers
SPECIAL_IDS = [0, 1, 2, 3, 999]  # <unk> <s> </s> <pad> <image>
BYTE_IDS = list(range(4, 4 + 256))  # <0x00> .. <0xFF>


def ranked(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of float64 ``[n, V]`` scores by (score desc, id asc)."""
    scores = scores.double().numpy()
    ids = np.arange(scores.shape[1])
    order = np.array([np.lexsort((ids, -row))[:k] for row in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def cosine_brute_force(vectors: torch.Tensor, table: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine in float64; zero rows (LLaMA's <pad> row is all zeros) score 0."""
    q = vectors.double()
    t = table.detach().double()
    q = q / q.norm(dim=1, keepdim=True)
    norms = t.norm(dim=1, keepdim=True)
    t = torch.where(norms > 0, t / norms, torch.zeros_like(t))
    return ranked(q @ t.T, k)


def reference_hidden(session: embedlens.Session, inputs: dict) -> dict[int, torch.Tensor]:
    """Every layer's residual stream from a plain transformers forward (no EmbedLens hooks).

    ``hidden_states[l]`` for ``l < L``; layer ``L`` is the input of the final norm, read with a hook of
    our own, because transformers' last hidden state is already normed.
    """
    seen: list[torch.Tensor] = []
    handle = session.adapter.final_norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.inference_mode():
            out = session.model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    assert len(out.hidden_states) == NUM_LAYERS + 1
    assert len(seen) == 1
    hidden = {layer: out.hidden_states[layer] for layer in range(NUM_LAYERS)}
    hidden[NUM_LAYERS] = seen[0]
    hidden["transformers_last"] = out.hidden_states[NUM_LAYERS]
    return hidden


@pytest.fixture(scope="module")
def probe_inputs(tiny, make_image):
    """One image, its prepared batch, span positions and reference hidden states (computed once)."""
    image = make_image(1)
    batch = tiny.prepare([image], [PROMPT])
    positions = batch.spans[0][0].positions
    return image, batch, positions, reference_hidden(tiny, batch.inputs)


class TestLayerConvention:
    """Layer numbers must mean the same thing as in transformers' ``hidden_states``, except that the
    last layer is read *before* the final norm, so that every layer is the same kind of vector."""

    def test_inner_layers_equal_transformers_hidden_states(self, tiny, probe_inputs):
        _, batch, _, _ = probe_inputs
        with torch.inference_mode():
            out = tiny.model(**batch.inputs, output_hidden_states=True)
        captured = run_captured(tiny.adapter, batch.inputs, list(range(NUM_LAYERS + 1)))
        for layer in range(NUM_LAYERS):
            torch.testing.assert_close(captured.hidden[layer], out.hidden_states[layer], rtol=0, atol=0)

    def test_last_layer_is_before_the_final_norm(self, tiny, probe_inputs):
        _, batch, _, reference = probe_inputs
        captured = run_captured(tiny.adapter, batch.inputs, [NUM_LAYERS])
        last = captured.hidden[NUM_LAYERS]
        with torch.inference_mode():
            normed = tiny.adapter.final_norm(last)
        # transformers hidden_states[L] == final_norm(EmbedLens layer L)
        torch.testing.assert_close(normed, reference["transformers_last"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(last, reference[NUM_LAYERS], rtol=0, atol=0)
        assert not torch.allclose(last, reference["transformers_last"], atol=1e-3)

    def test_negative_layers_count_from_the_end(self, tiny, image_path):
        assert tiny.adapter.check_layer(-1) == NUM_LAYERS
        assert tiny.adapter.check_layer(-(NUM_LAYERS + 1)) == 0
        last = tiny.probe(image_path, layer=-1, top_k=3)
        assert last.layer == NUM_LAYERS
        np.testing.assert_array_equal(last.top_ids, tiny.probe(image_path, layer=NUM_LAYERS, top_k=3).top_ids)
        first = tiny.probe(image_path, layer=-(NUM_LAYERS + 1), top_k=3)
        assert first.layer == 0
        np.testing.assert_array_equal(first.top_ids, tiny.probe(image_path, layer=0, top_k=3).top_ids)

    @pytest.mark.parametrize("layer", [NUM_LAYERS + 1, -(NUM_LAYERS + 2), 100])
    def test_out_of_range(self, tiny, image_path, layer):
        with pytest.raises(InputError, match="out of range"):
            tiny.probe(image_path, layer=layer)


class TestEmbeddingLens:
    """The paper's probe: cosine to the input embedding table. It must be exactly the brute force."""

    @pytest.mark.parametrize("k", [1, 5, 40])
    @pytest.mark.parametrize("layer", LAYERS)
    def test_equals_brute_force(self, tiny, probe_inputs, layer, k):
        image, _, positions, reference = probe_inputs
        result = tiny.probe(image, PROMPT, layer=layer, top_k=k, lens="embedding")
        vectors = reference[tiny.adapter.check_layer(layer)][0, positions]
        ids, sims = cosine_brute_force(vectors, tiny.adapter.input_embeddings.weight, k)
        np.testing.assert_array_equal(result.top_ids, ids)
        np.testing.assert_allclose(result.top_sims, sims, rtol=1e-12, atol=1e-12)
        assert result.top_tokens == [tiny.adapter.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
        assert result.lens == "embedding"
        assert result.top_ids.shape == (16, k)

    def test_lens_object_on_given_vectors(self, tiny):
        g = torch.Generator().manual_seed(3)
        vectors = torch.randn(7, TinySpec().text_hidden, generator=g)
        found = EmbeddingLens(tiny.adapter).top_k(vectors, 12)
        ids, sims = cosine_brute_force(vectors, tiny.adapter.input_embeddings.weight, 12)
        np.testing.assert_array_equal(found.ids.numpy(), ids)
        np.testing.assert_allclose(found.scores.numpy(), sims, rtol=1e-12, atol=1e-12)

    def test_whole_vocabulary(self, tiny, probe_inputs):
        image, _, positions, reference = probe_inputs
        vocab = TinySpec().vocab_size
        result = tiny.probe(image, PROMPT, layer=2, top_k=vocab)
        ids, _ = cosine_brute_force(reference[2][0, positions], tiny.adapter.input_embeddings.weight, vocab)
        np.testing.assert_array_equal(result.top_ids, ids)


class TestLogitLens:
    """Final norm + LM head: the logits the model would emit if it stopped at that layer."""

    @pytest.mark.parametrize("k", [1, 5, 40])
    @pytest.mark.parametrize("layer", LAYERS)
    def test_equals_brute_force(self, tiny, probe_inputs, layer, k):
        image, _, positions, reference = probe_inputs
        result = tiny.probe(image, PROMPT, layer=layer, top_k=k, lens="logit")
        with torch.inference_mode():
            normed = tiny.adapter.final_norm(reference[tiny.adapter.check_layer(layer)][0, positions])
        ids, logits = ranked(normed.double() @ tiny.adapter.lm_head.weight.double().T, k)
        np.testing.assert_array_equal(result.top_ids, ids)
        np.testing.assert_allclose(result.top_sims, logits, rtol=1e-12, atol=1e-12)
        assert result.lens == "logit"

    def test_last_layer_equals_model_logits(self, tiny, probe_inputs):
        """At layer L the logit lens is literally the model's own prediction."""
        image, batch, positions, _ = probe_inputs
        with torch.inference_mode():
            logits = tiny.model(**batch.inputs).logits[0, positions]
        result = tiny.probe(image, PROMPT, layer=-1, top_k=3, lens="logit")
        np.testing.assert_array_equal(result.top_ids[:, 0], logits.argmax(dim=-1).numpy())
        np.testing.assert_allclose(result.top_sims, torch.topk(logits, 3).values.numpy(), rtol=1e-4, atol=1e-4)


class TestPlanted:
    """When we *know* what a visual token encodes, the lens must say so: this catches wrong positions,
    wrong grid order, and wrong tables, which random weights alone would not reveal."""

    def test_constant_projector_output_is_found(self, fresh_tiny, make_image):
        target = 517
        projector = fresh_tiny.adapter.projector
        with torch.no_grad():
            projector.linear_2.weight.zero_()
            projector.linear_2.bias.copy_(fresh_tiny.adapter.input_embeddings.weight[target])
        result = fresh_tiny.probe(make_image(2), layer=0, top_k=2)
        assert (result.top_ids[:, 0] == target).all()
        np.testing.assert_allclose(result.top_sims[:, 0], 1.0, atol=1e-12)
        assert (result.top_sims[:, 1] < 0.999).all()
        assert all(
            tokens[0] == fresh_tiny.adapter.tokenizer.convert_ids_to_tokens(target) for tokens in result.top_tokens
        )

    def test_each_patch_gets_its_own_row_in_grid_order(self, fresh_tiny, make_image):
        table = fresh_tiny.adapter.input_embeddings.weight
        fresh_tiny.model.model.multi_modal_projector = PlantedProjector(table[300:316])
        result = fresh_tiny.probe(make_image(3, 70, 40), "Describe", layer=0, top_k=1)
        np.testing.assert_array_equal(result.top_ids[:, 0], 300 + np.arange(16))
        np.testing.assert_allclose(result.top_sims[:, 0], 1.0, atol=1e-12)
        np.testing.assert_array_equal(result.row, np.arange(16) // 4)
        np.testing.assert_array_equal(result.col, np.arange(16) % 4)


@pytest.fixture
def planted_specials(fresh_tiny):
    """A tiny model where every special and byte row is the visual tokens' exact direction.

    Every visual token then ties (exactly) with all 261 special + byte rows in both tables, so they
    fill the top places unless excluded.
    """
    adapter = fresh_tiny.adapter
    g = torch.Generator().manual_seed(9)
    v = torch.randn(adapter.input_embeddings.weight.shape[1], generator=g)
    planted = SPECIAL_IDS + BYTE_IDS
    with torch.no_grad():
        adapter.projector.linear_2.weight.zero_()
        adapter.projector.linear_2.bias.copy_(v)
        adapter.input_embeddings.weight[planted] = v
        adapter.lm_head.weight[planted] = 100 * v
    return fresh_tiny


class TestExclusion:
    """Special and byte pieces carry no meaning; users exclude them, and they must never come back."""

    @pytest.mark.parametrize("lens", ["embedding", "logit"])
    def test_planted_rows_win_without_exclusion(self, planted_specials, make_image, lens):
        result = planted_specials.probe(make_image(4), layer=0, top_k=261, lens=lens)
        expected = sorted(SPECIAL_IDS + BYTE_IDS)  # all tied: lower id first
        assert all(row.tolist() == expected for row in result.top_ids)

    @pytest.mark.parametrize("lens", ["embedding", "logit"])
    def test_special(self, planted_specials, make_image, lens):
        image = make_image(4)
        result = planted_specials.probe(image, layer=0, top_k=256, lens=lens, exclude=("special",))
        assert all(row.tolist() == BYTE_IDS for row in result.top_ids)
        size = TinySpec().vocab_size - len(SPECIAL_IDS)
        everything = planted_specials.probe(image, layer=0, top_k=size, lens=lens, exclude=("special",))
        expected = set(range(TinySpec().vocab_size)) - set(SPECIAL_IDS)
        assert all(set(row.tolist()) == expected for row in everything.top_ids)
        tokens = {t for row in everything.top_tokens for t in row}
        assert tokens.isdisjoint({"<unk>", "<s>", "</s>", "<pad>", "<image>"})
        assert everything.provenance.exclude == ("special",)

    @pytest.mark.parametrize("lens", ["embedding", "logit"])
    def test_bytes(self, planted_specials, make_image, lens):
        image = make_image(4)
        result = planted_specials.probe(image, layer=0, top_k=5, lens=lens, exclude=("bytes",))
        assert all(row.tolist() == SPECIAL_IDS for row in result.top_ids)
        size = TinySpec().vocab_size - 256
        everything = planted_specials.probe(image, layer=0, top_k=size, lens=lens, exclude=("bytes",))
        assert all(set(row.tolist()) == set(range(1000)) - set(BYTE_IDS) for row in everything.top_ids)
        assert not any(t.startswith("<0x") for row in everything.top_tokens for t in row)

    def test_both(self, planted_specials, make_image):
        size = TinySpec().vocab_size - 261
        result = planted_specials.probe(make_image(4), layer=0, top_k=size, exclude=("special", "bytes"))
        assert all(set(row.tolist()) == set(range(1000)) - set(SPECIAL_IDS + BYTE_IDS) for row in result.top_ids)
        assert result.provenance.exclude == ("bytes", "special")

    def test_lens_object_exclusion_on_random_vectors(self, tiny):
        lens = LogitLens(tiny.adapter, exclude=["special", "bytes"])
        found = lens.top_k(torch.randn(5, TinySpec().text_hidden), 739)
        assert set(found.ids.flatten().tolist()).isdisjoint(SPECIAL_IDS + BYTE_IDS)

    def test_unknown_kind(self, tiny, image_path):
        with pytest.raises(InputError, match="cannot exclude"):
            tiny.probe(image_path, exclude=("punctuation",))

    @pytest.mark.parametrize("k", [0, -3, 1001])
    def test_top_k_out_of_range(self, tiny, image_path, k):
        with pytest.raises(InputError, match="top-k"):
            tiny.probe(image_path, top_k=k)

    def test_top_k_larger_than_what_exclusion_leaves(self, tiny, image_path):
        tiny.probe(image_path, top_k=995, exclude=("special",))
        with pytest.raises(InputError, match="995 searchable"):
            tiny.probe(image_path, top_k=996, exclude=("special",))


class TestVocabularyHash:
    """The vocabulary hash tells whether two results' token ids are comparable: it must be stable for
    the same vocabulary and change whenever a (piece, id) pair changes."""

    def test_stable(self, tiny, tiny_dir, chatml):
        first = vocabulary_hash(tiny.adapter.tokenizer)
        assert first == vocabulary_hash(tiny.adapter.tokenizer)
        assert first == tiny.vocab_hash
        assert len(first) == 64 and int(first, 16) >= 0
        assert first == embedlens.load(str(tiny_dir), device="cpu").vocab_hash  # another load
        assert first == vocabulary_hash(build_tiny_tokenizer())  # rebuilt from scratch
        assert first == chatml.vocab_hash  # the chat template is not part of the vocabulary

    def test_changes_with_the_vocabulary(self, tiny):
        base = vocabulary_hash(tiny.adapter.tokenizer)
        assert vocabulary_hash(build_tiny_tokenizer(1001)) != base
        grown = build_tiny_tokenizer()
        grown.add_tokens(["brandnewpiece"])
        assert vocabulary_hash(grown) != base

    def test_changes_when_ids_are_swapped(self):
        class FakeTokenizer:
            def __init__(self, vocab):
                self.vocab = vocab

            def get_vocab(self):
                return dict(self.vocab)

        assert vocabulary_hash(FakeTokenizer({"a": 0, "b": 1})) != vocabulary_hash(FakeTokenizer({"a": 1, "b": 0}))
        assert vocabulary_hash(FakeTokenizer({"a": 0, "b": 1})) == vocabulary_hash(FakeTokenizer({"b": 1, "a": 0}))
