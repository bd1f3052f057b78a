"""Which dtype :mod:`embedlens.dtypes` calls fast, on every kind of machine (CPU flags faked)."""

from __future__ import annotations

import pytest
import torch

from embedlens.dtypes import fast_dtype, has_fast_bfloat16
from embedlens.errors import InputError
from embedlens.mini.config import TrainConfig, llm_compute_dtype


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, *, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
    ids=["avx2-only", "amx", "avx512-bf16"],
)
def test_cpu_picks_bfloat16_only_with_matrix_units(monkeypatch, amx, avx512_bf16, expected):
    _fake_cpu(monkeypatch, amx=amx, avx512_bf16=avx512_bf16)
    assert fast_dtype(CPU) is expected
    assert has_fast_bfloat16(CPU) == (expected is torch.bfloat16)


def test_cuda_is_fast_and_other_devices_are_not(monkeypatch):
    _fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert fast_dtype(torch.device("cuda")) is torch.bfloat16
    assert fast_dtype(torch.device("meta")) is torch.float32


def test_torch_without_the_probes_counts_as_slow(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert fast_dtype(CPU) is torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_train_mini_llm_dtype_follows_the_machine_unless_named(monkeypatch, fast):
    _fake_cpu(monkeypatch, amx=fast, avx512_bf16=False)
    assert llm_compute_dtype(TrainConfig(), CPU) is (torch.bfloat16 if fast else torch.float32)
    assert llm_compute_dtype(TrainConfig(llm_dtype="float32"), CPU) is torch.float32
    assert llm_compute_dtype(TrainConfig(llm_dtype="bfloat16"), CPU) is torch.bfloat16


def test_unknown_llm_dtype_is_refused():
    with pytest.raises(InputError, match="llm-dtype must be one of"):
        TrainConfig(llm_dtype="float16")
