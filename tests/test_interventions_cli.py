"""``embedlens generate --intervene``: the answer, the accounting lines, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from embedlens.bench.accounting import account
from embedlens.interventions import Prune
from helpers import assert_user_error, run_cli

PROMPT = "what is this"
NEW_TOKENS = 4
GRID_TOKENS = 16


def generate_args(tiny_dir: Path, image: Path, *extra: object) -> list[object]:
    return [
        "generate",
        image,
        "--model",
        tiny_dir,
        "--device",
        "cpu",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        NEW_TOKENS,
        *extra,
    ]


def run_ok(capsys: pytest.CaptureFixture[str], *args: object) -> list[str]:
    """Run the CLI, insist on success and a clean stderr, return stdout's lines."""
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert err == ""
    assert out.endswith("\n")
    return out.splitlines()


@pytest.fixture(scope="module")
def prepared(tiny, image_path):
    """The batch ``generate`` builds for the test image and prompt."""
    return tiny.prepare([image_path], [PROMPT])


@pytest.fixture(scope="module")
def untouched_length(prepared) -> int:
    """Tokens in the untouched prompt (the tiny template, 16 visual tokens, the prompt words)."""
    return int(prepared.inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def plain_answer(tiny, prepared) -> str:
    """The untouched greedy answer, from the library."""
    answers, _ = tiny.generate_batch(prepared, max_new_tokens=NEW_TOKENS)
    return answers[0]


def line_starting(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, lines
    return found[0]


class TestPlainGenerate:
    """Scripts that only want the answer must keep getting exactly one line, with no accounting."""

    def test_output_is_exactly_the_answer(self, capsys, tiny_dir, image_path, plain_answer):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path))
        assert lines == [plain_answer]


class TestPruneAccounting:
    """The accounting lines are how a user sees what a prune did; their numbers must be the real ones."""

    def test_answer_then_accounting(self, capsys, tiny, tiny_dir, image_path, prepared, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:[0,1,2]"))
        expected_answer = tiny.generate_batch(
            prepared, max_new_tokens=NEW_TOKENS, interventions=[Prune(indices=(0, 1, 2))]
        )
        assert lines[0] == expected_answer[0][0]
        assert lines[1] == "interventions: prune:[0,1,2]"
        kept = untouched_length - 3
        assert lines[2] == f"tokens per layer: {kept} (layers 0-3) (untouched: {untouched_length})"
        assert lines[3] == f"pruned: 3 of {GRID_TOKENS} visual tokens"
        assert lines[4].startswith("prefill FLOPs: ")
        assert len(lines) == 5, lines

    def test_flops_line_matches_the_library(self, capsys, tiny, tiny_dir, image_path, prepared):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:[0,1,2]"))
        found = account(tiny, prepared, [Prune(indices=(0, 1, 2))])
        speedup = found.baseline.total / found.flops.total
        assert speedup > 1
        assert line_starting(lines, "prefill FLOPs: ") == (
            f"prefill FLOPs: {found.flops.total / 1e9:.2f} G (untouched {found.baseline.total / 1e9:.2f} G, "
            f"predicted speedup {speedup:.2f}x; vision {found.flops.vision / 1e9:.2f} G)"
        )

    def test_repeated_prunes_unite(self, capsys, tiny_dir, image_path, untouched_length):
        lines = run_ok(
            capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:[0,1]", "--intervene", "prune:[1,5]")
        )
        assert "interventions: prune:[0,1] prune:[1,5]" in lines
        assert f"tokens per layer: {untouched_length - 3} (layers 0-3) (untouched: {untouched_length})" in lines
        assert f"pruned: 3 of {GRID_TOKENS} visual tokens" in lines


class TestLayerRuns:
    """Inject changes the tokens part-way through; the per-layer line must show both runs of layers."""

    def test_inject_shows_two_runs(self, capsys, tiny_dir, image_path, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "inject@2"))
        text = untouched_length - GRID_TOKENS
        assert lines[1] == "interventions: inject@2"
        assert lines[2] == (
            f"tokens per layer: {text} (layers 0-1), {untouched_length} (layers 2-3) (untouched: {untouched_length})"
        )
        assert not any(line.startswith("pruned:") for line in lines)
        speedup = float(re.search(r"predicted speedup ([0-9.]+)x", line_starting(lines, "prefill FLOPs: "))[1])
        assert speedup > 1

    def test_exit_shows_two_runs(self, capsys, tiny_dir, image_path, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "exit@3"))
        text = untouched_length - GRID_TOKENS
        assert lines[2] == (
            f"tokens per layer: {untouched_length} (layers 0-2), {text} (layer 3) (untouched: {untouched_length})"
        )

    def test_skip_lists_skipped_updates_and_the_note(self, capsys, tiny_dir, image_path, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "skip:[0,1]@1,1.5"))
        assert f"tokens per layer: {untouched_length} (layers 0-3) (untouched: {untouched_length})" in lines
        assert "skipped updates: 2 tokens at 1, 2 tokens at 1.5" in lines
        assert any(line.startswith("note: skipped updates are computed and then zeroed") for line in lines)


