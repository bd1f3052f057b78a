"""The paper profile feeds LLaVA the way the reference does: images padded to a square in the mean colour,
the vicuna_v1 conversation; the default profile keeps the checkpoint's processor and chat template."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import embedlens
from embedlens import InputError
from embedlens.profiles import PROFILES, VICUNA_V1_SYSTEM, Profile, get_profile, pad_to_square, vicuna_v1
from helpers import assert_user_error, run_cli


class TestProfileLookup:
    def test_names(self):
        assert get_profile(None) is PROFILES["default"]
        assert get_profile("paper").pad_to_square and get_profile("paper").target_match == "member"
        custom = Profile("mine", pad_to_square=True)
        assert get_profile(custom) is custom

    def test_unknown_refused_in_one_line(self):
        with pytest.raises(InputError, match="unknown profile 'papr'; choose from default, paper"):
            get_profile("papr")

    def test_round_trips_to_json_ready_dict(self):
        settings = PROFILES["paper"].to_dict()
        assert settings["name"] == "paper" and settings["task_settings"]["mme"] == {"max_new_tokens": 1}


class TestPadToSquare:
    def test_wide_image_centred_on_fill(self):
        image = Image.new("RGB", (40, 20), (255, 0, 0))
        square = pad_to_square(image, (1, 2, 3))
        pixels = np.asarray(square)
        assert square.size == (40, 40)
        assert (pixels[:10] == (1, 2, 3)).all() and (pixels[30:] == (1, 2, 3)).all()
        assert (pixels[10:30] == (255, 0, 0)).all()

    def test_square_unchanged(self):
        image = Image.new("RGB", (16, 16), (9, 9, 9))
        assert pad_to_square(image, (0, 0, 0)) is image


@pytest.fixture
def paper_tiny(tiny_dir):
    return embedlens.load(str(tiny_dir), device="cpu", profile="paper")


class TestPaperProfileOnLlava:
    def test_prompt_is_vicuna_v1(self, paper_tiny):
        text = paper_tiny.adapter.format_prompt("What is it?")
        assert text == vicuna_v1("What is it?", "<image>")
        assert text.startswith(VICUNA_V1_SYSTEM + " USER: <image>\nWhat is it?") and text.endswith("ASSISTANT:")

    def test_tall_image_padded_in_mean_colour(self, paper_tiny, tiny):
        tall = Image.new("RGB", (28, 56), (255, 255, 255))
        view = np.asarray(paper_tiny.prepare([tall]).views[0]).astype(int)
        mean = paper_tiny.adapter.processor.image_processor.image_mean
        fill = np.array([int(255 * m) for m in mean])
        side = view.shape[1]
        assert np.abs(view[:, : side // 8] - fill).max() <= 1  # left border: padding, not the white image
        assert np.abs(view[:, side // 2] - 255).max() <= 1  # centre column: the image
        # The default profile centre-crops: no mean-colour border at all.
        default_view = np.asarray(tiny.prepare([tall]).views[0]).astype(int)
        assert np.abs(default_view - 255).max() <= 1

    def test_spans_follow_the_token_ids(self, paper_tiny, make_image):
        batch = paper_tiny.prepare([make_image(0)], ["Describe"])
        span = batch.spans[0][0]
        ids = batch.inputs["input_ids"][0]
        assert bool((ids[span.positions] == paper_tiny.adapter.image_token_id).all())
        assert batch.texts[0].startswith(VICUNA_V1_SYSTEM)


def test_cli_profile_option(capsys):
    """``--profile`` reaches the loader: an unknown name is one line and exit 2, ``paper`` changes the text."""
    import json

    run = ["probe", "--model", "tiny-llava", "--json", "-k", "1"]
    assert_user_error(*run_cli(capsys, *run, "--profile", "papr"), "unknown profile 'papr'; choose from default, paper")
    code, out, _ = run_cli(capsys, *run)
    assert code == 0
    default = json.loads(out)
    code, out, _ = run_cli(capsys, *run, "--profile", "paper")
    assert code == 0
    paper = json.loads(out)
    assert [t["position"] for t in paper["tokens"]] != [t["position"] for t in default["tokens"]]  # longer prompt
