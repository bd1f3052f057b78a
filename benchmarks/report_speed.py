"""Size and time-to-interactive of the HTML report, in headless Chromium.

Run:  python benchmarks/report_speed.py                  (the demo and the synthetic result; ~2 minutes on 2 cores)
      python benchmarks/report_speed.py --skip-demo      (the synthetic result only; seconds)

Two reports: the demo (``embedlens-mini`` on the bundled photo, every layer 0-30 with both lenses,
top-10, plus its classification) and a synthetic result with LLaVA-1.5-7B's shapes (576 tokens x 33
layers x top-10 x both lenses; :mod:`embedlens.report.synthetic`). For each it prints the file size,
the time ``write_report`` took, and the time to interactive: ``window.__ready``, set by the page's
script when every panel is drawn, in ms since navigation start (``performance.now()``), median of
``--loads`` fresh loads in one headless Chromium (flags in :mod:`embedlens.report.browser`). Targets:
under 10 MB and interactive within 1 s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from embedlens.report import write_report
from embedlens.report.browser import Chromium
from embedlens.report.synthetic import synthetic_probe


def measure(browser: Chromium, html: Path, loads: int) -> list[float]:
    """``window.__ready`` of ``loads`` fresh loads (ms since navigation start)."""
    times = []
    for _ in range(loads):
        browser.forget()
        browser.open(html)
        times.append(float(browser.wait_for("window.__ready")))
        if browser.errors:
            raise SystemExit(f"{html}: console errors {browser.errors}")
    return times


def demo(root: Path) -> list[Path]:
    """The demo's outputs: every layer of embedlens-mini on the bundled photo, and its classification."""
    import embedlens
    from embedlens.examples import example_image

    session = embedlens.load(device="cpu")
    start = time.perf_counter()
    probe = session.probe(example_image(), layers="all", lens=["embedding", "logit"], top_k=10)
    print(f"demo probe: {len(probe.layers)} layers x 2 lenses in one forward: {time.perf_counter() - start:.1f} s")
    probe.save(root / "demo-probe")
    session.classify(example_image()).save(root / "demo-classify")
    return [root / "demo-probe", root / "demo-classify"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=5, help="page loads per report (median reported)")
    parser.add_argument("--skip-demo", action="store_true", help="only the synthetic LLaVA-shaped result")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_probe(seed=0).save(root / "synthetic")
        cases = {"synthetic 576 tokens x 33 layers x top-10 x 2 lenses": [root / "synthetic"]}
        if not args.skip_demo:
            cases = {"demo: embedlens-mini, bundled photo, 31 layers x 2 lenses + classify": demo(root), **cases}
        with Chromium() as browser:
            for name, folders in cases.items():
                html = root / (folders[0].name + ".html")
                start = time.perf_counter()
                info = write_report(folders, html)
                written = time.perf_counter() - start
                ready = measure(browser, html, args.loads)
                print(
                    f"{name}: {info.bytes / 2**20:.2f} MiB, written in {written:.2f} s, interactive after "
                    f"{statistics.median(ready):.0f} ms (median of {len(ready)}; "
                    f"min {min(ready):.0f}, max {max(ready):.0f})"
                )


if __name__ == "__main__":
    main()