class TestGroupTargets:
    """Group targets are the paper's experiments; with an anchors file they must hit the rule's tokens."""

    def test_prune_dead_with_anchors(self, capsys, tiny, tiny_dir, image_path, tiny_anchor_file, untouched_length):
        dead = int((tiny.classify(image_path, prompt=PROMPT, anchors=tiny_anchor_file).group == "dead").sum())
        assert dead >= 1
        lines = run_ok(
            capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:dead", "--anchors", tiny_anchor_file)
        )
        assert lines[1] == "interventions: prune:dead"
        assert lines[2] == (f"tokens per layer: {untouched_length - dead} (layers 0-3) (untouched: {untouched_length})")
        assert lines[3] == f"pruned: {dead} of {GRID_TOKENS} visual tokens"

    def test_matched_random_prints_its_seed(self, capsys, tiny_dir, image_path, tiny_anchor_file):
        spec = "prune:dead,select=matched_random,seed=3"
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", spec, "--anchors", tiny_anchor_file))
        assert re.fullmatch(rf"seed of {re.escape(spec)}: -?\d+", line_starting(lines, "seed of ")), lines


class TestTiming:
    """--timing adds measured latency beside the FLOPs (the numbers vary, the line's shape must not)."""

    def test_prints_prefill_time(self, capsys, tiny_dir, image_path, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:[0,1,2]", "--timing"))
        assert f"pruned: 3 of {GRID_TOKENS} visual tokens" in lines
        assert lines[-2].startswith("prefill FLOPs: ")
        assert re.fullmatch(
            r"prefill time: \d+\.\d{3} s \(untouched \d+\.\d{3} s, measured speedup \d+\.\d{2}x\)", lines[-1]
        ), lines

    def test_timing_without_interventions(self, capsys, tiny_dir, image_path, plain_answer, untouched_length):
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--timing"))
        assert lines[0] == plain_answer
        assert lines[1] == "interventions: none"
        assert lines[2] == f"tokens per layer: {untouched_length} (layers 0-3) (untouched: {untouched_length})"
        assert "predicted speedup 1.00x" in lines[3]
        assert lines[4].startswith("prefill time: ")
        assert len(lines) == 5, lines


class TestBadInterventions:
    """A mistyped intervention must end with one line naming the problem and exit 2, never a traceback."""

    @pytest.mark.parametrize(
        ("specs", "fragment"),
        [
            (["prune:bogus"], "unknown group 'bogus'"),
            (["inject@4"], "inject layer 4 is out of range for this model: use 0..3"),
            (["exit@9"], "exit layer 9 is out of range for this model: use 0..3"),
            (["skip:dead@7"], "skip sublayer 7 is out of range for this model: use 0..3.5"),
            (["skip:dead@1.3"], "malformed sublayer 1.3"),
            (["prune:[0]", "prune:[1],positions=reindex"], "prunes with different position policies"),
            (["foo:dead"], "unknown intervention 'foo'"),
            (["inject@1", "inject@2"], "conflicting interventions: 2 injects"),
        ],
    )
    def test_one_line_exit_2(self, capsys, tiny_dir, image_path, specs, fragment):
        extra = [part for spec in specs for part in ("--intervene", spec)]
        assert_user_error(*run_cli(capsys, *generate_args(tiny_dir, image_path, *extra)), fragment)

    def test_group_target_without_anchors(self, capsys, tiny_dir, image_path):
        code, out, err = run_cli(capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:dead"))
        assert_user_error(code, out, err, f"no built-in anchors for model {tiny_dir}")

    def test_indices_need_no_anchors(self, capsys, tiny_dir, image_path):
        """Explicit indices and the ``visual`` group never consult the rule, so no anchors are needed."""
        lines = run_ok(capsys, *generate_args(tiny_dir, image_path, "--intervene", "prune:visual"))
        assert f"pruned: {GRID_TOKENS} of {GRID_TOKENS} visual tokens" in lines
