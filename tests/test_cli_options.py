"""The command line's shared options and its remaining user errors: the default model, bad option values
(one line naming the option, exit 2, before anything loads), --revision outside the hub, prompts longer
than the context, an existing benchmark, a sweep whose scaling stage cannot run, and train-mini over a run
made with other settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from embedlens.bench.patchbench import generate_benchmark
from embedlens.errors import InputError
from embedlens.mini.config import TrainConfig
from embedlens.mini.train import CHECKPOINT
from embedlens.models import loading, registry
from helpers import assert_user_error, run_cli


class LoaderStopped(InputError):
    """Raised by the recording loader so that nothing is loaded."""


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Replace the model loader with one that records (name, keyword arguments) and stops the command."""
    calls: list[tuple[str, dict]] = []

    def record(name: str, **kwargs: object) -> None:
        calls.append((name, kwargs))
        raise LoaderStopped("loader reached")

    monkeypatch.setattr(loading, "load_adapter", record)
    return calls


class TestModelOptions:
    """--model, --device, --dtype and --revision reach the loader the same way from every command."""

    @pytest.mark.parametrize(
        "command",
        [["probe"], ["generate", "--prompt", "What is it?"], ["classify", "--anchors", "{anchors}"]],
        ids=["probe", "generate", "classify"],
    )
    def test_default_model_is_the_mini(self, capsys, loads, image_path, tiny_anchor_file, command):
        args = [part.replace("{anchors}", str(tiny_anchor_file)) for part in command]
        code, out, err = run_cli(capsys, *args, image_path)
        assert_user_error(code, out, err)
        assert "loader reached" in err
        assert [name for name, _ in loads] == ["embedlens-mini"]

    def test_values_are_passed(self, capsys, loads, image_path, tiny_dir):
        args = ["probe", image_path, "-m", tiny_dir, "--device", "cpu", "--dtype", "float32", "--layer", "-1"]
        code, _, err = run_cli(capsys, *args, "--raw-prompt", "<image> hi")
        assert code == 2 and "loader reached" in err
        [(name, kwargs)] = loads
        assert name == str(tiny_dir)
        assert (kwargs["device"], kwargs["dtype"], kwargs["revision"]) == ("cpu", "float32", None)
        assert (kwargs["layer"], kwargs["raw_prompt"]) == (-1, "<image> hi")

    def test_interventions_checked_against_the_config_before_weights(self, capsys, image_path, tiny_dir):
        args = ["generate", image_path, "-m", tiny_dir, "--device", "cpu", "--prompt", "a", "--intervene", "inject@4"]
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err)
        assert "inject layer 4 is out of range" in err

    def test_revision_of_a_local_model_is_refused(self, capsys, image_path, tiny_dir):
        code, out, err = run_cli(capsys, "probe", image_path, "-m", tiny_dir, "--device", "cpu", "--revision", "v1")
        assert_user_error(code, out, err)
        assert "revision only applies to hub models" in err and "local directory" in err

    def test_revision_of_a_builtin_is_refused_by_the_library(self):
        with pytest.raises(InputError, match="is a built-in model"):
            registry.resolve("tiny-llava", "main")
        assert registry.resolve("someone/model", "main").revision == "main"


BAD_VALUES = {
    "lr-nan": ["train-mini", "--out", "{tmp}/t", "--lr", "nan"],
    "lr-inf": ["train-mini", "--out", "{tmp}/t", "--lr", "inf"],
    "minutes-zero": ["train-mini", "--out", "{tmp}/t", "--minutes", "0"],
    "lora-lr-word": ["train-mini", "--out", "{tmp}/t", "--lora-lr", "fast"],
    "images-negative": ["train-mini", "--out", "{tmp}/t", "--images", "-3"],
    "seed-negative": ["train-mini", "--out", "{tmp}/t", "--seed", "-1"],
    "reproduce-processes": ["reproduce", "--out", "{tmp}/r", "--num-processes", "0"],
    "reproduce-limit": ["reproduce", "--out", "{tmp}/r", "--limit", "0"],
    "reproduce-throughput": ["reproduce", "--out", "{tmp}/r", "--throughput", "-5"],
    "stats-batch": ["stats", "{tmp}/d", "--out", "{tmp}/o", "--batch-size", "0"],
    "discover-fraction": ["discover-anchors", "{tmp}/d", "--out", "{tmp}/a.json", "--min-fraction", "1.5"],
    "discover-top-k": ["discover-anchors", "{tmp}/d", "--out", "{tmp}/a.json", "--top-k", "0"],
    "sweep-timing": ["inject-sweep", "{tmp}/q.jsonl", "--out", "{tmp}/o", "--timing-items", "-1"],
    "eval-tokens": ["eval", "{tmp}/q.jsonl", "--out", "{tmp}/o", "--max-new-tokens", "0"],
    "align-lens-top-k": ["align", "{tmp}/d", "--out", "{tmp}/o", "--lens-top-k", "x"],
    "make-patchbench-count": ["make-patchbench", "--out", "{tmp}/b", "--per-category", "0"],
}


