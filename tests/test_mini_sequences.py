"""Loss weighting of the mini model's training sequences (pure tensor logic, no weights needed)."""

from __future__ import annotations

import torch

from embedlens.mini.sequences import IGNORE, answer_weights

X = IGNORE


def test_every_answer_counts_once() -> None:
    targets = torch.tensor(
        [
            [X, 5, 6, 7, 8, X, X, 9, X],  # a 4-token answer, then a 1-token answer
            [X, X, 4, 4, X, 3, X, X, X],  # a 2-token answer, then a 1-token answer
        ]
    )
    weights = answer_weights(targets)
    assert weights.shape == (int((targets != X).sum()),)
    quarter, whole, half = 1 / 4 / 4, 1 / 4, 1 / 2 / 4
    expected = torch.tensor([quarter] * 4 + [whole] + [half] * 2 + [whole])
    torch.testing.assert_close(weights, expected)
    assert abs(float(weights.sum()) - 1.0) < 1e-6


def test_answers_do_not_run_across_rows() -> None:
    targets = torch.tensor([[X, 1, 2], [3, 4, X]])  # row 0 ends labelled, row 1 starts labelled
    weights = answer_weights(targets)
    torch.testing.assert_close(weights, torch.full((4,), 0.25))


def test_no_labels_gives_no_weights() -> None:
    assert answer_weights(torch.full((2, 3), X)).numel() == 0
