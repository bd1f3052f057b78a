"""Group targets by label (after precedence) and by membership (the reference's rule), on planted anchors.

The reference code prunes or skips every token whose top-3 holds the group's anchor id, whatever else it
matches; EmbedLens' default reads the single label after precedence (vit_sink > llm_sink > dead). The two
differ exactly on tokens matching several groups, so the model here has two planted overlaps, and each
test checks which of them a target takes.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.interventions import Prune, Skip, intervene, parse
from helpers import random_image
from taxonomy_planting import OVERLAP_PATCH, PLANTED, PlantedProjector, plant, unit_rows

#: Patch 12 matches vit_sink and llm_sink (label vit_sink); patch 13 matches llm_sink and dead (label llm_sink).
LLM_DEAD_PATCH = 13
#: What each target must take, planted by construction.
BY_LABEL = {"vit_sink": [0, 12], "llm_sink": [5, 13], "dead": [9], "sink+dead": [0, 5, 9, 12, 13]}
BY_MEMBER = {"vit_sink": [0, 12], "llm_sink": [5, 12, 13], "dead": [9, 13], "sink+dead": [0, 5, 9, 12, 13]}


@pytest.fixture
def overlapping(fresh_tiny):
    """The tiny model with planted anchors and a second overlap (llm_sink + dead at patch 13)."""
    anchors, rows = plant(fresh_tiny)
    unit = unit_rows(fresh_tiny.adapter.input_embeddings.weight)
    llm, dead = anchors.groups["llm_sink"][0], anchors.groups["dead"][0]
    mixed = unit[llm] + unit[dead]
    rows = rows.clone()
    rows[LLM_DEAD_PATCH] = (mixed / mixed.norm()).float()
    fresh_tiny.model.model.multi_modal_projector = PlantedProjector(rows)
    return fresh_tiny, anchors


def _pruned(session, anchors, item, seed: int = 1) -> list[int]:
    batch = session.prepare([random_image(seed)], ["what is this"])
    with intervene(session, [item], anchors=anchors) as run, torch.no_grad():
        session.model(**batch.inputs)
    return sorted(run.last.samples[0].pruned)


def test_the_planted_overlaps(overlapping):
    """Precondition, through the real classifier: which patch matches which groups, and its label."""
    session, anchors = overlapping
    result = session.classify(random_image(1), anchors=anchors).classification
    assert result.group[OVERLAP_PATCH] == "vit_sink" and result.group[LLM_DEAD_PATCH] == "llm_sink"
    assert result.member("llm_sink")[[OVERLAP_PATCH, LLM_DEAD_PATCH]].all()
    assert result.member("dead")[LLM_DEAD_PATCH] and not result.member("dead")[OVERLAP_PATCH]
    for name, patch in PLANTED.items():
        assert result.group[patch] == name
    assert int(result.members.any(axis=1).sum()) == 5


class TestPrune:
    """Member targets include the overlapping tokens a lower-precedence group shares; label targets do not."""

    @pytest.mark.parametrize("group", sorted(BY_LABEL))
    def test_by_label_is_the_default(self, overlapping, group):
        session, anchors = overlapping
        assert _pruned(session, anchors, Prune(group=group)) == BY_LABEL[group]
        assert _pruned(session, anchors, Prune(group=group, match="label")) == BY_LABEL[group]

    @pytest.mark.parametrize("group", sorted(BY_MEMBER))
    def test_by_member(self, overlapping, group):
        session, anchors = overlapping
        assert _pruned(session, anchors, Prune(group=group, match="member")) == BY_MEMBER[group]

    def test_notation_reaches_the_engine(self, overlapping):
        session, anchors = overlapping
        assert _pruned(session, anchors, parse("prune:dead,match=member")) == [9, 13]
        assert _pruned(session, anchors, parse("prune:dead")) == [9]

    def test_alive_is_the_same_either_way(self, overlapping):
        session, anchors = overlapping
        alive = sorted(set(range(16)) - set(BY_MEMBER["sink+dead"]))
        assert _pruned(session, anchors, Prune(group="alive", match="member")) == alive
        assert _pruned(session, anchors, Prune(group="alive")) == alive

    def test_complement_of_members(self, overlapping):
        session, anchors = overlapping
        expected = sorted(set(range(16)) - set(BY_MEMBER["llm_sink"]))
        assert _pruned(session, anchors, Prune(group="llm_sink", select="complement", match="member")) == expected

    @pytest.mark.parametrize(("match", "table"), [("label", BY_LABEL), ("member", BY_MEMBER)])
    def test_matched_random_draws_as_many_as_the_chosen_target(self, overlapping, match, table):
        session, anchors = overlapping
        for seed in range(3):
            item = Prune(group="llm_sink", select="matched_random", seed=seed, match=match)
            drawn = _pruned(session, anchors, item)
            assert len(drawn) == len(table["llm_sink"])
            assert not set(drawn) & set(table["llm_sink"])

    def test_member_prune_runs_like_the_same_cells_by_index(self, overlapping):
        session, anchors = overlapping
        batch = session.prepare([random_image(1)], ["what is this"])
        logits = []
        for item in (Prune(group="llm_sink", match="member"), Prune(indices=tuple(BY_MEMBER["llm_sink"]))):
            with intervene(session, [item], anchors=anchors), torch.no_grad():
                logits.append(session.model(**batch.inputs).logits)
        torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)

    def test_record_names_the_match(self, overlapping):
        session, anchors = overlapping
        batch = session.prepare([random_image(1)], ["what is this"])
        item = Prune(group="dead", select="matched_random", seed=2, match="member")
        with intervene(session, [item], anchors=anchors) as run, torch.no_grad():
            session.model(**batch.inputs)
        assert list(run.last.samples[0].seeds) == ["prune:dead,select=matched_random,seed=2,match=member"]
        assert run.describe() == "prune:dead,select=matched_random,seed=2,match=member"


@pytest.mark.parametrize(("match", "table"), [("label", BY_LABEL), ("member", BY_MEMBER)])
@pytest.mark.parametrize("group", ["llm_sink", "dead"])
def test_skip_rows_follow_the_match(overlapping, match, table, group):
    """Skip zeroes the updates of exactly the tokens its target takes."""
    session, anchors = overlapping
    batch = session.prepare([random_image(1)], ["what is this"])
    item = Skip(group=group, sublayers=(1.5,), match=match)
    with intervene(session, [item], anchors=anchors) as run, torch.no_grad():
        session.model(**batch.inputs)
    assert run.last.samples[0].skipped == {"1.5": len(table[group])}
