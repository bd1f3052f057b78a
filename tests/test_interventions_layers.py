"""Skip, Inject, Exit and Scale: interventions that act inside the decoder stack.

Each test pins the one property the paper's experiment relies on: a skipped sublayer leaves the chosen
rows untouched, injected tokens enter exactly at their layer and are absent below it, exited tokens
leave every later cache, and scaling touches only the visual embeddings.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.interventions import Exit, Inject, Prune, Scale, Skip, intervene
from intervention_helpers import batch_of, cache_lengths, greedy, layer0_inputs, new_tokens, record_layer_calls


def _forward(session, batch):
    with torch.no_grad():
        return session.model(**batch.inputs)


def _visual_rows(batch) -> torch.Tensor:
    return batch.spans[0][0].positions


class TestSkip:
    """n zeroes layer n's attention update, n.5 its MLP update, for the chosen rows only."""

    @pytest.mark.parametrize("sublayer", [1, 1.5])
    def test_selected_rows_unchanged_across_the_sublayer(self, tiny, sublayer):
        batch = batch_of(tiny, [0])
        chosen = (0, 3, 5)
        rows = _visual_rows(batch)[list(chosen)]
        layer = tiny.adapter.decoder_layers[1]
        seen = {}

        def keep(name, value):
            seen[name] = (value[0] if isinstance(value, tuple) else value).clone()

        handles = [
            layer.register_forward_pre_hook(lambda m, a, k: keep("in", a), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: keep("mid", a)),
            layer.register_forward_hook(lambda m, a, o: keep("out", o)),
        ]
        try:
            with intervene(tiny, [Skip(indices=chosen, sublayers=(sublayer,))]) as run:
                _forward(tiny, batch)
        finally:
            for handle in handles:
                handle.remove()
        before, after = ("in", "mid") if sublayer == 1 else ("mid", "out")
        assert torch.equal(seen[before][0, rows], seen[after][0, rows])
        others = torch.ones(seen[before].shape[1], dtype=torch.bool)
        others[rows] = False
        assert not torch.isclose(seen[before][0, others], seen[after][0, others]).all(dim=-1).any()
        assert run.last.samples[0].skipped == {str(sublayer): len(chosen)}

    def test_other_tokens_still_attend_to_skipped_ones(self, tiny):
        """Skipping changes the skipped rows' own stream only; a text row is affected only through them."""
        batch = batch_of(tiny, [0])
        base = _forward(tiny, batch).logits
        with intervene(tiny, [Skip(group="visual", sublayers=(0, 0.5))]):
            skipped = _forward(tiny, batch).logits
        first_visual = int(_visual_rows(batch)[0])
        torch.testing.assert_close(skipped[0, :first_visual], base[0, :first_visual], rtol=0, atol=0)
        assert not torch.allclose(skipped[0, -1], base[0, -1])

    def test_decode_steps_are_untouched(self, tiny):
        batch = batch_of(tiny, [0])
        with intervene(tiny, [Skip(indices=(0,), sublayers=(2,))]):
            first = greedy(tiny.model, **batch.inputs)
            second = greedy(tiny.model, **batch.inputs)
        assert torch.equal(first, second)


