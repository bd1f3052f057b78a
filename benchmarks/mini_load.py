"""How long ``embedlens.load("embedlens-mini")`` takes: later loads from the cache, and the first build.

Run:  python benchmarks/mini_load.py --out docs/results/mini_load.md            (warm loads; about 1 minute)
      python benchmarks/mini_load.py --cold --out docs/results/mini_load.md     (also one first build in a
                                                                                  fresh cache: a few minutes)

Every figure is measured in fresh Python processes in this one run, as a new user's script would see it
(``HF_HUB_OFFLINE=1``, CPU). The baseline is a process that only imports torch and transformers' LLaVA
class, which any load of a LLaVA model pays before it reads a byte of weights; the ratio says what
EmbedLens adds on top. Targets of the mini-model issue: later loads <= 10 s, first build <= 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BASELINE = (
    "import time, json; t = time.perf_counter(); import torch; "
    "from transformers import LlavaForConditionalGeneration; "
    "print(json.dumps({'import': time.perf_counter() - t, 'load': 0.0}))"
)
LOAD = (
    "import time, json; t = time.perf_counter(); import embedlens; i = time.perf_counter() - t; "
    "s = embedlens.load('embedlens-mini', device='cpu'); "
    "print(json.dumps({'import': i, 'load': time.perf_counter() - t - i}))"
)


def child(code: str, cache: str | None = None, timeout: float = 900.0) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter and return its printed timings (seconds) and their total."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if cache is not None:
        env["EMBEDLENS_CACHE"] = cache
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"child process failed: {done.stderr.strip().splitlines()[-1:]}")
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    return {**timings, "total": timings["import"] + timings["load"]}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each timing over ``runs``."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="warm loads (each beside one baseline process)")
    parser.add_argument("--cold", action="store_true", help="also time one first build in a fresh cache")
    parser.add_argument("--out", type=Path, help="write the table here as markdown")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    from embedlens.files import atomic_write_text
    from embedlens.mini.assemble import ensure_mini

    ensure_mini()  # the warm rounds must not include a build
    baseline_runs, load_runs = [], []
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        baseline_runs.append(child(BASELINE))  # interleaved, so a slow spell hits both alike
        load_runs.append(child(LOAD))
    base, warm = summary(baseline_runs), summary(load_runs)
    rows = [
        ("baseline: import torch + transformers LLaVA", base, "", ""),
        ("embedlens-mini, later load (cache)", warm, f"{warm['total'] / base['total']:.2f}x", "<= 10 s"),
    ]
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="embedlens-cold-") as cache:
            print("first build in a fresh cache", file=sys.stderr)
            cold = child(LOAD, cache=cache)
        rows.append(("embedlens-mini, first build", cold, f"{cold['total'] / base['total']:.2f}x", "<= 180 s"))

    import torch

    from embedlens.dtypes import has_fast_bfloat16

    each = ", ".join(f"{run['total']:.2f}" for run in load_runs)
    lines = [
        "# embedlens-mini load time",
        "",
        f"`python benchmarks/mini_load.py --rounds {args.rounds}{' --cold' if args.cold else ''}`; medians over "
        f"{args.rounds} fresh processes (later-load totals, in order: {each} s); {cpu_name()}, {os.cpu_count()} "
        f"cores, bfloat16 units: {'yes' if has_fast_bfloat16(torch.device('cpu')) else 'no'}, "
        f"Python {platform.python_version()}.",
        "",
        "| process | import s | load s | total s | vs baseline | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, t, ratio, target in rows:
        lines.append(f"| {name} | {t['import']:.2f} | {t['load']:.2f} | {t['total']:.2f} | {ratio} | {target} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
