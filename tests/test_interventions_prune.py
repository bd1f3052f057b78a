"""Prune on stock models: what leaves the sequence, what the cache holds, which positions remain.

Pruning is the paper's main experiment; these invariants are what make a pruning result trustworthy:
removing nothing must change nothing, removed tokens must really be gone from every layer's cache, and
the kept tokens must run exactly as if the pruned sequence had been built by hand.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.interventions import Prune, intervene
from helpers import random_image
from intervention_helpers import (
    batch_of,
    cache_lengths,
    greedy,
    hook_count,
    layer0_inputs,
    new_tokens,
    record_layer_calls,
)

PRUNED = (0, 3, 5, 10)


def _forward(session, batch):
    with torch.no_grad():
        return session.model(**batch.inputs)


class TestNothingChanged:
    """Interventions that remove nothing must leave the model bit-identical."""

    def test_empty_list_forward_and_generate(self, tiny):
        batch = batch_of(tiny, [0, 1], ["what is this", "is there a red thing in the picture"])
        base_logits = _forward(tiny, batch).logits
        base_tokens = greedy(tiny.model, **batch.inputs)
        with intervene(tiny, []):
            assert torch.equal(_forward(tiny, batch).logits, base_logits)
            assert torch.equal(greedy(tiny.model, **batch.inputs), base_tokens)

    def test_empty_group_removes_nothing(self, tiny):
        batch = batch_of(tiny, [0])
        base = _forward(tiny, batch).logits
        with intervene(tiny, [Prune(indices=())]) as run:
            assert torch.equal(_forward(tiny, batch).logits, base)
        assert run.last.samples[0].pruned == []

    def test_matched_random_of_empty_group_removes_nothing(self, tiny):
        batch = batch_of(tiny, [0])
        base = _forward(tiny, batch).logits
        with intervene(tiny, [Prune(indices=(), select="matched_random", seed=4)]) as run:
            assert torch.equal(_forward(tiny, batch).logits, base)
        assert run.last.samples[0].pruned == []


class TestCacheAndPositions:
    """After Prune the cache holds L - removed entries per layer and positions keep their numbering."""

    def test_cache_length_every_layer(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        with intervene(tiny, [Prune(indices=PRUNED)]) as run:
            output = _forward(tiny, batch)
        assert cache_lengths(output) == [length - len(PRUNED)] * tiny.num_layers
        assert run.last.samples[0].tokens_per_layer == [length - len(PRUNED)] * tiny.num_layers
        assert output.logits.shape[1] == length - len(PRUNED)

    def test_removed_positions_come_from_the_image_token_id(self, tiny):
        batch = batch_of(tiny, [0])
        span = batch.spans[0][0]
        with intervene(tiny, [Prune(indices=PRUNED)]) as run:
            _forward(tiny, batch)
        record = run.last.samples[0]
        assert record.pruned == list(PRUNED)
        assert record.pruned_positions == span.positions[list(PRUNED)].tolist()

    def test_keep_positions_and_first_decode_position(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        removed = set(batch.spans[0][0].positions[list(PRUNED)].tolist())
        kept = [p for p in range(length) if p not in removed]
        with intervene(tiny, [Prune(indices=PRUNED)]), record_layer_calls(tiny, 0) as calls:
            greedy(tiny.model, **batch.inputs)
        assert calls[0]["position_ids"][0].tolist() == kept
        assert calls[1]["position_ids"].flatten().tolist() == [length]
        assert calls[2]["position_ids"].flatten().tolist() == [length + 1]

    def test_reindex_positions(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        with intervene(tiny, [Prune(indices=PRUNED, positions="reindex")]), record_layer_calls(tiny, 0) as calls:
            greedy(tiny.model, **batch.inputs)
        assert calls[0]["position_ids"][0].tolist() == list(range(length - len(PRUNED)))
        assert calls[1]["position_ids"].flatten().tolist() == [length - len(PRUNED)]

    def test_generate_equals_hand_built_pruned_inputs(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        removed = set(batch.spans[0][0].positions[list(PRUNED)].tolist())
        kept = torch.tensor([p for p in range(length) if p not in removed])
        embeds = layer0_inputs(tiny, batch)[:, kept]
        by_hand = greedy(
            tiny.model,
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, kept.numel(), dtype=torch.long),
            position_ids=kept[None],
        )
        with intervene(tiny, [Prune(indices=PRUNED)]):
            hooked = new_tokens(greedy(tiny.model, **batch.inputs), batch)
        assert torch.equal(hooked, by_hand)

    def test_forward_logits_equal_hand_built_pruned_inputs(self, tiny):
        batch = batch_of(tiny, [0])
        length = batch.inputs["input_ids"].shape[1]
        removed = set(batch.spans[0][0].positions[list(PRUNED)].tolist())
        kept = torch.tensor([p for p in range(length) if p not in removed])
        embeds = layer0_inputs(tiny, batch)[:, kept]
        with torch.no_grad():
            by_hand = tiny.model(inputs_embeds=embeds, position_ids=kept[None], attention_mask=torch.ones(1, len(kept)))
            with intervene(tiny, [Prune(indices=PRUNED)]):
                hooked = tiny.model(**batch.inputs)
        torch.testing.assert_close(hooked.logits, by_hand.logits, rtol=0, atol=1e-6)


class TestSelection:
    """group / complement / matched_random choose the right tokens; random draws are reproducible."""

    def test_complement_keeps_only_the_target(self, tiny):
        batch = batch_of(tiny, [0])
        with intervene(tiny, [Prune(indices=PRUNED, select="complement")]) as run:
            _forward(tiny, batch)
        assert sorted(run.last.samples[0].pruned) == sorted(set(range(16)) - set(PRUNED))

    @pytest.mark.parametrize("target", [(0, 1, 2), tuple(range(12))])
    def test_matched_random_count_and_source(self, tiny, target):
        batch = batch_of(tiny, [0])
        with intervene(tiny, [Prune(indices=target, select="matched_random", seed=7)]) as run:
            _forward(tiny, batch)
        record = run.last.samples[0]
        complement = set(range(16)) - set(target)
        assert len(record.pruned) == min(len(target), len(complement))
        assert set(record.pruned) <= complement
        assert list(record.seeds) == [f"prune:[{','.join(map(str, target))}],select=matched_random,seed=7"]

    def test_matched_random_same_seed_same_draw(self, tiny):
        batch = batch_of(tiny, [0])
        draws = []
        for seed in (3, 3, 4):
            with intervene(tiny, [Prune(indices=(0, 1, 2, 3), select="matched_random", seed=seed)]) as run:
                _forward(tiny, batch)
            draws.append((run.last.samples[0].pruned, run.last.samples[0].seeds))
        assert draws[0] == draws[1]
        assert draws[0][1] != draws[2][1]

    def test_sample_ids_decide_the_seed(self, tiny):
        batch = batch_of(tiny, [0, 0])
        with intervene(tiny, [Prune(indices=(0, 1, 2, 3), select="matched_random")], sample_ids=[10, 11]) as run:
            _forward(tiny, batch)
        first, second = run.last.samples
        assert (first.sample_id, second.sample_id) == (10, 11)
        assert first.seeds != second.seeds

    def test_group_target_uses_the_rule(self, tiny, tiny_anchor_file):
        batch = batch_of(tiny, [0])
        labels = tiny.classify(random_image(0), "what is this", anchors=tiny_anchor_file).classification.group
        dead = [i for i, label in enumerate(labels) if label == "dead"]
        assert dead, "the tiny anchors should mark at least one dead token"
        with intervene(tiny, [Prune(group="dead")], anchors=tiny_anchor_file) as run:
            _forward(tiny, batch)
        assert run.last.samples[0].pruned == dead
        assert run.last.samples[0].groups["dead"] == len(dead)


class TestBatches:
    """Left-padded batches with different numbers of pruned tokens per sample give each sample's answer."""

    def test_ragged_batch_matches_single_samples(self, tiny, tiny_anchor_file):
        prompts = ["what is this", "is there a red thing in the picture"]
        seeds = [0, 5]
        prune = [Prune(group="dead+sink")]
        singles = []
        for seed, prompt in zip(seeds, prompts, strict=True):
            batch = batch_of(tiny, [seed], [prompt])
            with intervene(tiny, prune, anchors=tiny_anchor_file):
                singles.append(new_tokens(greedy(tiny.model, **batch.inputs), batch)[0])
        batch = batch_of(tiny, seeds, prompts)
        with intervene(tiny, prune, anchors=tiny_anchor_file) as run:
            together = new_tokens(greedy(tiny.model, **batch.inputs), batch)
        counts = [len(sample.pruned) for sample in run.last.samples]
        assert counts[0] != counts[1], "the test needs samples that lose different numbers of tokens"
        for row, single in enumerate(singles):
            assert torch.equal(together[row], single)


