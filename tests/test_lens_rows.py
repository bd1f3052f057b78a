"""Which embedding-table rows a lens may return: never padding rows past the tokenizer, and, on request,
only a base vocabulary (the reference searches only LLaMA's 32000 rows of llava-hf's 32064)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import embedlens
from embedlens import InputError
from embedlens.lens import EmbeddingLens, LogitLens, searchable_rows
from embedlens.models.tiny import TinySpec, build_tiny_llava

LLAMA_DIR = Path(__file__).parent / "fixtures" / "llama-spm"
LLAVA_HF_ROWS = 32064
LLAMA_ROWS = 32000


class TestSearchableRows:
    """The count of rows a lens searches is the smallest of the table, the tokenizer and the limit."""

    @pytest.mark.parametrize(
        ("table", "tokenizer", "limit", "expected"),
        [(32064, 32002, None, 32002), (32064, 32002, 32000, 32000), (1000, 1200, None, 1000), (500, 500, 900, 500)],
    )
    def test_smallest_wins(self, table, tokenizer, limit, expected):
        assert searchable_rows(table, tokenizer, limit) == expected


@pytest.fixture(scope="module")
def padded_tiny(tmp_path_factory) -> embedlens.Session:
    """The tiny model with its tables padded from 1000 to 1064 rows, like llava-hf's, loaded by path."""
    model, processor = build_tiny_llava(TinySpec())
    model.resize_token_embeddings(1064)
    directory = tmp_path_factory.mktemp("padded-tiny")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return embedlens.load(str(directory), device="cpu")


class TestRowsPastTheTokenizer:
    """Padding rows hold no token: a lens must never return them, and says how many it left out."""

    @pytest.mark.parametrize("lens_type", [EmbeddingLens, LogitLens])
    def test_padding_rows_never_returned(self, padded_tiny, lens_type):
        lens = lens_type(padded_tiny.adapter)
        table = lens.table().detach().float()
        assert table.shape[0] == 1064 and len(padded_tiny.adapter.tokenizer) == 1000
        assert lens.rows_left_out == 64
        # Queries equal to padding rows: their own row would be the best match if it were searchable.
        queries = table[1000:1064].clone()
        found = lens.top_k(queries, 5)
        assert int(found.ids.max()) < 1000
        assert not any(token.startswith("<row ") for row in found.tokens for token in row)

    def test_probe_never_reports_padding_ids(self, padded_tiny, make_image):
        result = padded_tiny.probe(make_image(3), top_k=20)
        assert int(result.top_ids.max()) < 1000

    def test_bad_limit_refused(self, padded_tiny):
        with pytest.raises(InputError, match="vocab_limit must be a positive integer"):
            EmbeddingLens(padded_tiny.adapter, vocab_limit=0)


def save_llava_hf_shaped(directory: Path) -> Path:
    """Save a tiny llava-hf-shaped checkpoint: LLaMA's vocabulary plus ``<image>`` (32000) and ``<pad>`` (32001),
    a 32064-row table whose rows from 32000 on sit at the mean embedding (as llava-hf's conversion set them)."""
    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA_DIR), gguf_file="ggml-vocab-llama-spm.gguf")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    spec = TinySpec(vocab_size=LLAVA_HF_ROWS)
    model, processor = build_tiny_llava(spec)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    processor.tokenizer = tokenizer
    processor.image_token = "<image>"
    processor.image_token_id = model.config.image_token_id
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        mean = table[:LLAMA_ROWS].mean(dim=0)
        extra = LLAVA_HF_ROWS - LLAMA_ROWS
        table[LLAMA_ROWS:] = mean + 1e-3 * mean.norm() * torch.randn(extra, table.shape[1], generator=generator)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory) -> Path:
    """Saved under a LLaVA-1.5-7B name, so the built-in anchors (and their base vocabulary) apply."""
    return save_llava_hf_shaped(tmp_path_factory.mktemp("models") / "llava-1.5-7b-hf")


@pytest.fixture(scope="module")
def llava_hf_shaped(llava_hf_dir) -> embedlens.Session:
    return embedlens.load(str(llava_hf_dir), device="cpu")


class TestBaseVocabulary:
    """Rows set near the mean embedding crowd a mean-leaning token's top-3 unless the lens searches only the
    base vocabulary; the restriction is what keeps the reference's anchors reachable."""

    def _mean_leaning(self, session: embedlens.Session) -> torch.Tensor:
        table = session.adapter.input_embeddings.weight.detach().float()
        mean = table[:LLAMA_ROWS].mean(dim=0)
        noise = torch.randn(8, table.shape[1], generator=torch.Generator().manual_seed(1))
        return mean + 0.2 * mean.norm() * noise / noise.norm(dim=1, keepdim=True)

    def test_extra_rows_enter_top3_without_the_restriction(self, llava_hf_shaped):
        lens = EmbeddingLens(llava_hf_shaped.adapter)
        assert lens.rows_left_out == LLAVA_HF_ROWS - len(llava_hf_shaped.adapter.tokenizer) == 62
        found = lens.top_k(self._mean_leaning(llava_hf_shaped), 3)
        assert (found.ids >= LLAMA_ROWS).any(dim=1).all()  # <image> / <pad> in every top-3
        assert int(found.ids.max()) < len(llava_hf_shaped.adapter.tokenizer)

    def test_base_vocabulary_keeps_them_out(self, llava_hf_shaped):
        lens = EmbeddingLens(llava_hf_shaped.adapter, vocab_limit=LLAMA_ROWS)
        assert lens.rows_left_out == LLAVA_HF_ROWS - LLAMA_ROWS
        found = lens.top_k(self._mean_leaning(llava_hf_shaped), 3)
        assert int(found.ids.max()) < LLAMA_ROWS


class TestWhoUsesTheBaseVocabulary:
    """The rule always reads anchors within their base vocabulary; plain probes do so only under the paper
    profile; provenance says which rows were searched."""

    def test_default_probe_searches_every_token(self, llava_hf_shaped, make_image):
        result = llava_hf_shaped.probe(make_image(1), top_k=3)
        assert result.provenance.profile == "default"
        assert result.provenance.vocab_limit is None and result.provenance.rows_left_out == 62

    def test_paper_profile_probe_searches_the_base(self, llava_hf_dir, make_image):
        session = embedlens.load(str(llava_hf_dir), device="cpu", profile="paper")
        assert session.vocab_limit == LLAMA_ROWS
        result = session.probe(make_image(1), top_k=3)
        assert result.provenance.profile == "paper"
        assert result.provenance.vocab_limit == LLAMA_ROWS and result.provenance.rows_left_out == 64
        assert int(result.top_ids.max()) < LLAMA_ROWS
        assert result.text.startswith("A chat between a curious human")

    def test_rule_reads_the_anchors_base_under_any_profile(self, llava_hf_shaped, make_image):
        classified = llava_hf_shaped.classify(make_image(2))  # the built-in LLaVA-1.5-7B anchors
        assert classified.anchors.base_vocab_size == LLAMA_ROWS
        assert classified.probe.provenance.vocab_limit == LLAMA_ROWS
        assert int(classified.probe.top_ids.max()) < LLAMA_ROWS
