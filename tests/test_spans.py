"""Where the visual tokens are: span detection for raw prompts, chat templates, batches and grids."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

import embedlens
from embedlens import EmbedLensError, InputError

IMAGE_ID = 999


def expected_positions(batch: embedlens.PreparedBatch, sample: int = 0) -> torch.Tensor:
    return torch.nonzero(batch.inputs["input_ids"][sample].cpu() == IMAGE_ID).flatten()


def check_span(batch: embedlens.PreparedBatch, sample: int = 0, grid: tuple[int, int] = (4, 4)):
    """The one span of ``sample``: exactly the image-token positions, in order, on ``grid``."""
    assert len(batch.spans[sample]) == 1
    span = batch.spans[sample][0]
    assert span.sample == sample
    assert span.image == 0
    assert span.grid == grid
    assert span.num_tokens == grid[0] * grid[1]
    assert torch.equal(span.positions, expected_positions(batch, sample))
    assert span.extra_positions.numel() == 0
    rows, cols = span.rows_cols()
    index = torch.arange(grid[0] * grid[1])
    assert torch.equal(rows, index // grid[1])
    assert torch.equal(cols, index % grid[1])
    return span


def token_count(session: embedlens.Session, text: str) -> int:
    return len(session.adapter.tokenizer(text)["input_ids"])


class TestSinglePrompt:
    """Reading the wrong positions silently probes text tokens instead of visual ones: every way of
    placing the image must lead to exactly the positions holding the image token."""

    def test_raw_prompt_image_first(self, tiny, make_image):
        batch = tiny.prepare([make_image(0)], raw_prompts=["<image>\nDescribe"])
        assert batch.texts == ["<image>\nDescribe"]
        span = check_span(batch)
        assert span.positions.tolist() == list(range(token_count(tiny, ""), token_count(tiny, "") + 16))
        ids = batch.inputs["input_ids"][0]
        assert int(ids[span.positions[-1] + 1]) == tiny.adapter.tokenizer.convert_tokens_to_ids("Describe")

    def test_raw_prompt_image_after_text(self, tiny, make_image):
        batch = tiny.prepare([make_image(0)], raw_prompts=["Describe this <image> now"])
        span = check_span(batch)
        before = token_count(tiny, "Describe this")
        assert before >= 2
        assert span.positions.tolist() == list(range(before, before + 16))
        assert batch.inputs["input_ids"].shape[1] == before + 16 + 1

    def test_default_llava_template(self, tiny, make_image):
        batch = tiny.prepare([make_image(0)], ["Describe"])
        assert batch.texts == ["USER: <image>\nDescribe ASSISTANT:"]
        span = check_span(batch)
        before = token_count(tiny, "USER:")
        assert span.positions.tolist() == list(range(before, before + 16))

    def test_chatml_template(self, chatml, make_image):
        batch = chatml.prepare([make_image(0)], ["Describe"])
        assert batch.texts == ["<|im_start|>user\n<image>\nDescribe<|im_end|>\n<|im_start|>assistant\n"]
        span = check_span(batch)
        before = token_count(chatml, "<|im_start|>user\n")
        assert span.positions.tolist() == list(range(before, before + 16))

    def test_no_chat_template_puts_placeholder_first(self, no_template, make_image):
        assert no_template.adapter.format_prompt("Describe") == "<image>\nDescribe"
        batch = no_template.prepare([make_image(0)], ["Describe"])
        assert batch.texts == ["<image>\nDescribe"]
        span = check_span(batch)
        assert int(span.positions[0]) == token_count(no_template, "")

    def test_probe_result_positions(self, chatml, make_image):
        result = chatml.probe(make_image(0), "Describe", top_k=2)
        batch = chatml.prepare([make_image(0)], ["Describe"])
        np.testing.assert_array_equal(result.position, expected_positions(batch).numpy())
        np.testing.assert_array_equal(result.index, np.arange(16))
        np.testing.assert_array_equal(result.row, np.arange(16) // 4)
        np.testing.assert_array_equal(result.col, np.arange(16) % 4)
        assert result.text == batch.texts[0]


class TestGrids:
    """The grid shape turns token indices into image coordinates: a wrong grid misplaces every patch."""

    def test_four_by_four(self, tiny, make_image):
        batch = tiny.prepare([make_image(0)], ["Describe"])
        check_span(batch, grid=(4, 4))
        assert batch.views[0].size == (56, 56)

    def test_six_by_six(self, grid6, make_image):
        batch = grid6.prepare([make_image(0, 84, 84)], ["Describe"])
        check_span(batch, grid=(6, 6))
        result = grid6.probe(make_image(0, 84, 84), "Describe", top_k=1)
        assert result.grid == (6, 6)
        assert len(result) == 36
        np.testing.assert_array_equal(result.row, np.arange(36) // 6)
        np.testing.assert_array_equal(result.col, np.arange(36) % 6)

    @pytest.mark.parametrize(("width", "height"), [(90, 60), (40, 120), (300, 17), (56, 57)])
    def test_non_square_images(self, tiny, grid6, make_image, width, height):
        """The processor resizes and crops: any aspect ratio yields the model's grid."""
        image = make_image(5, width, height)
        for session, side, grid in [(tiny, 56, (4, 4)), (grid6, 84, (6, 6))]:
            batch = session.prepare([image], ["Describe"])
            check_span(batch, grid=grid)
            assert batch.views[0].size == (side, side)
            result = session.probe(image, "Describe", top_k=2)
            assert result.grid == grid
            assert result.view.size == (side, side)

    @pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
    def test_other_colour_modes(self, tiny, make_image, mode):
        image = make_image(6).convert(mode)
        result = tiny.probe(image, top_k=1)
        reference = tiny.probe(image.convert("RGB"), top_k=1)
        np.testing.assert_array_equal(result.top_ids, reference.top_ids)


