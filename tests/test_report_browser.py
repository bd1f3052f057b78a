"""The HTML report in a real headless Chromium: what a researcher sees when hovering, sliding, searching.

Driven over the Chrome DevTools Protocol (``embedlens.report.browser``); nothing is downloaded. These
tests run by default and FAIL with the install command when Chromium is missing: a report that was
never opened in a browser is not tested. Screenshots go to a temporary folder; the README's
``docs/report.png`` is made by ``python benchmarks/report_screenshot.py`` from the embedlens-mini demo.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from embedlens.report import save_view, write_report
from embedlens.report.browser import BrowserError, Chromium, find_chromium
from embedlens.taxonomy.groups import COLOURS


def bare(piece: str) -> str:
    """The page's token matching: word-start markers dropped, lower case."""
    return re.sub(r"^[\u2581\u0120 ]+", "", piece).lower()


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    try:
        find_chromium()
    except BrowserError as err:
        pytest.fail(f"the report's browser tests need Chromium: {err}")
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def outputs(tiny, image_path, tiny_anchor_file, tmp_path_factory) -> SimpleNamespace:
    """A multi-layer probe (both lenses), a single-layer probe and a classification of one image, and
    the report of the three (panels 0, 1 and 2)."""
    root = tmp_path_factory.mktemp("report")
    multi = tiny.probe(image_path, layers="all", lens=["embedding", "logit"], top_k=5)
    multi.save(root / "multi")
    single = tiny.probe(image_path, layer=2, top_k=4)
    single.save(root / "single")
    classified = tiny.classify(image_path, anchors=tiny_anchor_file)
    classified.save(root / "classify")
    save_view(classified.probe.view, root / "classify")
    html = root / "report.html"
    write_report([root / "classify", root / "multi", root / "single"], html)  # the page puts classify last
    return SimpleNamespace(multi=multi, single=single, classified=classified, html=html)


def open_report(browser: Chromium, html: Path) -> None:
    browser.open_report(html)


def hover_cell(browser: Chromium, panel: int, cell: int, grid: tuple[int, int]) -> None:
    browser.hover_cell(panel, cell, grid)


def tip(browser: Chromium, panel: int) -> dict:
    return browser.evaluate(
        f"""(() => {{ const t = document.querySelector('#panel-{panel} .tip');
        return {{head: t.querySelector('.tip-head')?.textContent || '', meta: t.querySelector('.tip-meta')?.textContent,
                tokens: [...t.querySelectorAll('.tok')].map(e => e.textContent),
                scores: [...t.querySelectorAll('td.score')].map(e => Number(e.textContent))}}; }})()"""
    )


def assert_tip_matches(shown: dict, result, cell: int) -> None:
    assert shown["tokens"] == list(result.top_tokens[cell])
    np.testing.assert_allclose(shown["scores"], result.top_sims[cell], atol=6e-5)
    row, col = int(result.row[cell]), int(result.col[cell])
    assert f"row {row}, col {col}" in shown["head"] and f"layer {result.layer} " in shown["head"]
    assert f"{result.lens} lens" in shown["head"]
    assert f"norm {float(result.norm[cell]):.4f}" in shown["meta"]


def canvas_pixel(browser: Chromium, panel: int, cell: int, grid: tuple[int, int]) -> list[int]:
    rows, cols = grid
    row, col = divmod(cell, cols)
    return browser.evaluate(
        f"""(() => {{ const c = document.querySelector('#panel-{panel} canvas');
        const x = Math.floor(({col} + 0.3) * c.width / {cols}), y = Math.floor(({row} + 0.3) * c.height / {rows});
        return [...c.getContext('2d').getImageData(x, y, 1, 1).data]; }})()"""
    )


class TestInspector:
    """Hovering a patch must show exactly the stored top-k of that patch, layer and lens."""

    def test_hover_lists_the_results_top_tokens(self, browser, outputs):
        open_report(browser, outputs.html)
        for cell in (0, 5, 15):
            hover_cell(browser, 0, cell, outputs.multi.grid)
            assert_tip_matches(tip(browser, 0), outputs.multi.get(0, "embedding"), cell)
        hover_cell(browser, 1, 9, outputs.single.grid)
        assert_tip_matches(tip(browser, 1), outputs.single, 9)

    def test_layer_slider_and_lens_switch(self, browser, outputs):
        open_report(browser, outputs.html)
        grid, last = outputs.multi.grid, outputs.multi.layers[-1]
        browser.evaluate("document.querySelector('#panel-0 input.layer').focus()")
        browser.press("End", 35)
        assert browser.evaluate("document.querySelector('#panel-0 .layer-value').textContent").startswith(
            f"layer {last} "
        )
        hover_cell(browser, 0, 6, grid)
        assert_tip_matches(tip(browser, 0), outputs.multi.get(last, "embedding"), 6)
        browser.evaluate("document.querySelector('#panel-0 input.layer').focus()")
        browser.press("Home", 36)
        browser.press("ArrowRight", 39)
        browser.press("ArrowRight", 39)
        browser.click_on("#panel-0 input.lens[value=logit]")
        hover_cell(browser, 0, 6, grid)
        shown = tip(browser, 0)
        assert_tip_matches(shown, outputs.multi.get(2, "logit"), 6)
        assert shown["tokens"] != list(outputs.multi.get(2, "embedding").top_tokens[6])
        assert browser.evaluate("document.querySelector('#panel-0 .tip th:last-child').textContent") == "logit"

    def test_click_pins_a_patch_and_a_token(self, browser, outputs):
        open_report(browser, outputs.html)
        grid, result = outputs.multi.grid, outputs.multi.get(0, "embedding")
        hover_cell(browser, 0, 5, grid)
        box = browser.rect("#panel-0 canvas")
        browser.click(box["x"] + 1.5 * box["width"] / grid[1], box["y"] + 1.5 * box["height"] / grid[0])
        hover_cell(browser, 0, 10, grid)
        shown = tip(browser, 0)
        assert "pinned" in shown["head"]
        assert shown["tokens"] == list(result.top_tokens[5])
        browser.click_on("#panel-0 .tip .tok")
        chips = browser.evaluate("[...document.querySelectorAll('#panel-0 .pins .chip')].map(e => e.textContent)")
        assert chips == [result.top_tokens[5][0]]
        assert browser.evaluate("document.querySelector('#panel-0 .search').value") == result.top_tokens[5][0]


