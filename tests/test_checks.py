"""Option checks declared on dataclass fields (:mod:`embedlens.checks`), shared by the library and the CLI."""

from __future__ import annotations

import doctest
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedlens import checks
from embedlens.analysis.alignment import AlignOptions
from embedlens.analysis.sweep import SweepOptions
from embedlens.bench.runner import EvalOptions
from embedlens.checks import (
    CONFIDENCE,
    FINITE,
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    Choice,
    Each,
    check_fields,
    option,
)
from embedlens.cli.options import NumberParser, OptionValueError
from embedlens.errors import InputError
from embedlens.mini.config import TrainConfig
from embedlens.reproduce.plan import PlanOptions
from embedlens.taxonomy.evidence import DiscoveryConfig
from embedlens.taxonomy.stats import StatsOptions


def test_module_example_holds():
    assert doctest.testmod(checks).failed == 0


@pytest.mark.parametrize(
    ("bound", "good", "bad"),
    [
        (POSITIVE_INT, [1, 7], [0, -1, True, 1.0, "3", None]),
        (NON_NEGATIVE_INT, [0, 3], [-1, False, 0.5]),
        (POSITIVE_FLOAT, [1e-9, 2, 3.5], [0, -1.0, math.inf, math.nan, "1"]),
        (FINITE, [-5, 0, 2.5], [math.inf, -math.inf, math.nan, True]),
        (FRACTION, [1e-6, 0.5, 1], [0, 1.0001, math.nan]),
        (PROBABILITY, [0, 0.5, 1], [-0.1, 1.1]),
        (CONFIDENCE, [0.5, 0.95], [0, 1, 1.5]),
    ],
)
def test_bounds(bound, good, bad):
    for value in good:
        assert bound.problem(value) is None, value
    for value in bad:
        assert bound.problem(value) == f"must be {bound.wording}, got {value!r}", value


@pytest.mark.parametrize(
    ("bound", "text", "parsed"),
    [(POSITIVE_INT, " 12 ", 12), (NON_NEGATIVE_INT, "0", 0), (POSITIVE_FLOAT, "2e-4", 2e-4), (FRACTION, "1", 1.0)],
)
def test_command_line_text_is_parsed(bound, text, parsed):
    value = NumberParser(bound)(text)
    assert value == parsed and type(value) is bound.kind
    assert bound.problem(value) is None  # what the CLI accepts, the library accepts


@pytest.mark.parametrize(
    ("bound", "text", "message"),
    [
        (POSITIVE_INT, "0", "must be a positive integer, got 0"),
        (POSITIVE_INT, "2.5", "must be a positive integer, got '2.5'"),
        (POSITIVE_FLOAT, "inf", "must be a positive finite number, got inf"),
        (POSITIVE_FLOAT, "nan", "must be a positive finite number, got nan"),
        (FRACTION, "1.5", "must be a number in (0, 1], got 1.5"),
    ],
)
def test_command_line_text_is_refused(bound, text, message):
    with pytest.raises(OptionValueError) as caught:
        NumberParser(bound)(text)
    assert caught.value.message == message


def test_choice_and_each():
    assert Choice(("a", "b")).problem("b") is None
    assert Choice(("a", "b")).problem("c") == "must be one of a, b, got 'c'"
    assert Each(POSITIVE_INT).problem((1, 2)) is None
    assert Each(POSITIVE_INT).problem((1, 0, -1)) == "must be a positive integer, got 0"
    assert Each(POSITIVE_INT).problem("12") == "must be a sequence, got '12'"


@dataclass(frozen=True)
class _Options:
    count: int = option(2, POSITIVE_INT)
    limit: int | None = option(None, POSITIVE_INT)
    label: str = "free"

    def __post_init__(self) -> None:
        check_fields(self)


def test_check_fields_names_the_option_and_lets_none_through_where_it_is_the_default():
    assert _Options(limit=None).limit is None and _Options(limit=3).limit == 3
    with pytest.raises(InputError, match=r"^limit must be a positive integer, got 0$"):
        _Options(limit=0)
    with pytest.raises(InputError, match=r"^count must be a positive integer, got None$"):
        _Options(count=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StatsOptions(batch_size=0), "batch-size must be a positive integer, got 0"),
        (lambda: StatsOptions(confidence=1.0), "confidence must be between 0 and 1, got 1.0"),
        (lambda: StatsOptions(top_k=0), "top-k must be a positive integer, got 0"),
        (lambda: EvalOptions(max_new_tokens=-2), "max-new-tokens must be a positive integer, got -2"),
        (lambda: AlignOptions(lens_top_k=0), "lens-top-k must be a positive integer, got 0"),
        (lambda: AlignOptions(rule_top_k=-1), "rule-top-k must be a positive integer, got -1"),
        (lambda: SweepOptions(timing_items=-1), "timing-items must be 0 or a positive integer, got -1"),
        (lambda: SweepOptions(scales=(1.0, 0.0)), "scales must be a positive finite number, got 0.0"),
        (lambda: SweepOptions(layers=(0, -4)), "layers must be 0 or a positive integer, got -4"),
        (lambda: DiscoveryConfig(follower_overlap=1.5), "follower-overlap must be a number in (0, 1], got 1.5"),
        (lambda: DiscoveryConfig(cross_layer=1.5), "cross-layer must be an integer, got 1.5"),
        (lambda: TrainConfig(steps=0), "steps must be a positive integer, got 0"),
        (lambda: TrainConfig(caption_prob=1.5), "caption-prob must be a number in [0, 1], got 1.5"),
        (lambda: TrainConfig(strategy="cls"), "strategy must be one of default, full, got 'cls'"),
        (lambda: PlanOptions(model="m", out=Path("o"), num_processes=0), "num-processes must be a positive integer"),
        (lambda: PlanOptions(model="m", out=Path("o"), limit=0), "limit must be a positive integer, got 0"),
    ],
)
def test_option_dataclasses_refuse_bad_values_in_one_line(make, message):
    with pytest.raises(InputError) as caught:
        make()
    assert str(caught.value).startswith(message)


def test_defaults_pass_their_own_checks():
    for cls in (StatsOptions, EvalOptions, AlignOptions, SweepOptions, DiscoveryConfig, TrainConfig):
        cls()
    PlanOptions(model="m", out=Path("o"))