class TestInject:
    """Layers below k see text only; at k the projector outputs appear at the image positions."""

    def test_inject_at_zero_is_the_baseline(self, tiny):
        batch = batch_of(tiny, [0])
        base = _forward(tiny, batch).logits
        base_tokens = greedy(tiny.model, **batch.inputs)
        with intervene(tiny, [Inject(0)]):
            assert torch.equal(_forward(tiny, batch).logits, base)
            assert torch.equal(greedy(tiny.model, **batch.inputs), base_tokens)

    @pytest.mark.parametrize("scale", [1.0, 0.25])
    def test_tokens_enter_at_k(self, tiny, scale):
        batch = batch_of(tiny, [0])
        projected = layer0_inputs(tiny, batch)[0, _visual_rows(batch)]
        length = batch.inputs["input_ids"].shape[1]
        text = length - projected.shape[0]
        with intervene(tiny, [Inject(2, scale=scale)]), record_layer_calls(tiny, 2) as at_k:
            output = _forward(tiny, batch)
        assert cache_lengths(output) == [text, text, length, length]
        entering = at_k[0]["hidden"][0, _visual_rows(batch)]
        torch.testing.assert_close(entering, projected * scale, rtol=0, atol=0)
        assert at_k[0]["position_ids"][0].tolist() == list(range(length))

    def test_text_rows_below_k_equal_a_text_only_run(self, tiny):
        batch = batch_of(tiny, [0])
        visual = set(_visual_rows(batch).tolist())
        length = batch.inputs["input_ids"].shape[1]
        text = torch.tensor([p for p in range(length) if p not in visual])
        embeds = layer0_inputs(tiny, batch)[:, text]
        with record_layer_calls(tiny, 2) as reference, torch.no_grad():
            tiny.model(inputs_embeds=embeds, position_ids=text[None], attention_mask=torch.ones(1, len(text)))
        with intervene(tiny, [Inject(2)]), record_layer_calls(tiny, 2) as hooked:
            _forward(tiny, batch)
        torch.testing.assert_close(hooked[0]["hidden"][0, text], reference[0]["hidden"][0], rtol=0, atol=1e-6)

    def test_generate_runs_with_the_cache(self, tiny):
        batch = batch_of(tiny, [0, 1], ["what is this", "is there a red thing in the picture"])
        with intervene(tiny, [Inject(3)]):
            together = new_tokens(greedy(tiny.model, **batch.inputs), batch)
        for row in range(2):
            single = batch_of(tiny, [row], [["what is this", "is there a red thing in the picture"][row]])
            with intervene(tiny, [Inject(3)]):
                assert torch.equal(new_tokens(greedy(tiny.model, **single.inputs), single)[0], together[row])