class TestBatch:
    """Batching must be an optimisation only: left padding shifts positions, never results."""

    PROMPTS: ClassVar[list[str]] = ["Describe", "Describe the red circle on the left of this picture . What is it ?"]

    def test_spans_per_sample(self, tiny, make_image):
        images = [make_image(10), make_image(11, 80, 50)]
        batch = tiny.prepare(images, self.PROMPTS)
        mask = batch.inputs["attention_mask"]
        pad = int((mask[0] == 0).sum())
        assert pad == token_count(tiny, self.PROMPTS[1]) - token_count(tiny, self.PROMPTS[0])
        assert bool((mask[0, :pad] == 0).all()) and bool((mask[0, pad:] == 1).all())  # left padding
        assert bool((mask[1] == 1).all())
        spans = [check_span(batch, sample) for sample in range(2)]
        assert [span.global_image for span in spans] == [0, 1]
        alone = tiny.prepare([images[0]], self.PROMPTS[:1])
        assert torch.equal(spans[0].positions, alone.spans[0][0].positions + pad)
        assert len(batch.views) == 2
        assert tiny.adapter.tokenizer.padding_side == "right"  # restored after preparing

    @pytest.mark.parametrize("lens", ["embedding", "logit"])
    @pytest.mark.parametrize("layer", [0, 2, -1])
    def test_results_equal_probing_alone(self, tiny, make_image, layer, lens):
        images = [make_image(10), make_image(11, 80, 50)]
        batched = tiny.probe_batch(images, self.PROMPTS, layer=layer, top_k=5, lens=lens)
        assert len(batched) == 2
        for image, prompt, together in zip(images, self.PROMPTS, batched, strict=True):
            alone = tiny.probe(image, prompt, layer=layer, top_k=5, lens=lens)
            np.testing.assert_array_equal(together.top_ids, alone.top_ids)
            np.testing.assert_allclose(together.top_sims, alone.top_sims, atol=1e-5)
            np.testing.assert_allclose(together.norm, alone.norm, rtol=1e-4, atol=1e-5)
            assert together.text == alone.text
            assert together.prompt == prompt

    def test_raw_prompts_batch(self, tiny, make_image):
        raws = ["<image>\nDescribe", "Describe this red circle on the left <image> now"]
        images = [make_image(12), make_image(13)]
        batched = tiny.probe_batch(images, raw_prompts=raws, layer=1, top_k=3)
        for image, raw, together in zip(images, raws, batched, strict=True):
            alone = tiny.probe(image, raw_prompt=raw, layer=1, top_k=3)
            np.testing.assert_array_equal(together.top_ids, alone.top_ids)
            np.testing.assert_allclose(together.top_sims, alone.top_sims, atol=1e-5)
            assert together.text == raw


class TestInputErrors:
    """A prompt that cannot place the image must be reported as the user's mistake (InputError), not
    crash deep in transformers or silently probe the wrong tokens."""

    def test_raw_prompt_without_placeholder(self, tiny, make_image):
        with pytest.raises(InputError, match="placeholder"):
            tiny.probe(make_image(0), raw_prompt="Describe this")
        with pytest.raises(InputError, match="placeholder"):
            tiny.prepare([make_image(0)], raw_prompts=["Describe this"])

    def test_raw_prompt_with_two_placeholders_for_one_image(self, tiny, make_image):
        with pytest.raises(InputError, match="once per image"):
            tiny.probe(make_image(0), raw_prompt="<image> and <image>")

    def test_templated_prompt_containing_the_placeholder(self, tiny, make_image):
        """The placeholder typed into a normal prompt would add a second image slot."""
        with pytest.raises(EmbedLensError):
            tiny.probe(make_image(0), prompt="What is <image> here ?")

    def test_prompts_and_raw_prompts(self, tiny, make_image):
        with pytest.raises(InputError, match="not both"):
            tiny.probe(make_image(0), prompt="Describe", raw_prompt="<image>")

    def test_prompt_count_mismatch(self, tiny, make_image):
        with pytest.raises(InputError, match="prompts"):
            tiny.probe_batch([make_image(0), make_image(1)], ["only one"])


