"""Write held-out generated questions as an evaluation JSONL (``embedlens eval`` / ``inject-sweep``).

Run:  python benchmarks/synth_vqa.py --out /tmp/synth-vqa --per-kind 40

The questions are the embedded mini model's held-out set (seed 1000, the seed of
``benchmarks/mini_quality.py``; the model was trained on seed 0): ``per-kind`` questions each about
colour, shape, count and letter, at most one per kind per image. Each line is
``{"image", "question", "answers", "type": "exact", "category": KIND}``. Same files on every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embedlens.files import atomic_write_text
from embedlens.mini.evaluate import KINDS, held_out_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    saved: dict[int, str] = {}
    for item in held_out_items(args.per_kind, args.seed, KINDS):
        key = id(item.sample)
        if key not in saved:
            saved[key] = f"images/{item.sample.scene}-{item.sample.index:05d}.png"
            item.sample.image.save(args.out / saved[key])
        row = {"image": saved[key], "question": item.qa.question, "answers": [item.qa.answer], "type": "exact"}
        lines.append(json.dumps({**row, "category": item.qa.kind}))
    atomic_write_text(args.out / "questions.jsonl", "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} questions about {len(saved)} images to {args.out / 'questions.jsonl'}")


if __name__ == "__main__":
    main()
