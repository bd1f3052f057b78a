"""Prefill time under interventions against the FLOPs they save, measured in one run.

Run:  python benchmarks/intervention_speed.py                 (embedlens-mini, about 2 minutes on 2 cores)
      python benchmarks/intervention_speed.py --rounds 30 --out docs/results/intervention_speed.md

One image and prompt, batch size 1, the prefill that ``generate`` runs (whole prompt, KV cache, logits of
the last token). Settings:

  untouched        no hooks at all (the baseline every ratio is against)
  empty            ``intervene(session, [])``: every hook installed, nothing changed
  prune N%         N% of the grid tokens removed before layer 0 (a fixed random subset, positions kept)
  inject@k         layers below k run on text only, the visual tokens enter at layer k

Every setting is timed once per round, the settings interleaved, for ``--rounds`` rounds after a
warm-up; each figure is the median over rounds. Predicted speedup = untouched FLOPs / FLOPs under the
setting (``embedlens.bench.flops``: decoder layers, vision tower, projector, LM head).
Targets (issue #5): measured >= 0.8 x predicted at 40% pruned and for injection at the middle layer;
empty-intervention overhead <= 3%.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import embedlens
from embedlens.bench.accounting import account, prefill_once
from embedlens.examples import example_image
from embedlens.interventions import Inject, Intervention, Prune, intervene

PROMPT = "What is in the picture?"


def settings(session: embedlens.Session, fractions: list[float], layers: list[int]) -> dict[str, list]:
    """Name -> interventions (None = no hooks at all)."""
    cells = session.prepare([example_image()], [PROMPT]).spans[0][0].num_tokens
    order = torch.randperm(cells, generator=torch.Generator().manual_seed(0)).tolist()
    chosen: dict[str, list | None] = {"untouched": None, "empty": []}
    for fraction in fractions:
        count = round(fraction * cells)
        chosen[f"prune {round(fraction * 100)}%"] = [Prune(indices=tuple(sorted(order[:count])))]
    for layer in layers:
        chosen[f"inject@{layer}"] = [Inject(layer)]
    return chosen


def timed_prefill(session: embedlens.Session, batch, items: list[Intervention] | None) -> float:
    """Seconds of one prefill under ``items`` (hooks installed outside the timed region)."""
    if items is None:
        start = time.perf_counter()
        prefill_once(session, batch)
        return time.perf_counter() - start
    with intervene(session, items):
        start = time.perf_counter()
        prefill_once(session, batch)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedlens-mini")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="injection layers (default: 0, L/4, L/2, 3L/4)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)

    session = embedlens.load(args.model, device="cpu", dtype="float32")
    total = session.num_layers
    middle = total // 2
    layers = args.layers or sorted({0, total // 4, middle, (3 * total) // 4})
    batch = session.prepare([example_image()], [PROMPT])
    chosen = settings(session, args.fractions, layers)

    predicted = {
        name: 1.0 if items is None else account(session, batch, items).predicted_speedup
        for name, items in chosen.items()
    }
    tokens = {}
    for name, items in chosen.items():
        with intervene(session, items or []) as run:
            prefill_once(session, batch)
        tokens[name] = run.last.samples[0].tokens_per_layer

    for _ in range(args.warmup):
        for items in chosen.values():
            timed_prefill(session, batch, items)
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for round_index in range(args.rounds):
        for name, items in chosen.items():
            times[name].append(timed_prefill(session, batch, items))
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, end="\r")
    print(file=sys.stderr)

    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["untouched"]
    lines = [
        f"# Prefill speed under interventions ({args.model})",
        "",
        f"Command: `python benchmarks/intervention_speed.py --rounds {args.rounds}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32, batch 1, {batch.inputs['input_ids'].shape[1]} prompt "
        f"tokens ({batch.spans[0][0].num_tokens} visual), median of {args.rounds} interleaved rounds.",
        "",
        "| setting | tokens at layer 0 / last | prefill ms | measured speedup | predicted speedup "
        "| measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    for name in chosen:
        measured = base / median[name]
        ratio = measured / predicted[name]
        lines.append(
            f"| {name} | {tokens[name][0]} / {tokens[name][-1]} | {median[name] * 1000:.1f} | {measured:.3f}x "
            f"| {predicted[name]:.3f}x | {ratio:.2f} |"
        )
    overhead = median["empty"] / base - 1
    checks = []
    if "prune 40%" in median:
        ratio = (base / median["prune 40%"]) / predicted["prune 40%"]
        checks.append(
            f"40% pruned: measured / predicted = {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'missed'})"
        )
    if f"inject@{middle}" in median:
        name = f"inject@{middle}"
        ratio = (base / median[name]) / predicted[name]
        checks.append(
            f"injection at the middle layer ({middle}): measured / predicted = {ratio:.2f} "
            f"(target >= 0.80: {'met' if ratio >= 0.8 else 'missed'})"
        )
    checks.append(
        f"empty-intervention overhead: {overhead * 100:+.1f}% (target <= 3%: {'met' if overhead <= 0.03 else 'missed'})"
    )
    lines += ["", *[f"- {check}" for check in checks], ""]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as handle:
            handle.write(report)
        os.replace(handle.name, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