class TestFindSpans:
    """find_spans is the single source of truth for positions: inconsistent inputs must raise."""

    def ids(self, *rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows)

    @staticmethod
    def find(tiny, input_ids: torch.Tensor, grids: list[tuple[int, int]]):
        """find_spans on ``input_ids`` with pixel values of one image per grid (the grid is read off them)."""
        side = tiny.adapter.patch_size
        pixels = torch.zeros(len(grids), 3, grids[0][0] * side, grids[0][1] * side) if grids else None
        return tiny.adapter.find_spans({"input_ids": input_ids, "pixel_values": pixels})

    def test_consistent(self, tiny):
        row = [5, 6] + [IMAGE_ID] * 16 + [7]
        spans = self.find(tiny, self.ids(row), [(4, 4)])
        assert spans[0][0].positions.tolist() == list(range(2, 18))

    def test_two_images_in_one_sample(self, tiny):
        row = [5] + [IMAGE_ID] * 16 + [7] + [IMAGE_ID] * 16
        spans = self.find(tiny, self.ids(row), [(4, 4), (4, 4)])
        assert [s.image for s in spans[0]] == [0, 1]
        assert [s.global_image for s in spans[0]] == [0, 1]
        assert spans[0][1].positions.tolist() == list(range(18, 34))

    def test_too_few_image_tokens(self, tiny):
        row = [5] + [IMAGE_ID] * 15 + [7]
        with pytest.raises(InputError, match="expected 16 image tokens"):
            self.find(tiny, self.ids(row), [(4, 4)])

    def test_image_tokens_without_images(self, tiny):
        row = [5] + [IMAGE_ID] * 16
        with pytest.raises(InputError, match="more image tokens"):
            self.find(tiny, self.ids(row), [])

    def test_images_not_placed(self, tiny):
        with pytest.raises(InputError, match="only 0 placed"):
            self.find(tiny, self.ids([5, 6, 7]), [(4, 4)])
        rows = self.ids([5] + [IMAGE_ID] * 16, [5] * 17)
        with pytest.raises(InputError, match="only 1 placed"):
            self.find(tiny, rows, [(4, 4), (4, 4)])

    def test_grid_mismatch(self, tiny):
        row = [5] + [IMAGE_ID] * 16
        with pytest.raises(InputError, match="expected 36"):
            self.find(tiny, self.ids(row), [(6, 6)])


class TestClsToken:
    """With 'full' feature selection the CLS token comes first in each image's run of ``<image>`` tokens;
    it is an extra position, never a grid cell, so the grid is not shifted by one."""

    def test_span_puts_the_cls_token_beside_the_grid(self, with_cls, make_image):
        batch = with_cls.prepare([make_image(0)], ["Describe"])
        everything = expected_positions(batch)
        assert everything.numel() == 17
        span = batch.spans[0][0]
        assert span.grid == (4, 4)
        assert torch.equal(span.extra_positions, everything[:1])
        assert torch.equal(span.positions, everything[1:])

    def test_probe_reads_the_patch_rows_of_the_projector_output(self, with_cls, make_image):
        image = make_image(1)
        result = with_cls.probe(image, prompt="Describe", top_k=3)
        assert len(result) == 16 and result.grid == (4, 4)
        pixels = with_cls.prepare([image], ["Describe"]).inputs["pixel_values"]
        with torch.inference_mode():
            projected = with_cls.model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        assert projected.shape[0] == 17
        norms = projected.float().norm(dim=-1).numpy()
        np.testing.assert_allclose(result.norm, norms[1:], rtol=1e-5)
        assert not np.allclose(result.norm, norms[:-1], rtol=1e-3)

    def test_pruning_grid_cells_keeps_the_cls_token(self, with_cls, make_image):
        from embedlens.interventions import Prune

        batch = with_cls.prepare([make_image(2)], ["Describe"])
        span = batch.spans[0][0]
        answers, run = with_cls.generate_batch(batch, max_new_tokens=2, interventions=[Prune(indices=(0, 1, 2))])
        assert len(answers) == 1
        kept = set(run.records[0].output_positions[0].tolist())
        assert not kept & set(span.positions[:3].tolist())
        assert set(span.positions[3:].tolist()) | set(span.extra_positions.tolist()) <= kept
