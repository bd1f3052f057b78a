"""Prefill FLOP accounting (``embedlens.bench``) against numbers worked out by hand for the tiny model.

The formulas are written out again here, independently of ``embedlens.bench.flops``, from the tiny
model's config: a wrong count would make every predicted speedup the benchmarks report wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from embedlens.bench.accounting import Accounting, account, prefill_once
from embedlens.bench.flops import FlopCount, TextDims, layer_flops, sample_flops, vision_flops
from embedlens.interventions import Exit, Inject, Prune, Scale, Skip, intervene
from intervention_helpers import batch_of

GRID_TOKENS = 16
LAYERS = 4


@dataclass(frozen=True)
class Sizes:
    """The decoder and vision sizes, read straight from the configs."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    vision_width: int
    vision_ffn: int
    vision_layers: int
    patch: int
    channels: int


@pytest.fixture(scope="module")
def sizes(tiny) -> Sizes:
    text = tiny.adapter.language_model.config
    vision = tiny.adapter.vision_tower.config
    return Sizes(
        d=text.hidden_size,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        ffn=text.intermediate_size,
        vocab=text.vocab_size,
        vision_width=vision.hidden_size,
        vision_ffn=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        patch=vision.patch_size,
        channels=vision.num_channels,
    )


def hand_layer(s: Sizes, n: int) -> int:
    """One untouched decoder layer on ``n`` tokens, each term on its own (1 multiply-add = 2 FLOPs)."""
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    q = 2 * n * s.d * q_dim
    k = 2 * n * s.d * kv_dim
    v = 2 * n * s.d * kv_dim
    o = 2 * n * q_dim * s.d
    pairs = n * (n + 1) // 2  # causal: token i sees i + 1 keys
    scores = 2 * s.head_dim * s.heads * pairs
    weighted_sum = 2 * s.head_dim * s.heads * pairs
    gate, up, down = 2 * n * s.d * s.ffn, 2 * n * s.d * s.ffn, 2 * n * s.ffn * s.d
    return q + k + v + o + scores + weighted_sum + gate + up + down


def hand_vision(s: Sizes, grid_tokens: int, text_d: int) -> int:
    """CLIP tower on patches + CLS, patch embedding, and the 2-layer projector on the grid tokens."""
    t, w = grid_tokens + 1, s.vision_width
    per_layer_linear = 4 * 2 * w * w + 2 * w * s.vision_ffn + 2 * s.vision_ffn * w  # q, k, v, o; fc1, fc2
    attention = 4 * t * t * w  # scores and weighted sum, every token sees every token
    tower = s.vision_layers * (t * per_layer_linear + attention)
    patch_embedding = grid_tokens * 2 * s.channels * s.patch * s.patch * w
    projector = grid_tokens * (2 * w * text_d + 2 * text_d * text_d)
    return tower + patch_embedding + projector


@pytest.fixture(scope="module")
def batch(tiny):
    return batch_of(tiny, [0])


