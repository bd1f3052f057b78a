"""Quality of the embedded mini model: held-out exact match per question type, with the real image,
with a shuffled image (the fair blind baseline) and beside chance; plus what the embedding lens shows.

Run:  python benchmarks/mini_quality.py                      (embedlens-mini, 100 questions per type)
      python benchmarks/mini_quality.py --model DIR --out docs/results/mini_quality

All figures come from this one run. Targets (issue #3): colour >= 0.60, shape >= 0.60, count >= 0.80,
letter >= 0.30, and shuffled-image accuracy within 0.10 of chance for every type.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch

import embedlens
from embedlens.files import atomic_write_text
from embedlens.mini.evaluate import KINDS, evaluate, held_out_items
from embedlens.synth.draw import patches_covered

TARGETS = {"colour": 0.60, "shape": 0.60, "count": 0.80, "letter": 0.30}


def lens_report(session: embedlens.Session, items, top_k: int = 10) -> dict:
    """Embedding-lens facts on the held-out images: background vs object patches, norms."""
    tokenizer = session.adapter.tokenizer
    samples = list({id(item.sample): item.sample for item in items}.values())
    background_top1: collections.Counter = collections.Counter()
    background_images: dict[int, set] = collections.defaultdict(set)
    object_hits = collections.Counter()
    object_total = collections.Counter()
    examples = []
    visual_norms = []
    for sample in samples:
        result = session.probe(sample.image, prompt="Describe the image.", top_k=top_k)
        cols = result.grid[1]
        patch = sample.image.width // cols
        covered = set()
        for obj in sample.objects:
            covered |= set(patches_covered(obj["bbox"], patch))
        visual_norms.append(result.norm)
        for i in range(len(result)):
            cell = (int(result.row[i]), int(result.col[i]))
            if cell not in covered:
                background_top1[int(result.top_ids[i, 0])] += 1
                background_images[int(result.top_ids[i, 0])].add(sample.index)
        for obj in sample.objects:
            cells = patches_covered(obj["bbox"], patch)
            words = {w for w in (obj.get("colour"), obj.get("kind"), obj.get("text")) if w}
            for cell in cells:
                i = cell[0] * cols + cell[1]
                pieces = [p.replace("Ġ", "").lower() for p in result.top_tokens[i]]
                for word in words:
                    key = "colour" if word == obj.get("colour") else "kind/text"
                    object_total[key] += 1
                    object_hits[key] += word.lower() in pieces
            if len(examples) < 8 and cells:
                centre = cells[len(cells) // 2]
                i = centre[0] * cols + centre[1]
                examples.append(
                    {
                        "object": f"{obj.get('colour', '')} {obj.get('kind', '')} {obj.get('text', '') or ''}".strip(),
                        "patch": list(centre),
                        "top_tokens": result.top_tokens[i][:5],
                        "top_sims": [round(float(s), 3) for s in result.top_sims[i][:5]],
                    }
                )
    table = session.adapter.input_embeddings.weight.detach().float()
    text_norms = table.norm(dim=1)
    visual = np.concatenate(visual_norms)
    total_background = sum(background_top1.values())
    return {
        "images": len(samples),
        "background_patches": total_background,
        "background_distinct_top1": len(background_top1),
        "background_top1_most_common": [
            {
                "id": token_id,
                "token": tokenizer.convert_ids_to_tokens(token_id),
                "share": round(count / total_background, 4),
                "images": len(background_images[token_id]),
            }
            for token_id, count in background_top1.most_common(8)
        ],
        "object_patch_topk_contains_word": {
            key: round(object_hits[key] / object_total[key], 4) for key in ("colour", "kind/text") if object_total[key]
        },
        "object_examples": examples,
        "visual_norm": {
            "median": float(np.median(visual)),
            "p5": float(np.percentile(visual, 5)),
            "p95": float(np.percentile(visual, 95)),
        },
        "text_embedding_norm": {"median": float(text_norms.median()), "mean": float(text_norms.mean())},
        "norm_ratio_median": float(np.median(visual) / float(text_norms.median())),
    }


def markdown(report: dict) -> str:
    """The report as a markdown page."""
    acc = report["accuracy"]
    lines = [
        f"# embedlens-mini quality ({report['model']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Held-out generated set: seed {report['seed']}, {report['per_kind']} questions per type; greedy "
        "decoding; normalised exact match. Shuffled = the same questions asked about another image of the set.",
        "",
        "| type | real image | shuffled image | chance | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        row = acc[kind]
        met = row["real"] >= TARGETS[kind] and abs(row["shuffled"] - row["chance"]) <= 0.10
        lines.append(
            f"| {kind} | {row['real']:.2f} | {row['shuffled']:.2f} | {row['chance']:.3f} | "
            f">= {TARGETS[kind]:.2f}, shuffled within 0.10 of chance | {'yes' if met else 'no'} |"
        )
    lens = report["lens"]
    lines += [
        "",
        "## What the embedding lens shows (layer 0, top-10, held-out images)",
        "",
        f"- Background patches: {lens['background_patches']} over {lens['images']} images have "
        f"{lens['background_distinct_top1']} distinct top-1 ids. Most common:",
    ]
    for entry in lens["background_top1_most_common"]:
        lines.append(
            f"  - id {entry['id']} `{entry['token']}`: {entry['share']:.1%} of background patches, "
            f"in {entry['images']} images"
        )
    hits = lens["object_patch_topk_contains_word"]
    lines += [
        f"- Object patches whose top-10 neighbours contain the object's colour word: "
        f"{hits.get('colour', float('nan')):.1%}; its shape / letter / word: "
        f"{hits.get('kind/text', float('nan')):.1%}.",
        "- Examples (centre patch of an object, top-5 neighbours with cosine):",
    ]
    for ex in lens["object_examples"]:
        pairs = ", ".join(f"`{t}` {s}" for t, s in zip(ex["top_tokens"], ex["top_sims"], strict=True))
        lines.append(f"  - {ex['object']} at patch {tuple(ex['patch'])}: {pairs}")
    vn, tn = lens["visual_norm"], lens["text_embedding_norm"]
    lines += [
        f"- Norms: visual tokens median {vn['median']:.2f} (5-95%: {vn['p5']:.2f}-{vn['p95']:.2f}); text "
        f"embedding rows median {tn['median']:.2f}; ratio {lens['norm_ratio_median']:.1f}x.",
        "",
        f"Run time: {report['seconds']:.0f} s on {report['threads']} threads.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedlens-mini")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000, help="held-out seed (training uses 0)")
    parser.add_argument("--out", default="docs/results/mini_quality", help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    started = time.monotonic()
    session = embedlens.load(args.model, device="cpu")
    items = held_out_items(args.per_kind, args.seed)
    accuracy = evaluate(session, items, shuffle_seed=args.seed)
    report = {
        "model": args.model,
        "command": f"python benchmarks/mini_quality.py --model {args.model} --per-kind {args.per_kind} "
        f"--seed {args.seed}",
        "seed": args.seed,
        "per_kind": args.per_kind,
        "accuracy": accuracy,
        "targets": TARGETS,
        "lens": lens_report(session, items),
        "seconds": time.monotonic() - started,
        "threads": torch.get_num_threads(),
        "embedlens_version": embedlens.__version__,
    }
    text = markdown(report)
    print(text)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
