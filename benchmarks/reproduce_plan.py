"""The `embedlens reproduce --dry-run` plan for llava-hf/llava-1.5-7b-hf, from its configuration alone.

The hub cannot be reached from every machine, so the configuration is written here with LLaVA-1.5-7B's
published sizes (CLIP ViT-L/14 at 336 px: 24 layers, width 1024; LLaMA-7B: 32 layers, hidden 4096, MLP
11008, 32 heads; a 32064-row vocabulary; 576 image tokens, feature layer -2, `default` selection) and
handed to the planner as the config of `llava-hf/llava-1.5-7b-hf`. No weights exist or are needed: the
model is built on the meta device to count FLOPs.

    python benchmarks/reproduce_plan.py [--images images] [--num-processes 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from embedlens.reproduce.costs import Shares, cost_model
from embedlens.reproduce.paper import llava15_7b_config
from embedlens.reproduce.plan import PlanOptions, build_plan, render

MODEL = "llava-hf/llava-1.5-7b-hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--images", type=Path, default=None, help="image folder of the stats stage (default: a temp one)"
    )
    parser.add_argument("--out", type=Path, default=Path("repro"), help="the run's output folder, as planned")
    parser.add_argument("--num-processes", type=int, default=8, help="GPUs per run")
    args = parser.parse_args()
    cost = cost_model(MODEL, config=llava15_7b_config())
    with tempfile.TemporaryDirectory() as empty:
        images = args.images or Path(empty)  # the plan only names the folder; the stats stage would read it
        options = PlanOptions(model=MODEL, out=args.out, images=images, num_processes=args.num_processes)
        shares = Shares.paper()
        print(render(build_plan(options, cost, shares), options, cost, shares))


if __name__ == "__main__":
    main()
