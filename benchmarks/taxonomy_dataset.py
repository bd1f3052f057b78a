"""Write the image folder used for the taxonomy results: the packaged photos plus generated scenes.

Run:  python benchmarks/taxonomy_dataset.py --out /tmp/embedlens-taxonomy --generated 200

The photos come from the scikit-image / scikit-learn sample data (installed with ``embedlens[data]``),
fitted to 224 px squares; the scenes from :mod:`embedlens.synth` (seed 11, disjoint from the mini
model's training seed 0 and its held-out seed 1000). Same files on every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedlens.synth.photos import photo_samples
from embedlens.synth.scenes import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generated", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    (args.out / "photos").mkdir(parents=True, exist_ok=True)
    (args.out / "scenes").mkdir(parents=True, exist_ok=True)
    photos = photo_samples(224)
    for sample in photos:
        sample.image.save(args.out / "photos" / f"{sample.objects[0]['name']}.png")
    for sample in generate(args.generated, seed=args.seed):
        sample.image.save(args.out / "scenes" / f"{sample.scene}-{sample.index:05d}.png")
    print(f"wrote {len(photos)} photos and {args.generated} scenes under {args.out}")


if __name__ == "__main__":
    main()
