"""Forward hooks: what they read, that they stop early, and that they never stay behind."""

from __future__ import annotations

import pytest
import torch

from embedlens.capture import capture, run_captured

NUM_LAYERS = 4


def hook_count(module: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in ``module``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def watched_hooks(adapter) -> dict[str, int]:
    """Hook counts on the parts capture() touches, and on the whole model."""
    counts = {f"decoder{i}": hook_count(layer) for i, layer in enumerate(adapter.decoder_layers)}
    counts["projector"] = hook_count(adapter.projector)
    counts["model"] = hook_count(adapter.model)
    return counts


@pytest.fixture(scope="module")
def inputs(tiny, make_image):
    """Model inputs for one image, after one plain forward.

    transformers installs its own (inactive) output-capturing hooks on the vision layers at the first
    forward and keeps them for good; the warm-up makes hook counts comparable before and after.
    """
    prepared = tiny.prepare([make_image(20)], ["Describe"]).inputs
    with torch.inference_mode():
        tiny.model(**prepared)
    return prepared


@pytest.fixture(autouse=True)
def _warm(inputs):
    """Every test here runs after the warm-up forward."""


@pytest.fixture
def calls(tiny):
    """Counts forward calls of the last decoder layer and of the final norm (our own hooks, removed after)."""
    counter = {"last_layer": 0, "final_norm": 0}

    def bump(name):
        def hook(*_args):
            counter[name] += 1

        return hook

    handles = [
        tiny.adapter.decoder_layers[-1].register_forward_pre_hook(bump("last_layer")),
        tiny.adapter.final_norm.register_forward_pre_hook(bump("final_norm")),
    ]
    yield counter
    for handle in handles:
        handle.remove()


class TestHooksAreRemoved:
    """A hook left behind would silently alter every later forward pass of the user's model (or keep
    raising the early-stop signal), so hooks must go away after use, whatever happens."""

    @pytest.mark.parametrize("layers", [[0], [2], [NUM_LAYERS], [0, 1, NUM_LAYERS], []])
    def test_after_a_normal_run(self, tiny, inputs, layers):
        before = watched_hooks(tiny.adapter)
        captured = run_captured(tiny.adapter, inputs, layers, vision_features=True)
        assert sorted(captured.hidden) == sorted(layers)
        assert captured.vision_features is not None
        assert watched_hooks(tiny.adapter) == before

    def test_hooks_are_really_installed_while_capturing(self, tiny):
        before = watched_hooks(tiny.adapter)
        with capture(tiny.adapter, [0, 2], vision_features=True):
            during = watched_hooks(tiny.adapter)
            assert during["decoder0"] == before["decoder0"] + 1  # pre-hook: layer 0 is decoder layer 0's input
            assert during["decoder1"] == before["decoder1"]
            assert during["decoder2"] == before["decoder2"] + 1  # pre-hook: layer 2 is decoder layer 2's input
            assert during["projector"] == before["projector"] + 1
        assert watched_hooks(tiny.adapter) == before

    def test_when_the_forward_raises(self, tiny, make_image):
        batch = tiny.prepare([make_image(21)], ["Describe"])
        broken = dict(batch.inputs)
        ids = broken["input_ids"].clone()
        ids[0, batch.spans[0][0].positions[0]] = 5  # 15 image tokens for 16 image features
        broken["input_ids"] = ids
        before = watched_hooks(tiny.adapter)
        with pytest.raises(ValueError):
            run_captured(tiny.adapter, broken, [0, 3], vision_features=True)
        assert watched_hooks(tiny.adapter) == before

    def test_when_the_block_raises(self, tiny):
        before = watched_hooks(tiny.adapter)
        with pytest.raises(RuntimeError, match="boom"), capture(tiny.adapter, [0, 1, NUM_LAYERS], vision_features=True):
            raise RuntimeError("boom")
        assert watched_hooks(tiny.adapter) == before

    def test_model_still_works_normally_afterwards(self, tiny, inputs):
        with torch.inference_mode():
            expected = tiny.model(**inputs).logits
        run_captured(tiny.adapter, inputs, [0])
        with torch.inference_mode():
            again = tiny.model(**inputs).logits
        assert torch.equal(expected, again)


class TestEarlyStop:
    """Probing layer 0 of a 7B model should cost the vision tower only: the decoder must be skipped,
    and skipping must not change what is read."""

    def test_layer_zero_equals_full_run(self, tiny, inputs):
        early = run_captured(tiny.adapter, inputs, [0]).hidden[0]
        with capture(tiny.adapter, [0], stop_early=False) as store, torch.inference_mode():
            tiny.model(**inputs, use_cache=False)
        assert torch.equal(early, store.hidden[0])
        with torch.inference_mode():
            reference = tiny.model(**inputs, output_hidden_states=True).hidden_states[0]
        assert torch.equal(early, reference)

    def test_layer_zero_skips_the_decoder(self, tiny, inputs, calls):
        run_captured(tiny.adapter, inputs, [0])
        assert calls == {"last_layer": 0, "final_norm": 0}

    def test_middle_layer_skips_the_rest(self, tiny, inputs, calls):
        run_captured(tiny.adapter, inputs, [2])
        assert calls == {"last_layer": 0, "final_norm": 0}

    def test_last_layer_runs_everything(self, tiny, inputs, calls):
        run_captured(tiny.adapter, inputs, [NUM_LAYERS])
        assert calls == {"last_layer": 1, "final_norm": 1}

    def test_without_stop_early_everything_runs(self, tiny, inputs, calls):
        with capture(tiny.adapter, [0], stop_early=False), torch.inference_mode():
            tiny.model(**inputs, use_cache=False)
        assert calls == {"last_layer": 1, "final_norm": 1}


class TestSeveralLayers:
    """Reading many layers in one pass is an optimisation: it must equal one pass per layer."""

    def test_all_at_once_equals_one_by_one(self, tiny, inputs):
        layers = list(range(NUM_LAYERS + 1))
        together = run_captured(tiny.adapter, inputs, layers)
        assert sorted(together.hidden) == layers
        for layer in layers:
            alone = run_captured(tiny.adapter, inputs, [layer])
            assert list(alone.hidden) == [layer]
            assert torch.equal(together.hidden[layer], alone.hidden[layer])

    def test_order_and_duplicates_do_not_matter(self, tiny, inputs):
        a = run_captured(tiny.adapter, inputs, [3, 1, 3])
        b = run_captured(tiny.adapter, inputs, [1, 3])
        assert sorted(a.hidden) == [1, 3]
        for layer in (1, 3):
            assert torch.equal(a.hidden[layer], b.hidden[layer])

    def test_layers_differ(self, tiny, inputs):
        """Guard against reading the same tensor under several names."""
        captured = run_captured(tiny.adapter, inputs, list(range(NUM_LAYERS + 1)))
        for layer in range(NUM_LAYERS):
            assert not torch.allclose(captured.hidden[layer], captured.hidden[layer + 1])

    def test_vision_features_feed_layer_zero(self, tiny, make_image):
        batch = tiny.prepare([make_image(22)], ["Describe"])
        captured = run_captured(tiny.adapter, batch.inputs, [0], vision_features=True)
        features = captured.vision_features
        assert features.shape == (1, 16, 64)
        with torch.inference_mode():
            projected = tiny.adapter.projector(features)
        positions = batch.spans[0][0].positions
        torch.testing.assert_close(captured.hidden[0][0, positions], projected[0], rtol=1e-6, atol=1e-6)