class TestOptionValues:
    """Bad numbers are refused while the command line is parsed: one line naming the option, exit 2,
    nothing created."""

    @pytest.mark.parametrize("args", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
    def test_one_line(self, capsys, tmp_path, args):
        filled = [part.replace("{tmp}", str(tmp_path)) for part in args]
        code, out, err = run_cli(capsys, *filled)
        assert_user_error(code, out, err)
        option = filled[-2]
        assert f"{option} must be" in err and f"got {filled[-1]}" in err.replace("'", ""), err
        assert f"see 'embedlens {filled[0]} --help'" in err
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        ("args", "fragment"),
        [
            (["probe", "--lens", "attention"], "'attention' is not one of 'embedding', 'logit'"),
            (["train-mini", "--out", "x", "--llm-dtype", "float16"], "'float16' is not one of"),
            (["probe", "--layer", "abc"], "Invalid value for '--layer'"),
            (["stats"], "Missing argument"),
            (["frobnicate"], "No such command 'frobnicate'"),
        ],
    )
    def test_typer_messages_on_one_line(self, capsys, args, fragment):
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err)
        assert fragment in err and "Value error" not in err

    def test_out_file_refused_by_the_path_check(self, capsys, tmp_path):
        taken = tmp_path / "taken"
        taken.write_text("x")
        code, out, err = run_cli(capsys, "eval", tmp_path / "q.jsonl", "--out", taken)
        assert_user_error(code, out, err)
        assert str(taken) in err and "is a file" in err


class TestGenerateContext:
    """The tiny model's context holds 1024 positions; a longer prompt and answer is refused up front."""

    def test_long_prompt(self, capsys, tiny_dir, image_path):
        prompt = " ".join(["word"] * 1100)
        code, out, err = run_cli(capsys, "generate", image_path, "-m", tiny_dir, "--device", "cpu", "--prompt", prompt)
        assert_user_error(code, out, err)
        assert "the model's context holds 1024" in err

    def test_long_answer(self, capsys, tiny_dir, image_path):
        args = ["generate", image_path, "-m", tiny_dir, "--device", "cpu", "--prompt", "hi", "--max-new-tokens", 1020]
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err)
        assert "--max-new-tokens 1020" in err

    def test_context_length_from_the_text_config(self, tiny):
        assert registry.context_length(tiny.model.config) == 1024


class TestMakePatchbench:
    """An existing benchmark is never silently mixed with a new one."""

    def args(self, tiny_dir: Path, out: Path, *extra: object) -> list[object]:
        return ["make-patchbench", "-m", tiny_dir, "--out", out, "--no-progress", "--per-category", 1, *extra]

    def test_refused_then_replaced_cleanly(self, capsys, tiny_dir, tmp_path):
        out = tmp_path / "bench"
        assert run_cli(capsys, *self.args(tiny_dir, out, "--categories", "object,colour"))[0] == 0
        (out / "notes.txt").write_text("mine")
        before = sorted(p.name for p in (out / "images").iterdir())
        assert len(before) == 2

        code, text, err = run_cli(capsys, *self.args(tiny_dir, out, "--categories", "ocr"))
        assert_user_error(code, text, err)
        assert "already holds a benchmark; pass --overwrite" in err
        assert sorted(p.name for p in (out / "images").iterdir()) == before

        code, text, err = run_cli(capsys, *self.args(tiny_dir, out, "--categories", "ocr", "--overwrite"))
        assert code == 0, err
        images = sorted(p.name for p in (out / "images").iterdir())
        rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
        assert [Path(row["image"]).name for row in rows] == images  # no stale pictures
        assert [row["category"] for row in rows] == ["ocr"]
        assert json.loads((out / "meta.json").read_text())["categories"] == ["ocr"]
        assert (out / "notes.txt").read_text() == "mine"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def test_empty_directory_is_fine(self, capsys, tiny_dir, tmp_path):
        assert run_cli(capsys, *self.args(tiny_dir, tmp_path, "--categories", "count"))[0] == 0
        assert (tmp_path / "meta.json").is_file()


def test_sweep_without_a_scaling_layer_says_so(capsys, tiny, tiny_dir, tmp_path):
    bench = tmp_path / "bench"
    generate_benchmark(bench, tiny.adapter, per_category=1, progress=False)
    args = ["inject-sweep", bench, "-m", tiny_dir, "--device", "cpu", "--out", tmp_path / "o", "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--layers", "0", "--timing-items", "0", "--bootstrap", "10")
    assert code == 0, err
    [line] = err.splitlines()
    assert line.startswith("embedlens: warning: --layers 0 has no injection layer above 0")
    assert "norm-scaling experiment is skipped" in line
    assert not (tmp_path / "o" / "scaling.md").exists()


class TestTrainMiniResume:
    """A run directory made with other settings is refused in one line before anything is built."""

    def checkpoint(self, out: Path, config: TrainConfig) -> None:
        out.mkdir()
        torch.save({"config": dataclasses.asdict(config), "step": 1}, out / CHECKPOINT)

    def test_other_settings(self, capsys, tmp_path):
        self.checkpoint(tmp_path / "run", TrainConfig(seed=3))
        code, out, err = run_cli(capsys, "train-mini", "--out", tmp_path / "run", "--seed", 4)
        assert_user_error(code, out, err)
        assert "another configuration (seed 3 -> 4)" in err

    def test_damaged_checkpoint(self, capsys, tmp_path):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
        code, out, err = run_cli(capsys, "train-mini", "--out", tmp_path / "run")
        assert_user_error(code, out, err)
        assert "cannot read the checkpoint" in err


def test_python_generate_refuses_a_prompt_longer_than_the_context(tiny, make_image):
    """The library refuses what the command line refuses: a prompt plus answer past the model's context."""
    from embedlens.models.registry import context_length

    limit = context_length(tiny.model.config)
    with pytest.raises(InputError, match=f"but the model's context holds {limit}"):
        tiny.generate(make_image(0), "Describe", max_new_tokens=limit)
