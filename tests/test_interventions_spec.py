"""Intervention specs: the text notation, JSON round trips, input errors and checks against a model.

Pure Python: no model is loaded. These configs are what the CLI (``--intervene``), the evaluation
presets and the saved results agree on, so each test pins one part of that contract.
"""

from __future__ import annotations

import json

import pytest

from embedlens.errors import InputError
from embedlens.interventions import (
    Exit,
    Inject,
    Plan,
    Prune,
    Scale,
    Skip,
    describe,
    from_dict,
    parse,
    parse_all,
    plan,
    to_dict,
)
from embedlens.interventions.notation import parse_sublayers

NUM_LAYERS = 4


def _raises(fn, match: str) -> InputError:
    """Call ``fn``, expect one InputError whose message matches ``match`` and is a single line."""
    with pytest.raises(InputError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return info.value


class TestParseNotation:
    """The text notation is how users and presets name experiments; each form must mean exactly one config.

    Paper notation for sublayers: ``n`` is the attention of (zero-based) layer ``n`` and ``n.5`` its MLP.
    """

    def test_prune_group(self):
        assert parse("prune:dead") == Prune(group="dead")
        assert parse("prune:dead").positions == "keep"

    def test_prune_union_with_reindex(self):
        assert parse("prune:sink+dead,positions=reindex") == Prune(group="sink+dead", positions="reindex")

    def test_prune_matched_random_with_seed(self):
        assert parse("prune:dead,select=matched_random,seed=3") == Prune(group="dead", select="matched_random", seed=3)

    @pytest.mark.parametrize("alias", ["random", "matched"])
    def test_prune_random_aliases(self, alias):
        assert parse(f"prune:dead,select={alias},seed=3") == Prune(group="dead", select="matched_random", seed=3)

    def test_prune_complement(self):
        assert parse("prune:visual,select=complement").select == "complement"

    def test_prune_indices(self):
        item = parse("prune:[0,5,7]")
        assert item == Prune(indices=(0, 5, 7))
        assert item.group is None

    def test_skip_single_mlp(self):
        assert parse("skip:llm_sink@1.5") == Skip(group="llm_sink", sublayers=((1, "mlp"),))

    def test_skip_attention_is_the_whole_number(self):
        assert parse("skip:dead@2").sublayers == ((2, "attn"),)

    def test_skip_range_covers_every_sublayer(self):
        assert parse("skip:visual@0-1.5").sublayers == ((0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp"))

    def test_skip_list(self):
        assert parse("skip:dead@1.5,2").sublayers == ((1, "mlp"), (2, "attn"))

    def test_skip_indices(self):
        assert parse("skip:[3,4]@0.5") == Skip(indices=(3, 4), sublayers=((0, "mlp"),))

    def test_skip_sublayers_sorted_and_deduplicated(self):
        assert Skip(group="dead", sublayers=(2, 1.5, 2, (1, "mlp"))).sublayers == ((1, "mlp"), (2, "attn"))

    def test_inject(self):
        assert parse("inject@8") == Inject(8)
        assert parse("inject@8").scale == 1.0

    def test_inject_with_scale(self):
        assert parse("inject@8,scale=0.5") == Inject(8, scale=0.5)

    def test_exit(self):
        assert parse("exit@12") == Exit(12)

    def test_scale(self):
        assert parse("scale:0.01") == Scale(0.01)
        assert parse("scale:1e-3") == Scale(0.001)

    def test_surrounding_whitespace_ignored(self):
        assert parse("  prune:dead  ") == Prune(group="dead")

    def test_parse_all_keeps_order(self):
        assert parse_all(["exit@3", "prune:dead"]) == [Exit(3), Prune(group="dead")]

    def test_parse_sublayers_direct(self):
        assert parse_sublayers("0-1") == ((0, "attn"), (0, "mlp"), (1, "attn"))
        assert parse_sublayers("3.5") == ((3, "mlp"),)


VARIED = [
    Prune(group="dead"),
    Prune(group="sink+dead", positions="reindex"),
    Prune(group="dead", select="matched_random", seed=3),
    Prune(group="llm_sink", select="complement"),
    Prune(indices=(0, 5, 7)),
    Prune(indices=(1, 2), select="matched_random", seed=11, positions="reindex"),
    Skip(group="llm_sink", sublayers=((1, "mlp"),)),
    Skip(group="visual", sublayers=((0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp"))),
    Skip(indices=(4,), sublayers=((2, "attn"),)),
    Inject(8),
    Inject(8, scale=0.5),
    Inject(2, scale=0.1234567),
    Exit(12),
    Scale(0.01),
    Scale(1 / 3),
    Scale(-2.0),
]


class TestRoundTrips:
    """Interventions are stored in results and presets as text or JSON; reading them back must give the same config."""

    @pytest.mark.parametrize("item", VARIED, ids=describe)
    def test_text_round_trip(self, item):
        assert parse(describe(item)) == item

    @pytest.mark.parametrize("item", VARIED, ids=describe)
    def test_dict_round_trip(self, item):
        assert from_dict(to_dict(item)) == item

    @pytest.mark.parametrize("item", VARIED, ids=describe)
    def test_dict_survives_json(self, item):
        assert from_dict(json.loads(json.dumps(to_dict(item)))) == item

    def test_describe_is_short_for_plain_values(self):
        assert describe(Scale(0.01)) == "scale:0.01"
        assert describe(Inject(8, scale=0.5)) == "inject@8,scale=0.5"
        assert describe(Inject(8)) == "inject@8"
        assert describe(Prune(group="dead")) == "prune:dead"

    @pytest.mark.parametrize(
        ("where", "expected"),
        [
            ("0-14.5", "0-14.5"),
            ("1.5,2", "1.5,2"),
            ("0,0.5,1", "0-1"),
            ("0-1,3.5,5,5.5,6", "0-1,3.5,5-6"),
            ("2,4", "2,4"),
        ],
    )
    def test_describe_writes_runs_of_sublayers_as_ranges(self, where, expected):
        item = parse(f"skip:visual@{where}")
        assert describe(item) == f"skip:visual@{expected}"
        assert parse(describe(item)) == item

    def test_to_dict_list_survives_json_with_kinds(self):
        data = json.loads(json.dumps([to_dict(item) for item in VARIED]))
        assert [entry["kind"] for entry in data] == [item.kind for item in VARIED]
        assert [from_dict(entry) for entry in data] == VARIED


class TestBadInput:
    """A typo must stop the run with one clear line naming the problem, not a traceback or a silent no-op."""

    @pytest.mark.parametrize(
        ("spec", "match"),
        [
            ("foo:dead", "unknown intervention 'foo'"),
            ("prune:bogus", "unknown group 'bogus'"),
            ("prune:sink+bogus", "unknown group 'bogus'"),
            ("skip:dead@1.3", "malformed sublayer"),
            ("skip:dead@-1", "malformed sublayer"),
            ("skip:dead@2-1", "runs backwards"),
            ("skip:dead", "skip needs @sublayers"),
            ("inject", "inject needs exactly one @layer"),
            ("inject@3,4", "inject needs exactly one @layer"),
            ("inject@2-4", "inject needs exactly one @layer"),
            ("inject:dead@3", "inject needs exactly one @layer"),
            ("inject@2.5", "must be a whole number"),
            ("exit", "exit needs exactly one @layer"),
            ("exit@-1", "exit needs exactly one @layer"),
            ("prune:dead,colour=red", "unknown option.*colour"),
            ("exit@3,scale=0.5", "unknown option.*scale"),
            ("prune:dead,select=best", "select must be one of"),
            ("prune:dead,positions=shuffle", "positions must be one of"),
            ("prune:dead,seed=x", "'x' is not a number"),
            ("prune:dead,seed=inf", "must be a whole number"),
            ("prune:dead,seed=nan", "must be a whole number"),
            ("prune:dead@3", "prune takes no @layer"),
            ("prune", "exactly one of a group or explicit token indices"),
            ("prune:[-1]", "non-negative integers"),
            ("prune:[a,b]", "must be integers"),
            ("scale:dead", "'dead' is not a number"),
            ("scale", "scale needs a factor"),
            ("inject@8,scale=big", "'big' is not a number"),
            ("PRUNE:dead", "malformed intervention"),
            ("prune:dead,select=", "malformed intervention"),
            ("", "malformed intervention"),
        ],
    )
    def test_parse_errors(self, spec, match):
        _raises(lambda: parse(spec), match)

    def test_parse_all_stops_on_first_bad(self):
        _raises(lambda: parse_all(["prune:dead", "prune:bogus"]), "bogus")

    def test_prune_needs_exactly_one_target(self):
        _raises(lambda: Prune(), "exactly one of a group or explicit token indices")
        _raises(lambda: Prune(group="dead", indices=(1,)), "exactly one of a group or explicit token indices")

    @pytest.mark.parametrize("index", [-1, 1.5, True, "3"])
    def test_prune_bad_index(self, index):
        _raises(lambda: Prune(indices=(0, index)), "non-negative integers")

    def test_prune_bad_seed(self):
        _raises(lambda: Prune(group="dead", seed=1.5), "seed must be an integer")

    @pytest.mark.parametrize("sublayer", [1.3, -1, -0.5, "1.5", (1, "ffn"), (1.0, "mlp"), float("nan"), float("inf")])
    def test_skip_bad_sublayer(self, sublayer):
        _raises(lambda: Skip(group="dead", sublayers=(sublayer,)), "malformed sublayer")

    def test_skip_needs_a_sublayer(self):
        _raises(lambda: Skip(group="dead"), "at least one sublayer")

    def test_skip_needs_exactly_one_target(self):
        _raises(lambda: Skip(sublayers=(1,)), "exactly one of a group or explicit token indices")

    @pytest.mark.parametrize("layer", [1.5, "3", True])
    def test_bad_layers(self, layer):
        _raises(lambda: Inject(layer), "inject layer must be an integer")
        _raises(lambda: Exit(layer), "exit layer must be an integer")

    @pytest.mark.parametrize("value", ["0.5", None, True])
    def test_non_number_scales(self, value):
        _raises(lambda: Scale(value), "scale factor must be a number")
        _raises(lambda: Inject(3, scale=value), "inject scale must be a number")

    def test_parse_sublayers_empty(self):
        _raises(lambda: parse_sublayers(" , "), "no sublayers")

    @pytest.mark.parametrize(
        ("data", "match"),
        [
            ({"kind": "foo"}, "unknown intervention kind 'foo'"),
            ({"kind": ["prune"]}, "unknown intervention kind"),
            ({"group": "dead"}, "must be an object with a 'kind'"),
            ("prune:dead", "must be an object with a 'kind'"),
            ([{"kind": "prune"}], "must be an object with a 'kind'"),
            (None, "must be an object with a 'kind'"),
            ({"kind": "prune", "group": "dead", "colour": "red"}, "bad fields for a prune"),
            ({"kind": "inject"}, "bad fields for a inject"),
            ({"kind": "prune", "indices": 5}, "bad fields for a prune"),
            ({"kind": "skip", "group": "dead", "sublayers": 5}, "bad fields for a skip"),
            ({"kind": "skip", "group": "dead", "sublayers": [[1, "ffn"]]}, "malformed sublayer"),
            ({"kind": "prune", "group": "bogus"}, "unknown group"),
            ({"kind": "inject", "layer": "8"}, "must be an integer"),
            ({"kind": "scale", "factor": "big"}, "must be a number"),
        ],
    )
    def test_from_dict_errors(self, data, match):
        _raises(lambda: from_dict(data), match)


def _plan(*specs: str) -> Plan:
    return plan(parse_all(specs), NUM_LAYERS)


class TestPlan:
    """``plan`` is the last check before hooks touch a model: configs that cannot fit it, or contradict each other,
    must fail up front with one line instead of silently doing something else."""

    @pytest.mark.parametrize(
        ("items", "match"),
        [
            ([Inject(4)], "inject layer 4 is out of range.*0..3"),
            ([Inject(-1)], "inject layer -1 is out of range"),
            ([Exit(4)], "exit layer 4 is out of range.*0..3"),
            ([Exit(-1)], "exit layer -1 is out of range"),
            ([Skip(group="dead", sublayers=(4,))], "skip sublayer 4 is out of range.*0..3.5"),
            ([Skip(group="dead", sublayers=(4.5,))], "skip sublayer 4.5 is out of range"),
            ([Inject(1), Inject(2)], "conflicting interventions: 2 injects"),
            ([Exit(2), Exit(3)], "conflicting interventions: 2 exits"),
            ([Scale(0.5), Scale(2.0)], "conflicting interventions: 2 scales"),
            (
                [Prune(group="dead"), Prune(group="llm_sink", positions="reindex")],
                "prunes with different position policies",
            ),
            ([Inject(2), Exit(2)], "exit@2 is not above inject@2"),
            ([Inject(3), Exit(1)], "exit@1 is not above inject@3"),
            ([Inject(2), Skip(group="dead", sublayers=(1.5,))], "skip at 1.5 acts where the visual tokens are absent"),
            ([Exit(2), Skip(group="dead", sublayers=(2,))], "skip at 2 acts where the visual tokens are absent"),
            ([Exit(2), Skip(group="dead", sublayers=(3.5,))], "present in layers 0..1"),
            (["prune:dead"], "not an intervention"),
        ],
    )
    def test_rejected(self, items, match):
        _raises(lambda: plan(items, NUM_LAYERS), match)

    def test_same_position_policy_prunes_compose(self):
        result = _plan("prune:dead,positions=reindex", "prune:llm_sink,positions=reindex")
        assert len(result.prunes) == 2
        assert result.positions == "reindex"

    def test_default_positions_keep(self):
        assert _plan().positions == "keep"
        assert _plan("prune:dead", "prune:[1]").positions == "keep"

    def test_skip_within_the_visual_window(self):
        result = _plan("inject@1", "exit@3", "skip:dead@1-2.5")
        assert result.inject == 1 and result.exit == 3
        assert result.skips[0].sublayers == ((1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp"))

    def test_defaults(self):
        result = plan([], NUM_LAYERS)
        assert (result.inject, result.exit, result.scale, result.num_layers) == (0, NUM_LAYERS, 1.0, NUM_LAYERS)
        assert result.prunes == () and result.skips == ()

    def test_accepts_any_iterable(self):
        assert plan(iter([Exit(2)]), NUM_LAYERS).exit == 2

    @pytest.mark.parametrize("items", [[], [Inject(0)], [Scale(1.0)], [Inject(0, scale=1.0)]])
    def test_empty(self, items):
        assert plan(items, NUM_LAYERS).empty

    @pytest.mark.parametrize(
        "items",
        [
            [Prune(group="dead")],
            [Skip(group="dead", sublayers=(0,))],
            [Inject(1)],
            [Inject(0, scale=0.5)],
            [Exit(3)],
            [Exit(0)],
            [Scale(0.01)],
        ],
    )
    def test_not_empty(self, items):
        assert not plan(items, NUM_LAYERS).empty

    def test_scale_multiplies_scale_and_inject(self):
        assert _plan("scale:0.5", "inject@2,scale=0.25").scale == pytest.approx(0.125)
        assert _plan("inject@2,scale=0.25").scale == pytest.approx(0.25)
        assert _plan("scale:0.01").scale == pytest.approx(0.01)

    @pytest.mark.parametrize(
        ("items", "expected"),
        [
            ([], False),
            ([Prune(indices=(0, 1))], False),
            ([Skip(indices=(2,), sublayers=(1,))], False),
            ([Prune(group="visual")], False),
            ([Skip(group="visual", sublayers=(1,))], False),
            ([Inject(2), Exit(3), Scale(0.5)], False),
            ([Prune(group="dead")], True),
            ([Prune(group="visual+dead")], True),
            ([Prune(indices=(0,)), Skip(group="sink", sublayers=(0.5,))], True),
            ([Prune(group="alive", select="complement")], True),
        ],
    )
    def test_needs_groups(self, items, expected):
        assert plan(items, NUM_LAYERS).needs_groups is expected

    def test_visual_present(self):
        result = _plan("inject@1", "exit@3")
        assert [result.visual_present(layer) for layer in range(NUM_LAYERS)] == [False, True, True, False]

    def test_visual_present_untouched(self):
        result = plan([], NUM_LAYERS)
        assert all(result.visual_present(layer) for layer in range(NUM_LAYERS))
        assert not result.visual_present(NUM_LAYERS)


class TestMatch:
    """``match=member|label`` chooses how a group target reads the rule; the default must not change."""

    def test_default_is_label(self):
        assert parse("prune:dead").match == "label"
        assert parse("skip:llm_sink@1.5").match == "label"

    @pytest.mark.parametrize(
        ("spec", "item"),
        [
            ("prune:dead,match=member", Prune(group="dead", match="member")),
            ("prune:llm_sink,match=label", Prune(group="llm_sink")),
            ("skip:llm_sink@1.5,match=member", Skip(group="llm_sink", sublayers=((1, "mlp"),), match="member")),
            (
                "prune:sink+dead,select=matched_random,seed=2,match=member",
                Prune(group="sink+dead", select="matched_random", seed=2, match="member"),
            ),
        ],
    )
    def test_parse(self, spec, item):
        assert parse(spec) == item

    @pytest.mark.parametrize(
        "item",
        [
            Prune(group="dead", match="member"),
            Prune(group="llm_sink", select="complement", positions="reindex", match="member"),
            Skip(group="dead", sublayers=((0, "attn"), (0, "mlp"), (1, "attn")), match="member"),
        ],
        ids=describe,
    )
    def test_round_trips(self, item):
        assert parse(describe(item)) == item
        assert from_dict(json.loads(json.dumps(to_dict(item)))) == item
        assert to_dict(item)["match"] == "member"
        assert "match=member" in describe(item)

    def test_default_is_left_out_of_names_and_dicts(self):
        """Settings named and stored before ``match`` existed keep their names and dicts."""
        assert describe(Prune(group="dead", match="label")) == "prune:dead"
        assert to_dict(Prune(group="dead")) == {
            "kind": "prune",
            "group": "dead",
            "indices": None,
            "select": "group",
            "seed": 0,
            "positions": "keep",
        }
        assert "match" not in to_dict(Skip(group="dead", sublayers=(1,)))

    @pytest.mark.parametrize(
        ("spec", "match"),
        [
            ("prune:dead,match=best", "match must be one of label, member"),
            ("skip:dead@1,match=any", "match must be one of label, member"),
            ("prune:[0,1],match=member", "needs a group target"),
        ],
    )
    def test_errors(self, spec, match):
        _raises(lambda: parse(spec), match)


class TestFiniteNumbers:
    """Infinite or NaN factors would silently turn every visual embedding into inf / nan."""

    @pytest.mark.parametrize(
        "spec", ["scale:inf", "scale:nan", "scale:1e999", "scale:-1e999", "inject@2,scale=nan", "inject@2,scale=-inf"]
    )
    def test_notation(self, spec):
        _raises(lambda: parse(spec), "must be a finite number")

    @pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
    def test_objects_and_dicts(self, value):
        _raises(lambda: Scale(value), "scale factor must be a finite number")
        _raises(lambda: Inject(2, scale=value), "inject scale must be a finite number")
        _raises(lambda: from_dict({"kind": "scale", "factor": value}), "must be a finite number")

    @pytest.mark.parametrize("spec", ["prune:dead,seed=1.5", "prune:dead,seed=1e999"])
    def test_seed_is_reported_as_a_seed(self, spec):
        error = _raises(lambda: parse(spec), "prune seed .* must be a whole number \\(an integer\\)")
        assert "layer" not in str(error)


class TestCheckedOnce:
    """A Plan is the checked form of a setting; handing it on must not check (or change) it again."""

    def test_a_plan_is_returned_as_it_is(self):
        checked = _plan("prune:dead", "inject@1")
        assert plan(checked, NUM_LAYERS) is checked

    def test_a_plan_for_another_depth_is_refused(self):
        _raises(lambda: plan(_plan("exit@3"), NUM_LAYERS + 2), "checked for a model with 4 decoder layers, not 6")

    def test_keeps_the_items_in_order(self):
        items = parse_all(["exit@3", "prune:dead", "scale:0.5"])
        checked = plan(items, NUM_LAYERS)
        assert checked.items == tuple(items)
        assert checked.describe() == "exit@3 prune:dead scale:0.5"
        assert plan([], NUM_LAYERS).describe() == "none"

    def test_extended_checks_the_combination(self):
        checked = _plan("prune:dead,positions=reindex")
        longer = checked.extended(Prune(group="target", positions=checked.positions))
        assert [p.group for p in longer.prunes] == ["dead", "target"] and longer.needs_targets
        _raises(lambda: checked.extended(Prune(group="target")), "different position policies")