class TestColouring:
    """The grid's colours follow the data: searched tokens, groups and norms."""

    def test_search_paints_exactly_the_patches_containing_the_token(self, browser, outputs):
        open_report(browser, outputs.html)
        result = outputs.multi.get(0, "embedding")
        target = bare(result.top_tokens[3][0])
        matching = {i for i, tokens in enumerate(result.top_tokens) if target in {bare(t) for t in tokens}}
        browser.click_on("#panel-0 .search")
        browser.type_text(target)
        assert browser.evaluate("document.querySelector('#panel-0 .match-count').textContent") == (
            f"{len(matching)} patches"
        )
        assert browser.evaluate("document.querySelector('#panel-0 select.mode').value") == "token"
        for cell in range(len(result)):
            red, green, blue, alpha = canvas_pixel(browser, 0, cell, result.grid)
            if cell in matching:
                assert (red, green, blue) == (255, 0, 200) and alpha > 60, cell
            else:
                assert (red, green, blue) == (0, 0, 0) and 100 < alpha < 130, cell

    def test_groups_paint_anchored_cells_and_leave_alive_cells_clear(self, browser, outputs):
        open_report(browser, outputs.html)
        groups = outputs.classified.group
        assert set(groups) - {"alive"}, "the fixture's anchors should hit some tokens"
        for panel in (0, 2):  # the multi-layer probe takes the classification's groups (same image)
            assert browser.evaluate(f"document.querySelector('#panel-{panel} select.mode').value") == "group"
            for cell, group in enumerate(groups):
                red, green, blue, alpha = canvas_pixel(browser, panel, cell, outputs.classified.probe.grid)
                if group == "alive":
                    assert alpha == 0, cell
                else:
                    assert max(abs(a - b) for a, b in zip((red, green, blue), COLOURS[group], strict=True)) <= 2

    def test_norm_colours_run_from_the_smallest_to_the_largest_norm(self, browser, outputs):
        open_report(browser, outputs.html)
        browser.evaluate(
            "(() => { const s = document.querySelector('#panel-0 select.mode'); s.value = 'norm';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        norms = outputs.multi.get(0, "embedding").norm
        low = canvas_pixel(browser, 0, int(np.argmin(norms)), outputs.multi.grid)
        high = canvas_pixel(browser, 0, int(np.argmax(norms)), outputs.multi.grid)
        assert max(abs(a - b) for a, b in zip(low[:3], (68, 1, 84), strict=True)) <= 2
        assert max(abs(a - b) for a, b in zip(high[:3], (253, 231, 37), strict=True)) <= 2


class TestOffline:
    """The page works from disk and asks nothing of the network; its console stays clean."""

    def test_only_the_file_and_data_uris_are_loaded_and_no_errors(self, browser, outputs, tmp_path):
        open_report(browser, outputs.html)
        hover_cell(browser, 0, 3, outputs.multi.grid)
        browser.click_on("#panel-0 .search")
        browser.type_text("x")
        browser.screenshot(tmp_path / "report.png")
        assert browser.requests, "the DevTools network log recorded nothing"
        others = [url[:80] for url in browser.requests if url != outputs.html.as_uri() and not url.startswith("data:")]
        assert others == []
        assert browser.errors == [] and browser.blocked == []
        assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert isinstance(browser.evaluate("window.__ready"), (int, float))

    def test_the_policy_blocks_a_request_the_page_might_try(self, browser, outputs):
        """Were a script to fetch anything, the Content-Security-Policy stops it (and it shows as an error)."""
        open_report(browser, outputs.html)
        browser.evaluate("(() => { const i = new Image(); i.src = 'http://127.0.0.1:9/x.png'; })()")
        browser.evaluate("new Promise(r => setTimeout(r, 200))")
        assert ("http://127.0.0.1:9/x.png", "csp") in browser.blocked
        assert not any(url.startswith("http") for url in browser.responses)
        assert any("Content Security Policy" in error for error in browser.errors), browser.errors
