"""Make the README's screenshot of the report, docs/report.png, in headless Chromium.

The embedlens-mini demo on the bundled photo: every layer with both lenses, plus its classification;
the layer slider moved eight steps and one patch hovered, so the picture shows the inspector.

    python benchmarks/report_screenshot.py [--out docs/report.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import embedlens
from embedlens.examples import example_image
from embedlens.report import write_report
from embedlens.report.browser import Chromium

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DOCS_SCREENSHOT, help="where the PNG goes")
    args = parser.parse_args()
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as folder, Chromium() as browser:
        os.chdir(folder)  # the page shows the folders as given: short relative names
        session = embedlens.load(device="cpu")
        probe = session.probe(example_image(), layers="all", lens=["embedding", "logit"], top_k=10)
        probe.save("demo")
        session.classify(example_image()).save("demo-classify")
        html = Path(folder) / "report.html"
        write_report([Path("demo"), Path("demo-classify")], html)
        browser.open_report(html)
        browser.evaluate("document.querySelector('#panel-0 input.layer').focus()")
        for _ in range(8):
            browser.press("ArrowRight", 39)
        browser.hover_cell(0, 7 * 16 + 8, probe.grid)
        box = json.loads(browser.evaluate("JSON.stringify(document.querySelector('#sec-0').getBoundingClientRect())"))
        scroll = browser.evaluate("window.scrollY")
        margin = 12
        clip = (box["x"] - margin, box["y"] + scroll - margin, box["width"] + 2 * margin, box["height"] + 2 * margin)
        browser.screenshot(out, clip=clip)
        if browser.errors:
            raise SystemExit(f"the page logged errors: {browser.errors}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