@pytest.fixture(scope="module")
def length(batch) -> int:
    return int(batch.inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def visual_positions(tiny, batch) -> list[int]:
    """Sequence positions of the 16 visual tokens (row-major grid order)."""
    ids = batch.inputs["input_ids"][0]
    positions = (ids == tiny.adapter.image_token_id).nonzero().flatten().tolist()
    assert len(positions) == GRID_TOKENS
    return positions


def record_of(session, batch, items, row: int = 0):
    with intervene(session, items) as run:
        prefill_once(session, batch)
    return run.last.samples[row]


class TestDims:
    """Every count depends on these sizes; the tiny model uses grouped KV heads, which must be read."""

    def test_read_from_config(self, tiny, sizes):
        dims = TextDims.of(tiny.adapter)
        assert dims == TextDims(
            hidden=sizes.d,
            heads=sizes.heads,
            kv_heads=sizes.kv_heads,
            head_dim=sizes.head_dim,
            ffn=sizes.ffn,
            vocab=sizes.vocab,
            layers=LAYERS,
        )
        assert dims.kv_heads < dims.heads  # grouped-query attention: K/V are narrower than Q


class TestLayerFormula:
    """One decoder layer: projections, causal attention pairs n(n+1)/2 and the gated MLP 6 n d ffn."""

    @pytest.mark.parametrize("n", [1, 2, 7, 23, 100])
    def test_untouched_layer(self, tiny, sizes, n):
        assert layer_flops(TextDims.of(tiny.adapter), n) == hand_layer(sizes, n)

    def test_tiny_numbers(self, tiny):
        """The 23-token prompt worked out in full: d=64, 4 heads of 16, 2 KV heads, ffn 128."""
        projections = 2 * 64 * 23 * (64 + 2 * 32) + 2 * 23 * 64 * 64
        attention = 4 * 16 * 4 * (23 * 24 // 2)
        mlp = 6 * 23 * 64 * 128
        assert layer_flops(TextDims.of(tiny.adapter), 23) == projections + attention + mlp == 1_766_400

    def test_skipped_rows(self, tiny, sizes):
        """Skipped attention rows lose their Q/O projections and attention pairs, not their K/V."""
        dims = TextDims.of(tiny.adapter)
        q_dim = sizes.heads * sizes.head_dim
        rows, visible = 3, 15
        saved = 2 * rows * sizes.d * q_dim + 2 * rows * q_dim * sizes.d + 4 * sizes.head_dim * sizes.heads * visible
        assert layer_flops(dims, 23, skipped_attn=(rows, visible)) == hand_layer(sizes, 23) - saved
        assert layer_flops(dims, 23, skipped_mlp=rows) == hand_layer(sizes, 23) - 6 * rows * sizes.d * sizes.ffn


class TestSampleFlops:
    """Per-sample counts from intervention records: what the predicted speedups are built on."""

    def test_baseline(self, tiny, sizes, batch, length):
        record = record_of(tiny, batch, [])
        for count in (sample_flops(tiny.adapter, record, baseline=True), sample_flops(tiny.adapter, record)):
            assert count.tokens_per_layer == [length] * LAYERS
            assert count.layers == [hand_layer(sizes, length)] * LAYERS
            assert count.head == 2 * sizes.d * sizes.vocab  # last token only
            assert count.vision == hand_vision(sizes, GRID_TOKENS, sizes.d)
            assert count.llm == LAYERS * hand_layer(sizes, length) + count.head
            assert count.total == count.llm + count.vision

    def test_pruned_record(self, tiny, sizes, batch, length):
        record = record_of(tiny, batch, [Prune(indices=(0, 1, 2))])
        assert record.tokens_per_layer == [length - 3] * LAYERS
        pruned = sample_flops(tiny.adapter, record)
        baseline = sample_flops(tiny.adapter, record, baseline=True)
        assert pruned.tokens_per_layer == [length - 3] * LAYERS
        assert baseline.tokens_per_layer == [length] * LAYERS
        assert pruned.total < baseline.total
        # one layer, the difference written out: 3 fewer rows everywhere, and fewer causal pairs
        n, m = length, length - 3
        q_dim, kv_dim = sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
        expected = (
            (n - m) * 2 * sizes.d * (2 * q_dim + 2 * kv_dim)
            + 4 * q_dim * (n * (n + 1) // 2 - m * (m + 1) // 2)
            + 6 * (n - m) * sizes.d * sizes.ffn
        )
        for layer in range(LAYERS):
            assert baseline.layers[layer] - pruned.layers[layer] == expected
        assert baseline.total - pruned.total == LAYERS * expected
        assert pruned.head == baseline.head and pruned.vision == baseline.vision

    def test_inject_and_exit(self, tiny, sizes, batch, length):
        text = length - GRID_TOKENS
        injected = sample_flops(tiny.adapter, record_of(tiny, batch, [Inject(2)]))
        assert injected.tokens_per_layer == [text, text, length, length]
        assert injected.layers == [hand_layer(sizes, n) for n in (text, text, length, length)]
        exited = sample_flops(tiny.adapter, record_of(tiny, batch, [Exit(3)]))
        assert exited.layers == [hand_layer(sizes, n) for n in (length, length, length, text)]


class TestSkipFlops:
    """Skip saves only the skipped rows' own work; other tokens still read their keys and values."""

    def test_attention_skip(self, tiny, sizes, batch, length, visual_positions):
        cells = (0, 1, 5)
        record = record_of(tiny, batch, [Skip(indices=cells, sublayers=((1, "attn"),))])
        # no padding: the row at position p attends to the p + 1 keys up to and including itself
        visible = sum(visual_positions[cell] + 1 for cell in cells)
        assert record.skipped == {"1": 3}
        assert record.skipped_visible == {"1": (3, visible)}
        assert record.tokens_per_layer == [length] * LAYERS
        count = sample_flops(tiny.adapter, record)
        baseline = sample_flops(tiny.adapter, record, baseline=True)
        q_dim = sizes.heads * sizes.head_dim
        q_and_o = 3 * (2 * sizes.d * q_dim + 2 * q_dim * sizes.d)
        pairs = 4 * sizes.head_dim * sizes.heads * visible
        assert baseline.layers[1] - count.layers[1] == q_and_o + pairs
        assert [count.layers[i] for i in (0, 2, 3)] == [baseline.layers[i] for i in (0, 2, 3)]
        assert count.vision == baseline.vision and count.head == baseline.head

    def test_mlp_skip(self, tiny, sizes, batch):
        record = record_of(tiny, batch, [Skip(indices=(0, 1, 5), sublayers=((2, "mlp"),))])
        assert record.skipped == {"2.5": 3}
        assert record.skipped_visible == {}
        count = sample_flops(tiny.adapter, record)
        baseline = sample_flops(tiny.adapter, record, baseline=True)
        assert baseline.layers[2] - count.layers[2] == 6 * 3 * sizes.d * sizes.ffn
        assert [count.layers[i] for i in (0, 1, 3)] == [baseline.layers[i] for i in (0, 1, 3)]

    def test_both_sublayers_of_every_visual_token(self, tiny, sizes, batch, visual_positions):
        record = record_of(tiny, batch, [Skip(group="visual", sublayers=((0, "attn"), (0, "mlp")))])
        visible = sum(p + 1 for p in visual_positions)
        assert record.skipped == {"0": GRID_TOKENS, "0.5": GRID_TOKENS}
        count = sample_flops(tiny.adapter, record)
        baseline = sample_flops(tiny.adapter, record, baseline=True)
        q_dim = sizes.heads * sizes.head_dim
        saved = (
            GRID_TOKENS * 4 * sizes.d * q_dim
            + 4 * sizes.head_dim * sizes.heads * visible
            + 6 * GRID_TOKENS * sizes.d * sizes.ffn
        )
        assert baseline.layers[0] - count.layers[0] == saved

    def test_skipped_rows_that_were_pruned_cost_nothing(self, tiny, batch, visual_positions):
        """Pruned cell 0 is gone before layer 0, so only cell 1 is skipped, one slot further forward."""
        record = record_of(tiny, batch, [Prune(indices=(0,)), Skip(indices=(0, 1), sublayers=((0, "attn"),))])
        assert record.skipped_visible == {"0": (1, visual_positions[1])}

    def test_left_padding_is_not_a_key(self, tiny, sizes):
        """In a left-padded batch, the shorter row's skipped tokens see only real keys."""
        padded = batch_of(tiny, [0, 1], ["is there a red thing in the picture", "what is this"])
        mask = padded.inputs["attention_mask"]
        row = int(mask.sum(dim=1).argmin())
        pad = int((mask[row] == 0).sum())
        assert pad > 0 and mask[row, 0] == 0  # left padding
        ids = padded.inputs["input_ids"][row]
        positions = (ids == tiny.adapter.image_token_id).nonzero().flatten().tolist()
        record = record_of(tiny, padded, [Skip(indices=(0, 3), sublayers=((2, "attn"),))], row=row)
        assert record.length == int(mask[row].sum())
        assert record.skipped_visible == {"2": (2, (positions[0] - pad + 1) + (positions[3] - pad + 1))}
        count = sample_flops(tiny.adapter, record)
        assert count.layers[0] == hand_layer(sizes, record.length)


class TestVisionFlops:
    """The vision tower runs once per image whatever the decoder does; its count must not move."""

    def test_constant_and_positive(self, tiny, sizes, batch):
        cases = [
            [],
            [Prune(indices=(0, 1, 2))],
            [Prune(group="visual")],
            [Skip(indices=(4,), sublayers=((1, "attn"), (1, "mlp")))],
            [Inject(2)],
            [Exit(1)],
            [Scale(0.5)],
        ]
        expected = hand_vision(sizes, GRID_TOKENS, sizes.d)
        assert expected > 0
        for items in cases:
            record = record_of(tiny, batch, items)
            assert record.images == 1 and record.grid_tokens == GRID_TOKENS
            assert sample_flops(tiny.adapter, record).vision == expected, items
            assert sample_flops(tiny.adapter, record, baseline=True).vision == expected, items

    def test_per_pass(self, tiny, sizes):
        """One tower pass per image (CLIP: the patches plus CLS); three images cost three times one."""
        assert tiny.adapter.class_tokens == 1
        one = vision_flops(tiny.adapter, [GRID_TOKENS + 1], GRID_TOKENS)
        assert vision_flops(tiny.adapter, [GRID_TOKENS + 1] * 3, 3 * GRID_TOKENS) == 3 * one
        assert one == hand_vision(sizes, GRID_TOKENS, sizes.d)


class TestAccount:
    """``account`` is what the CLI and benchmarks print: speedups and a JSON summary."""

    def test_prune_predicts_a_speedup(self, tiny, batch):
        found = account(tiny, batch, [Prune(indices=(0, 1, 2))])
        assert isinstance(found, Accounting)
        assert found.interventions == "prune:[0,1,2]"
        assert found.predicted_speedup > 1
        assert found.predicted_speedup == found.baseline.total / found.flops.total
        assert found.seconds is None and found.baseline_seconds is None and found.measured_speedup is None

    def test_no_interventions(self, tiny, batch):
        found = account(tiny, batch, [])
        assert found.interventions == "none"
        assert found.predicted_speedup == 1.0
        assert found.flops.total == found.baseline.total

    def test_to_dict_is_json(self, tiny, batch, length):
        found = account(tiny, batch, [Prune(indices=(0, 1, 2)), Skip(indices=(5,), sublayers=((1, "mlp"),))])
        data = json.loads(json.dumps(found.to_dict()))
        assert data["interventions"] == "prune:[0,1,2] skip:[5]@1.5"
        assert data["flops"]["tokens_per_layer"] == [length - 3] * LAYERS
        assert data["baseline_flops"]["tokens_per_layer"] == [length] * LAYERS
        assert data["flops"]["total_gflops"] == pytest.approx(found.flops.total / 1e9)
        assert data["predicted_speedup"] == pytest.approx(found.predicted_speedup)
        assert data["prefill_seconds"] is None and data["measured_speedup"] is None

    def test_measure(self, tiny, batch, length):
        found = account(tiny, batch, [Prune(indices=(0, 1, 2))], measure=True, repeats=1)
        assert found.seconds > 0 and found.baseline_seconds > 0
        assert found.measured_speedup == found.baseline_seconds / found.seconds
        assert found.flops.tokens_per_layer == [length - 3] * LAYERS
        data = json.loads(json.dumps(found.to_dict()))
        assert data["prefill_seconds"] > 0 and data["baseline_prefill_seconds"] > 0

    def test_flop_count_to_dict(self):
        count = FlopCount(layers=[1e9, 2e9], vision=5e8, head=5e8, tokens_per_layer=[3, 2])
        assert count.to_dict() == {
            "total_gflops": 4.0,
            "llm_gflops": 3.5,
            "vision_gflops": 0.5,
            "tokens_per_layer": [3, 2],
        }
