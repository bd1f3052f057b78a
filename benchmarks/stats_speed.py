"""Throughput and memory of ``embedlens stats`` against a bare forward over the same images.

Run:  python benchmarks/stats_speed.py                    (embedlens-mini, 100 images, about 2 minutes)
      python benchmarks/stats_speed.py --images 200 --memory 100 1000

All figures come from this one run on this machine. Over the same images, same batch size, each timed
from image files on disk to its output (images are decoded and preprocessed in every method):

  forward-full   the model's plain forward (every decoder layer, logits of the last position only)
  forward-l0     the forward that the rule needs: vision tower and projector, stopped at layer 0
  probe          that forward plus the exact embedding lens (top-k of every visual token, decoded), as
                 ``Session.probe_batch`` gives it: all the computation the rule needs
  stats          EmbedLens stats: the probe, the rule, per-batch Parquet and JSON commits, and the merge
                 into tokens.parquet / images.parquet / summary.json / heatmap.png

Three ratios are printed. Against forward-full, the plain forward a user would otherwise run over the
dataset (the issue's "bare forward"); against probe, what the stats machinery itself adds to the
computation it needs; against forward-l0, with the lens counted as overhead too.

Memory: stats runs in a fresh process on --memory sizes (default 100 and 1000 images) and reports the
peak resident memory (VmHWM) of each; flat means the difference stays small as the dataset grows.
Target (issue #4): stats overhead <= 10% over the bare forward; peak memory flat within 50 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import embedlens
from embedlens.capture import run_captured
from embedlens.datasets import open_dataset
from embedlens.taxonomy import Anchors
from embedlens.taxonomy.stats import StatsOptions, run_stats


def write_images(folder: Path, count: int) -> None:
    """``count`` generated scenes (224 px PNG files), deterministic."""
    from embedlens.synth.scenes import generate

    folder.mkdir(parents=True, exist_ok=True)
    for sample in generate(count, seed=7):
        sample.image.save(folder / f"{sample.index:05d}.png")


def benchmark_anchors(session: embedlens.Session, images: list[Path]) -> Anchors:
    """Stand-in anchors: the three most common top-1 ids over a few images (the work does not depend
    on which ids are anchors, only on the rule being applied)."""
    counts: dict[int, int] = {}
    for probe in session.probe_batch(images[:4], top_k=1):
        for token_id in probe.top_ids[:, 0].tolist():
            counts[token_id] = counts.get(token_id, 0) + 1
    common = sorted(counts, key=lambda i: -counts[i])[:3]
    groups = {name: [token_id] for name, token_id in zip(("vit_sink", "llm_sink", "dead"), common, strict=False)}
    return Anchors.for_tokenizer(groups, session.adapter.tokenizer, model=session.adapter.source)


def time_forward(session: embedlens.Session, images: list[Path], batch_size: int, *, full: bool) -> float:
    """Seconds for prepare + forward over ``images`` in batches (full model, or stopped at layer 0)."""
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        batch = session.prepare(images[first : first + batch_size])
        if full:
            with torch.inference_mode():
                session.model(**batch.inputs, use_cache=False, logits_to_keep=1)
        else:
            run_captured(session.adapter, batch.inputs, [0])
    return time.perf_counter() - start


def time_probe(session: embedlens.Session, images: list[Path], batch_size: int, top_k: int) -> float:
    """Seconds for the layer-0 embedding lens (``probe_batch``) over ``images`` in batches."""
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        session.probe_batch(images[first : first + batch_size], layer=0, top_k=top_k, lens="embedding")
    return time.perf_counter() - start


def time_stats(session, folder: Path, out: Path, anchors: Anchors, batch_size: int) -> float:
    dataset = open_dataset(folder)
    options = StatsOptions(batch_size=batch_size)
    start = time.perf_counter()
    run_stats(session, dataset, out, anchors=anchors, options=options, restart=True, progress=False)
    return time.perf_counter() - start


def peak_memory_child(model: str, folder: Path, anchors_file: Path, batch_size: int, out: Path) -> None:
    """Run in a fresh process: stats over ``folder``; print peak RSS (MiB) before and after as JSON."""
    session = embedlens.load(model)
    before = _status_mib("VmHWM")
    anchors = Anchors.load(anchors_file)
    dataset = open_dataset(folder)
    options = StatsOptions(batch_size=batch_size)
    run_stats(session, dataset, out, anchors=anchors, options=options, restart=True, progress=False)
    print(json.dumps({"loaded_peak": before, "peak": _status_mib("VmHWM"), "rss": _status_mib("VmRSS")}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedlens-mini")
    parser.add_argument("--images", type=int, default=100, help="images for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per method")
    parser.add_argument("--memory", type=int, nargs="*", default=[100, 1000], help="dataset sizes for memory")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "ANCHORS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, anchors_file, out = map(Path, args.child)
        peak_memory_child(args.model, folder, anchors_file, args.batch_size, out)
        return

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="embedlens-stats-bench-"))
    folder = work / f"images-{args.images}"
    write_images(folder, args.images)
    images = sorted(folder.glob("*.png"))
    session = embedlens.load(args.model)
    anchors = benchmark_anchors(session, images)
    anchors_file = anchors.save(work / "anchors.json")
    print(f"EmbedLens stats benchmark: {args.model}, {len(images)} generated 224 px images, batch {args.batch_size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; anchors (stand-in) {dict(anchors.groups)}")

    time_forward(session, images[: args.batch_size], args.batch_size, full=True)  # warm-up
    time_stats(session, folder, work / "warm", anchors, args.batch_size)
    top_k = anchors.top_k  # what stats uses when --top-k is not given
    timings = {"forward-full": [], "forward-l0": [], "probe": [], "stats": []}
    for _ in range(args.repeats):  # interleaved, so drifts of the shared machine hit every method
        timings["forward-full"].append(time_forward(session, images, args.batch_size, full=True))
        timings["forward-l0"].append(time_forward(session, images, args.batch_size, full=False))
        timings["probe"].append(time_probe(session, images, args.batch_size, top_k))
        timings["stats"].append(time_stats(session, folder, work / "out", anchors, args.batch_size))
    best = {name: min(values) for name, values in timings.items()}
    print()
    print(f"{'method':<14} {'time s':>8} {'images/s':>9}")
    for name, seconds in best.items():
        print(f"{name:<14} {seconds:>8.2f} {len(images) / seconds:>9.1f}")
    print()
    overhead_full = best["stats"] / best["forward-full"] - 1
    overhead_probe = best["stats"] / best["probe"] - 1
    overhead_l0 = best["stats"] / best["forward-l0"] - 1
    print(f"stats vs forward-full (the plain forward; issue #4's bare forward): {overhead_full:+.1%} (target <= +10%)")
    print(f"stats vs probe (its own computation: the machinery's overhead):    {overhead_probe:+.1%}")
    print(f"stats vs forward-l0 (counting the lens as overhead too):           {overhead_l0:+.1%}")
    lens_share = (best["probe"] - best["forward-l0"]) / best["forward-l0"]
    print(f"the exact lens alone adds {lens_share:+.1%} to forward-l0")

    if args.memory:
        print()
        print(f"{'images':>7} {'peak MiB':>9} {'model loaded MiB':>17} {'added MiB':>10}")
        peaks = {}
        for size in args.memory:
            sized = work / f"memory-{size}"
            write_images(sized, size)
            command = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size)]
            command += ["--child", str(sized), str(anchors_file), str(work / f"memory-out-{size}")]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            peaks[size] = figures["peak"]
            added = figures["peak"] - figures["loaded_peak"]
            print(f"{size:>7} {figures['peak']:>9.0f} {figures['loaded_peak']:>17.0f} {added:>10.0f}")
        sizes = sorted(peaks)
        growth = peaks[sizes[-1]] - peaks[sizes[0]]
        print(f"peak growth from {sizes[0]} to {sizes[-1]} images: {round(growth):+d} MiB (target: within 50 MB)")
    print(f"\nscratch files in {work}")


if __name__ == "__main__":
    main()