class TestHooksRemoved:
    """Hooks never outlive the context, even when the body raises."""

    def test_removed_after_exception(self, tiny):
        before = hook_count(tiny)
        with pytest.raises(RuntimeError), intervene(tiny, [Prune(indices=PRUNED)]):
            assert hook_count(tiny) > before
            raise RuntimeError("boom")
        assert hook_count(tiny) == before


class TestCheckedPlan:
    """A Plan checked once up front is used as it is by intervene and generate_batch, not checked again."""

    def test_intervene_uses_the_plan(self, tiny):
        from embedlens.interventions import plan

        checked = plan([Prune(indices=PRUNED)], tiny.num_layers)
        batch = batch_of(tiny, [0])
        with intervene(tiny, checked) as run:
            logits = _forward(tiny, batch).logits
        with intervene(tiny, [Prune(indices=PRUNED)]):
            again = _forward(tiny, batch).logits
        assert run.plan is checked
        assert run.interventions == [Prune(indices=PRUNED)]
        assert run.last.samples[0].pruned == list(PRUNED)
        assert torch.equal(logits, again)

    def test_generate_batch_uses_the_plan(self, tiny):
        from embedlens.interventions import plan
        from embedlens.interventions.generation import generate_batch

        checked = plan([Prune(indices=PRUNED)], tiny.num_layers)
        batch = batch_of(tiny, [0])
        answers, run = generate_batch(tiny, batch, max_new_tokens=3, interventions=checked)
        expected, _ = generate_batch(tiny, batch, max_new_tokens=3, interventions=[Prune(indices=PRUNED)])
        assert run.plan is checked and answers == expected

    def test_a_plan_for_another_model_is_refused(self, tiny):
        from embedlens.errors import InputError
        from embedlens.interventions import plan

        checked = plan([Prune(indices=PRUNED)], tiny.num_layers + 1)
        refused = pytest.raises(InputError, match="checked for a model with 5 decoder layers, not 4")
        with refused, intervene(tiny, checked):
            pass
