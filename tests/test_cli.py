"""The ``embedlens`` command line: its JSON contract, its files, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

from embedlens import ProbeResult
from helpers import assert_user_error, probe_args, run_cli

TOP_LEVEL_KEYS = {"model", "image", "layer", "lens", "grid", "tokens"}
TOKEN_KEYS = {"index", "row", "col", "position", "norm", "top_ids", "top_tokens", "top_sims"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_json_document(out: str, k: int) -> dict:
    """stdout holds exactly one JSON object (one line) following the documented schema."""
    assert out.endswith("\n") and out.count("\n") == 1, out[:200]
    data = json.loads(out)
    assert isinstance(data, dict)
    assert set(data) == TOP_LEVEL_KEYS
    rows, cols = data["grid"]
    assert isinstance(rows, int) and isinstance(cols, int)
    assert len(data["tokens"]) == rows * cols
    for i, token in enumerate(data["tokens"]):
        assert set(token) == TOKEN_KEYS
        assert (token["index"], token["row"], token["col"]) == (i, i // cols, i % cols)  # grid order
        assert isinstance(token["position"], int)
        assert isinstance(token["norm"], float)
        assert len(token["top_ids"]) == len(token["top_tokens"]) == len(token["top_sims"]) == k
        assert all(isinstance(x, int) for x in token["top_ids"])
        assert all(isinstance(x, str) for x in token["top_tokens"])
        assert all(isinstance(x, float) for x in token["top_sims"])
    return data


class TestJsonOutput:
    """Scripts consume ``--json``: one object, fixed keys, tokens in grid order, the same numbers as
    the Python API."""

    @pytest.mark.parametrize(("layer", "lens", "k"), [(0, "embedding", 3), (-1, "logit", 1), (2, "embedding", 7)])
    def test_schema_and_values(self, capsys, tiny, tiny_dir, image_path, layer, lens, k):
        code, out, err = run_cli(
            capsys, *probe_args(tiny_dir, image_path, "--json", "--layer", layer, "--lens", lens, "-k", k)
        )
        assert code == 0, err
        assert err == ""
        data = check_json_document(out, k)
        assert data["model"] == str(tiny_dir)
        assert data["image"] == str(image_path)
        assert data["layer"] == tiny.adapter.check_layer(layer)
        assert data["lens"] == lens
        assert data["grid"] == [4, 4]
        expected = tiny.probe(image_path, layer=layer, top_k=k, lens=lens)
        np.testing.assert_array_equal([t["top_ids"] for t in data["tokens"]], expected.top_ids)
        np.testing.assert_allclose([t["top_sims"] for t in data["tokens"]], expected.top_sims, rtol=1e-12)
        assert [t["position"] for t in data["tokens"]] == expected.position.tolist()

    def test_exclude_and_raw_prompt(self, capsys, tiny_dir, image_path):
        args = probe_args(tiny_dir, image_path, "--json", "-k", "300", "--exclude", "special,bytes")
        code, out, _ = run_cli(capsys, *args, "--raw-prompt", "Describe this <image> now")
        assert code == 0
        data = check_json_document(out, 300)
        ids = {i for t in data["tokens"] for i in t["top_ids"]}
        assert ids.isdisjoint({0, 1, 2, 3, 999} | set(range(4, 260)))
        assert data["tokens"][0]["position"] == 2

    def test_exclude_repeated_option(self, capsys, tiny_dir, image_path):
        args = probe_args(tiny_dir, image_path, "--json", "-k", "2", "--exclude", "special", "--exclude", "bytes")
        code, out, _ = run_cli(capsys, *args)
        assert code == 0
        check_json_document(out, 2)

    def test_builtin_tiny_llava_builds_into_the_cache(self, capsys, image_path, embedlens_cache):
        """A built-in model needs no download and is built where $EMBEDLENS_CACHE says."""
        assert os.environ["EMBEDLENS_CACHE"] == str(embedlens_cache)
        args = ("probe", image_path, "--model", "tiny-llava", "--device", "cpu", "--json", "-k", "1")
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        assert check_json_document(out, 1)["model"] == "tiny-llava"
        assert (embedlens_cache / "tiny-llava-v1" / "config.json").is_file()


class TestOutDirectory:
    """``--out`` is the archived record of a run: table, JSON with provenance, and a picture."""

    def test_files(self, capsys, tiny_dir, image_path, tmp_path):
        out_dir = tmp_path / "run"
        code, out, _ = run_cli(capsys, *probe_args(tiny_dir, image_path, "--json", "-k", "2", "--out", out_dir))
        assert code == 0
        data = check_json_document(out, 2)
        assert sorted(p.name for p in out_dir.iterdir()) == ["result.json", "tokens.parquet", "top1.png"]
        saved = ProbeResult.load(out_dir)
        np.testing.assert_array_equal(saved.top_ids, [t["top_ids"] for t in data["tokens"]])
        png = out_dir / "top1.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as picture:
            picture.verify()
        with Image.open(png) as picture:
            assert picture.format == "PNG"
            assert picture.size == (4 * 56, 4 * 56)  # 4 x 4 cells of at least MIN_CELL = 56 px

    def test_summary_lists_written_files(self, capsys, tiny_dir, image_path, tmp_path):
        code, out, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--out", tmp_path / "run"))
        assert code == 0
        assert err == ""
        assert "4 x 4 = 16 visual tokens" in out
        for name in ("tokens.parquet", "result.json", "top1.png"):
            assert f"wrote {tmp_path / 'run' / name}" in out

    def test_six_by_six_picture(self, capsys, grid6, tmp_path, make_image):
        image = tmp_path / "wide.png"
        make_image(3, 120, 84).save(image)
        model_dir = Path(grid6.adapter.source)
        code, _, _ = run_cli(capsys, *probe_args(model_dir, image, "-k", "1", "--out", tmp_path / "run"))
        assert code == 0
        with Image.open(tmp_path / "run" / "top1.png") as picture:
            assert picture.size == (6 * 56, 6 * 56)


class TestHelp:
    def test_no_arguments_prints_help(self, capsys):
        code, out, _ = run_cli(capsys)
        assert code == 0
        assert "probe" in out

    def test_probe_help(self, capsys):
        code, out, _ = run_cli(capsys, "probe", "--help")
        assert code == 0
        assert "--top-k" in out and "--json" in out


def _missing(tmp: Path, model: Path, image: Path) -> list:
    return probe_args(model, tmp / "nope.png")


def _garbage(tmp: Path, model: Path, image: Path) -> list:
    bad = tmp / "garbage.png"
    bad.write_bytes(b"this is not a png\x00\xff" * 20)
    return probe_args(model, bad)


def _truncated(tmp: Path, model: Path, image: Path) -> list:
    data = image.read_bytes()
    bad = tmp / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    return probe_args(model, bad)


def _directory_as_image(tmp: Path, model: Path, image: Path) -> list:
    return probe_args(model, tmp)


def _no_placeholder(tmp: Path, model: Path, image: Path) -> list:
    return probe_args(model, image, "--raw-prompt", "Describe this picture")


def _not_a_model(tmp: Path, model: Path, image: Path) -> list:
    empty = tmp / "empty-model"
    empty.mkdir()
    return probe_args(empty, image)


def _file_as_model(tmp: Path, model: Path, image: Path) -> list:
    return probe_args(image, image)


def _unsupported_type(tmp: Path, model: Path, image: Path) -> list:
    gpt2 = tmp / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    return probe_args(gpt2, image)


def _args(*extra: object) -> Callable[[Path, Path, Path], list]:
    return lambda tmp, model, image: probe_args(model, image, *extra)


BAD_INPUTS = {
    "missing-image": _missing,
    "garbage-image": _garbage,
    "truncated-png": _truncated,
    "directory-as-image": _directory_as_image,
    "raw-prompt-without-placeholder": _no_placeholder,
    "raw-prompt-with-two-placeholders": _args("--raw-prompt", "<image> <image>"),
    "prompt-and-raw-prompt": _args("--prompt", "a", "--raw-prompt", "<image>"),
    "not-a-model-directory": _not_a_model,
    "file-as-model": _file_as_model,
    "unsupported-model-type": _unsupported_type,
    "layer-too-big": _args("--layer", "5"),
    "layer-far-too-big": _args("--layer", "1000"),
    "layer-too-negative": _args("--layer", "-6"),
    "layer-too-negative-equals": _args("--layer=-6"),
    "layer-not-an-int": _args("--layer", "abc"),
    "top-k-zero": _args("--top-k", "0"),
    "top-k-negative": _args("--top-k", "-1"),
    "top-k-larger-than-vocabulary": _args("--top-k", "1001"),
    "top-k-larger-than-what-exclusion-leaves": _args("-k", "996", "--exclude", "special"),
    "unknown-lens": _args("--lens", "attention"),
    "unknown-exclude": _args("--exclude", "emoji"),
    "unknown-exclude-in-list": _args("--exclude", "special,emoji"),
    "unknown-dtype": _args("--dtype", "float64"),
    "unknown-option": _args("--frobnicate"),
}


class TestBadInput:
    """Every user mistake ends with one line the user can act on, exit code 2, and an empty stdout
    (so ``--json`` pipelines never parse an error as data), never a traceback."""

    @pytest.mark.parametrize("make_args", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
    def test_one_line_exit_2(self, capsys, tiny_dir, image_path, tmp_path, make_args):
        args = make_args(tmp_path, tiny_dir, image_path)
        assert_user_error(*run_cli(capsys, *args))
        assert_user_error(*run_cli(capsys, *args, "--json"))

    @pytest.mark.parametrize(
        ("option", "value"),
        [("--loss-per", "sentence"), ("--lora-rank", "-1"), ("--steps", "0"), ("--llm-dtype", "float16")],
    )
    def test_train_mini_options(self, capsys, tmp_path, option, value):
        """Checked before anything is built or trained."""
        code, out, err = run_cli(capsys, "train-mini", "--out", tmp_path / "run", option, value)
        assert_user_error(code, out, err)
        assert option in err
        assert not (tmp_path / "run").exists()

    def test_messages_name_the_problem(self, capsys, tiny_dir, image_path, tmp_path):
        _, _, err = run_cli(capsys, *_missing(tmp_path, tiny_dir, image_path))
        assert "image not found" in err and "nope.png" in err
        _, _, err = run_cli(capsys, *_args("--layer", "5")(tmp_path, tiny_dir, image_path))
        assert "layer 5" in err and "0..4" in err
        _, _, err = run_cli(capsys, *_unsupported_type(tmp_path, tiny_dir, image_path))
        assert "gpt2" in err and "llava" in err


class TestBadInputNotYetHandled:
    """More user mistakes that must also end in one line and exit code 2."""

    def test_prompt_containing_the_placeholder(self, capsys, tiny_dir, image_path):
        assert_user_error(*run_cli(capsys, *probe_args(tiny_dir, image_path, "--prompt", "What is <image> here ?")))

    def test_unknown_device(self, capsys, tiny_dir, image_path):
        assert_user_error(*run_cli(capsys, *probe_args(tiny_dir, image_path, "--device", "bogus")))

    def test_out_is_an_existing_file(self, capsys, tiny_dir, image_path, tmp_path):
        target = tmp_path / "taken"
        target.write_text("not a directory")
        assert_user_error(*run_cli(capsys, *probe_args(tiny_dir, image_path, "--out", target)))
        assert target.read_text() == "not a directory"

    def test_corrupt_weights(self, capsys, tiny_dir, image_path, tmp_path):
        broken = tmp_path / "broken-model"
        broken.mkdir()
        for path in tiny_dir.iterdir():
            (broken / path.name).write_bytes(path.read_bytes())
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
        assert_user_error(*run_cli(capsys, *probe_args(broken, image_path)))


def _console_script() -> Path:
    script = Path(sys.executable).parent / ("embedlens.exe" if os.name == "nt" else "embedlens")
    assert script.is_file(), f"the embedlens console script is not installed next to {sys.executable}"
    return script


def _subprocess_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"EMBEDLENS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


@pytest.fixture(scope="module")
def console_runs(tiny_dir, image_path, tmp_path_factory, embedlens_cache) -> dict[str, tuple]:
    """Both real-process runs, started together (each pays ~3 s of imports; in parallel they overlap).

    Returns name -> (CompletedProcess-like (returncode, stdout, stderr), out directory or None).
    """
    out_dir = tmp_path_factory.mktemp("console") / "run"
    commands = {
        "json": probe_args(tiny_dir, image_path, "--json", "-k", "3", "--out", out_dir),
        "error": probe_args(tiny_dir, image_path, "--raw-prompt", "no placeholder"),
    }
    script = _console_script()
    processes = {
        name: subprocess.Popen(
            [str(script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_subprocess_env(embedlens_cache),
        )
        for name, args in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = ((process.returncode, stdout, stderr), out_dir if name == "json" else None)
    return results


class TestConsoleScript:
    """The installed ``embedlens`` entry point, run as a real process (as users and CI run it)."""

    def test_json_and_out(self, console_runs):
        (code, stdout, stderr), out_dir = console_runs["json"]
        assert code == 0, stderr
        assert stderr == ""
        data = check_json_document(stdout, 3)
        assert data["grid"] == [4, 4]
        assert sorted(p.name for p in out_dir.iterdir()) == ["result.json", "tokens.parquet", "top1.png"]

    def test_user_error(self, console_runs):
        (code, stdout, stderr), _ = console_runs["error"]
        assert_user_error(code, stdout, stderr)
        assert "placeholder" in stderr


class TestSummaries:
    """The text the commands print comes from the result types, so notebooks get the same view."""

    def test_probe_prints_the_result_summary(self, capsys, tiny, tiny_dir, image_path):
        code, out, err = run_cli(capsys, *probe_args(tiny_dir, image_path, "-k", "2", "--layer", "1"))
        assert code == 0, err
        expected = tiny.probe(image_path, top_k=2, layer=1)
        assert out == expected.summary() + "\n"
        assert str(expected) == expected.summary()
        lines = expected.summary().splitlines()
        assert lines[0] == f"model   {tiny_dir}" and lines[3] == "lens    embedding lens at layer 1, top-2"
        assert len([line for line in lines if line.startswith("  (")]) == 8  # the first eight tokens

    def test_classification_summary_without_a_tokenizer(self, tiny, image_path, tiny_anchor_file):
        from embedlens.taxonomy import Anchors

        anchors = Anchors.load(tiny_anchor_file)
        result = tiny.classify(image_path, anchors=anchors)
        plain, named = result.summary(), result.summary(tiny.adapter.tokenizer)
        vit = anchors.groups["vit_sink"][0]
        piece = tiny.adapter.tokenizer.convert_ids_to_tokens(vit)
        assert f"vit_sink {vit} |" in plain and f"vit_sink {vit} {piece!r}" in named
        assert plain.splitlines()[-4:] == named.splitlines()[-4:]  # the same 4 x 4 map
