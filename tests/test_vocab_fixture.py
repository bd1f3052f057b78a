"""The LLaMA-2 / LLaVA-1.5 SentencePiece vocabulary shipped as a test fixture (tokenizer-only GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "llama-spm"
GGUF_NAME = "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def llama_tokenizer():
    """Loaded once per session (about 3 s: the GGUF vocabulary is converted to a fast tokenizer)."""
    return AutoTokenizer.from_pretrained(str(FIXTURE_DIR), gguf_file=GGUF_NAME)


class TestLlamaVocabulary:
    """The paper reports visual tokens by LLaMA-2 vocabulary ids; the fixture must decode its anchor
    ids to the pieces the paper prints, or every id-level comparison with the paper is meaningless."""

    def test_files_present(self):
        assert (FIXTURE_DIR / GGUF_NAME).is_file()
        assert (FIXTURE_DIR / "LICENSE").is_file()
        assert "MIT" in (FIXTURE_DIR / "LICENSE").read_text(encoding="utf-8")

    def test_size(self, llama_tokenizer):
        assert len(llama_tokenizer) == 32000

    def test_paper_anchor_ids(self, llama_tokenizer):
        assert llama_tokenizer.convert_ids_to_tokens([1141, 26673, 30296]) == ["igh", "▁jav", "्"]

    def test_special_and_byte_pieces(self, llama_tokenizer):
        assert llama_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
        assert llama_tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]

    def test_exclusion_kinds_on_the_real_vocabulary(self, llama_tokenizer):
        """``exclude=("bytes",)`` must remove exactly the 256 byte-fallback pieces, ``"special"`` the
        three control tokens, on the vocabulary LLaVA-1.5 actually uses."""
        from embedlens.lens import excluded_ids

        assert excluded_ids(llama_tokenizer, ["bytes"], 32000) == set(range(3, 259))
        assert excluded_ids(llama_tokenizer, ["special"], 32000) == {0, 1, 2}
        assert excluded_ids(llama_tokenizer, ["special", "bytes"], 32000) == set(range(259))
        # rows beyond the table (a padded LM head would be larger, a truncated one smaller) are clipped
        assert excluded_ids(llama_tokenizer, ["bytes"], 100) == set(range(3, 100))

    def test_vocabulary_hash_is_stable(self, llama_tokenizer):
        from embedlens.lens import vocabulary_hash

        first = vocabulary_hash(llama_tokenizer)
        assert first == vocabulary_hash(llama_tokenizer)
        assert len(first) == 64
