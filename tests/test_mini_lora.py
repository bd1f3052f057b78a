"""LoRA adapters for train-mini: wrapped while training, restored afterwards, merged exactly when built."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from embedlens.mini.lora import LoRALinear, load_lora_tensors, lora_attached, lora_tensors, merge_lora, save_lora


def tiny_llm() -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaModel(config).eval()


def hidden(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


IDS = torch.arange(10)[None] % 64


class TestAttach:
    def test_wraps_every_target_and_puts_the_originals_back(self) -> None:
        llm = tiny_llm()
        originals = {name: module for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)}
        with lora_attached(llm, 4, seed=0) as adapters:
            assert len(adapters) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
            assert all(isinstance(llm.get_submodule(name), LoRALinear) for name in adapters)
        after = {name: module for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)}
        assert after.keys() == originals.keys()
        assert all(after[name] is originals[name] for name in originals)

    def test_restored_after_an_error(self) -> None:
        llm = tiny_llm()
        with pytest.raises(RuntimeError), lora_attached(llm, 2, seed=0):
            raise RuntimeError("stop")
        assert not any(isinstance(module, LoRALinear) for module in llm.modules())

    def test_starts_as_the_unchanged_model(self) -> None:
        llm = tiny_llm()
        before = hidden(llm, IDS)
        with lora_attached(llm, 4, seed=0):
            assert torch.equal(hidden(llm, IDS), before)  # B starts at zero

    def test_bad_rank(self) -> None:
        with pytest.raises(ValueError, match="rank"), lora_attached(tiny_llm(), 0, seed=0):
            pass


class TestMerge:
    def test_merged_weights_compute_what_the_wrapped_model_computed(self, tmp_path: Path) -> None:
        llm, fresh = tiny_llm(), tiny_llm()
        with lora_attached(llm, 4, seed=1) as adapters:
            with torch.no_grad():
                for adapter in adapters.values():
                    adapter.lora_b.normal_(0.0, 0.05)
            wrapped = hidden(llm, IDS)
            save_lora(adapters, tmp_path / "lora.safetensors")
        assert not torch.allclose(wrapped, hidden(fresh, IDS), atol=1e-3)  # the update does something
        assert merge_lora(fresh, tmp_path / "lora.safetensors") == 14
        torch.testing.assert_close(hidden(fresh, IDS), wrapped, atol=1e-5, rtol=1e-5)

    def test_resume_tensors_round_trip(self) -> None:
        llm = tiny_llm()
        with lora_attached(llm, 3, seed=2) as first:
            with torch.no_grad():
                for adapter in first.values():
                    adapter.lora_b.normal_()
            saved = copy.deepcopy(lora_tensors(first))
        with lora_attached(llm, 3, seed=9) as second:
            load_lora_tensors(second, saved)
            assert all(torch.equal(saved[k], v) for k, v in lora_tensors(second).items())

    def test_adapters_for_another_model_are_refused(self, tmp_path: Path) -> None:
        llm = tiny_llm()
        with lora_attached(llm, 2, seed=0) as adapters:
            save_lora(adapters, tmp_path / "lora.safetensors")
        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
        with pytest.raises(ValueError, match="is \\("):
            merge_lora(LlamaModel(config), tmp_path / "lora.safetensors")
        single = LlamaModel(LlamaConfig(**{**llm.config.to_dict(), "num_hidden_layers": 1}))
        with pytest.raises(ValueError, match="names no LoRA target"):
            merge_lora(single, tmp_path / "lora.safetensors")
