"""The LLaMA-2 / LLaVA-1.5 SentencePiece vocabulary shipped as a test fixture (tokenizer-only GGUF)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from transformers import AutoTokenizer

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "llama-spm"
GGUF_NAME = "ggml-vocab-llama-spm.gguf"
#: sha256 of LLaMA-2's 32000 (id, piece) pairs, recorded from the GGUF file (see the last test).
RECORDED_VOCAB_HASH = "fe56f82cb0368a695de548846e10be3ba13a71bebd2f1a5f65a3dcbc51f73eab"


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

    def test_vocabulary_hash_matches_the_recorded_value(self, llama_tokenizer):
        """The hash that ties anchors to a vocabulary must not drift: the tokenizer transformers builds
        from the GGUF hashes to the recorded value, and so do the pieces read straight from the file
        (``"<id>\\t<piece>\\n"`` per id, in id order), without transformers or EmbedLens in between."""
        import gguf

        from embedlens.lens import vocabulary_hash
        from embedlens.taxonomy.anchors import LLAMA2_VOCAB_HASH

        assert vocabulary_hash(llama_tokenizer) == RECORDED_VOCAB_HASH
        field = gguf.GGUFReader(FIXTURE_DIR / GGUF_NAME).fields["tokenizer.ggml.tokens"]
        pieces = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        digest = hashlib.sha256("".join(f"{i}\t{piece}\n" for i, piece in enumerate(pieces)).encode())
        assert len(pieces) == 32000 and digest.hexdigest() == RECORDED_VOCAB_HASH
        assert LLAMA2_VOCAB_HASH == RECORDED_VOCAB_HASH  # what the built-in LLaVA-1.5 anchors check against
        assert vocabulary_hash(llama_tokenizer, limit=31999) != RECORDED_VOCAB_HASH  # every piece counts