class TestExit:
    """At layer k every visual token leaves; caches of layers >= k hold none."""

    def test_caches_after_k_hold_no_visual_entries(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        text = length - _visual_rows(batch).numel()
        with intervene(tiny, [Exit(2)]) as run:
            output = _forward(tiny, batch)
        assert cache_lengths(output) == [length, length, text, text]
        assert run.last.samples[0].tokens_per_layer == [length, length, text, text]

    def test_equals_running_the_later_layers_on_text_rows(self, tiny):
        batch = batch_of(tiny, [0])
        visual = set(_visual_rows(batch).tolist())
        length = batch.inputs["input_ids"].shape[1]
        text = torch.tensor([p for p in range(length) if p not in visual])
        with record_layer_calls(tiny, 2) as at_k:
            _forward(tiny, batch)
        hidden = at_k[0]["hidden"][:, text]
        adapter = tiny.adapter
        with torch.no_grad():
            rotary = adapter.position_embeddings(hidden, text[None])
            for layer in adapter.decoder_layers[2:]:
                hidden = layer(hidden, attention_mask=None, position_ids=text[None], position_embeddings=rotary)
            expected = adapter.lm_head(adapter.final_norm(hidden))
            with intervene(tiny, [Exit(2)]):
                got = _forward(tiny, batch).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    def test_generate_under_exit_decodes_against_text_only_caches(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        text = length - _visual_rows(batch).numel()
        with intervene(tiny, [Exit(1)]), torch.no_grad():
            output = tiny.model.generate(
                **batch.inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True
            )
        assert cache_lengths(output) == [length + 3] + [text + 3] * 3


class TestScale:
    """Scale multiplies the visual embeddings and nothing else."""

    def test_only_visual_rows_scaled(self, tiny):
        batch = batch_of(tiny, [0])
        base = layer0_inputs(tiny, batch)
        with intervene(tiny, [Scale(0.01)]), record_layer_calls(tiny, 0) as calls:
            _forward(tiny, batch)
        got = calls[0]["hidden"]
        rows = _visual_rows(batch)
        torch.testing.assert_close(got[0, rows], base[0, rows] * 0.01, rtol=0, atol=0)
        text = torch.ones(got.shape[1], dtype=torch.bool)
        text[rows] = False
        assert torch.equal(got[0, text], base[0, text])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_inject_and_exit_under_both_attention_kinds(tiny_dir, attn):
    """The masks Inject and Exit build for their layers suit eager attention as well as SDPA."""
    import embedlens
    from embedlens.models.loading import load_adapter

    adapter = load_adapter(str(tiny_dir), device="cpu")
    adapter.model.set_attn_implementation(attn)
    session = embedlens.Session(adapter)
    batch = batch_of(session, [0, 1], ["what is this", "is there a red thing in the picture"])
    with intervene(session, [Inject(1), Exit(3)]):
        together = new_tokens(greedy(session.model, **batch.inputs), batch)
    for row, prompt in enumerate(["what is this", "is there a red thing in the picture"]):
        single = batch_of(session, [row], [prompt])
        with intervene(session, [Inject(1), Exit(3)]):
            assert torch.equal(new_tokens(greedy(session.model, **single.inputs), single)[0], together[row])


@pytest.mark.parametrize(
    "prompts",
    [("what is this", "is there a red thing in the picture"), ("is there a red thing in the picture", "what is this")],
)
def test_ragged_prune_with_inject_and_exit_matches_single_samples(tiny, tiny_anchor_file, prompts):
    """Samples that lose different numbers of tokens, re-laid at Inject and Exit, answer as alone.

    Both prompt orders run, so in one of them the longer (unpadded) prompt loses more tokens and gets
    padding slots of its own at every layout change.
    """
    items = [Prune(group="dead+sink"), Inject(1), Exit(3)]
    batch = batch_of(tiny, [0, 5], list(prompts))
    with intervene(tiny, items, anchors=tiny_anchor_file) as run:
        together = new_tokens(greedy(tiny.model, **batch.inputs), batch)
    assert len({len(sample.pruned) for sample in run.last.samples}) == 2
    for row, (seed, prompt) in enumerate(zip([0, 5], prompts, strict=True)):
        single = batch_of(tiny, [seed], [prompt])
        with intervene(tiny, items, anchors=tiny_anchor_file):
            assert torch.equal(new_tokens(greedy(tiny.model, **single.inputs), single)[0], together[row])


def test_inject_composes_with_prune(tiny):
    """Under Prune + Inject only the kept visual tokens enter at layer k, at their original positions."""
    batch = batch_of(tiny, [0])
    visual = _visual_rows(batch)
    length = batch.inputs["input_ids"].shape[1]
    pruned = (1, 2, 8)
    kept_visual = [int(p) for i, p in enumerate(visual) if i not in pruned]
    projected = layer0_inputs(tiny, batch)[0]
    with intervene(tiny, [Prune(indices=pruned), Inject(2)]), record_layer_calls(tiny, 2) as at_k:
        output = _forward(tiny, batch)
    text = length - visual.numel()
    assert cache_lengths(output) == [text, text, length - len(pruned), length - len(pruned)]
    positions = at_k[0]["position_ids"][0].tolist()
    assert positions == [p for p in range(length) if p not in {int(visual[i]) for i in pruned}]
    slots = [positions.index(p) for p in kept_visual]
    torch.testing.assert_close(at_k[0]["hidden"][0, slots], projected[kept_visual], rtol=0, atol=0)


@pytest.mark.parametrize(
    "items",
    [
        [Inject(2)],
        [Exit(2)],
        [Inject(1), Exit(3)],
        [Prune(indices=(0, 5, 6)), Inject(2)],
        [Skip(group="visual", sublayers=((0, "attn"), (1, "mlp")))],
    ],
    ids=["inject", "exit", "inject+exit", "prune+inject", "skip"],
)
def test_cached_decoding_equals_rerunning_the_whole_sequence(tiny, items):
    """The KV-cache decode path (its own masks and positions per phase) must give what a fresh prefill of
    the prompt plus the tokens so far gives, step by step; otherwise generate under an intervention
    would answer differently from the intervention itself."""
    batch = batch_of(tiny, [3], ["is there a red thing in the picture"])
    with intervene(tiny, items):
        cached = new_tokens(greedy(tiny.model, **batch.inputs), batch)[0].tolist()
    inputs = dict(batch.inputs)
    rerun = []
    for _ in cached:
        with intervene(tiny, items), torch.no_grad():
            logits = tiny.model(**inputs, use_cache=False).logits[0, -1]
        rerun.append(int(logits.argmax()))
        step = torch.tensor([[rerun[-1]]])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], step], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
    assert cached and rerun == cached
