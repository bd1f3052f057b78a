"""Shared fixtures: tiny random LLaVA models saved once per session and loaded by path, every model
family of ``families.py`` as a tiny checkpoint, test images, a tiny benchmark, and an EmbedLens cache that
lives in a temporary directory instead of the user's home; and how pytest-xdist is handed the tests.

Fixtures and hooks only: plain helpers that test modules import live in ``helpers.py``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

import embedlens
from embedlens.bench.patchbench import generate_benchmark
from embedlens.models.tiny import TinySpec, save_tiny_llava
from embedlens.taxonomy import Anchors
from families import FAMILIES, Loaded, load_family
from helpers import CHATML_TEMPLATE, random_image

#: Test files whose own fixtures manage ``EMBEDLENS_CACHE`` (they need the user's real cache).
_OWN_CACHE_FILES = {"test_mini_parts.py", "test_mini_model.py"}


# --------------------------------------------------------------------------- scheduling
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the tests on the real mini-model cache (``_OWN_CACHE_FILES``) first, keeping the order otherwise.

    ``make test`` runs pytest-xdist (``-n auto --dist worksteal``); those modules take turns (see
    :func:`_own_cache_turn`) and are the longest serial stretch, so they start at once and overlap the
    rest of the suite instead of trailing it.
    """
    items.sort(key=lambda item: item.path.name not in _OWN_CACHE_FILES)


# --------------------------------------------------------------------------- model families
@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """Each family of ``tests/families.py`` as a tiny checkpoint, built once per test module to a temporary
    directory and loaded by path on the CPU: a test that asks for it runs once per family (the
    conformance suites)."""
    return load_family(request.param, tmp_path_factory)


# --------------------------------------------------------------------------- cache isolation
@pytest.fixture(scope="session")
def embedlens_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary EmbedLens cache for the whole session (the built-in ``tiny-llava`` is built once)."""
    return tmp_path_factory.mktemp("embedlens-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export ``$EMBEDLENS_CACHE`` = the session's temporary cache around every test.

    Set per test through ``monkeypatch`` (restored after each test, so nothing leaks), never into
    ``~/.cache``. Files in ``_OWN_CACHE_FILES`` are left alone: they need the user's real cache and
    manage the variable themselves, and a session-wide ``os.environ`` change would reach them too.
    """
    if request.node.path.name in _OWN_CACHE_FILES:
        return
    monkeypatch.setenv("EMBEDLENS_CACHE", str(request.getfixturevalue("embedlens_cache")))


@pytest.fixture(scope="module", autouse=True)
def _own_cache_turn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under pytest-xdist, the modules of ``_OWN_CACHE_FILES`` take turns: each holds an exclusive lock
    (a file beside the workers' temporary directories) from its module fixtures' set-up to their
    tear-down, because they build, damage and rebuild the one real cache. A module that worksteal
    split over two workers waits on the second until the first is done with it. Without xdist: no lock.
    """
    if request.node.path.name not in _OWN_CACHE_FILES or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "real-cache.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- models
def _save(tmp_path_factory: pytest.TempPathFactory, name: str, spec: TinySpec, **kwargs) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp(name) / "model", spec, **kwargs)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default tiny LLaVA (4 x 4 grid, 4 decoder layers, LLaVA-1.5 chat template), saved to disk."""
    return _save(tmp_path_factory, "tiny", TinySpec())


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> embedlens.Session:
    """The default tiny model, loaded by path. Shared: tests must not modify its weights."""
    return embedlens.load(str(tiny_dir), device="cpu")


@pytest.fixture
def fresh_tiny(tiny_dir: Path) -> embedlens.Session:
    """A private copy of the default tiny model, for tests that plant weights."""
    return embedlens.load(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """Tiny LLaVA whose processor carries a ChatML-style chat template."""
    path = _save(tmp_path_factory, "chatml", TinySpec(), chat_template=CHATML_TEMPLATE)
    return embedlens.load(str(path), device="cpu")


@pytest.fixture(scope="session")
def no_template(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """Tiny LLaVA without any chat template."""
    return embedlens.load(str(_save(tmp_path_factory, "plain", TinySpec(), chat_template=None)), device="cpu")


@pytest.fixture(scope="session")
def grid6(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """Tiny LLaVA with 84 px images and 14 px patches: a 6 x 6 grid."""
    return embedlens.load(str(_save(tmp_path_factory, "grid6", TinySpec(image_size=84))), device="cpu")


@pytest.fixture(scope="session")
def with_cls(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
    """Tiny LLaVA whose projector also sees the CLS token ('full' feature selection): 1 + 16 visual tokens."""
    return embedlens.load(str(_save(tmp_path_factory, "cls", TinySpec(strategy="full"))), device="cpu")


# --------------------------------------------------------------------------- images
@pytest.fixture(scope="session")
def make_image() -> Callable[..., Image.Image]:
    """Factory: ``make_image(seed, width=56, height=56)`` -> reproducible RGB noise image."""
    return random_image


@pytest.fixture(scope="session")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 56 x 56 PNG on disk."""
    path = tmp_path_factory.mktemp("images") / "noise.png"
    random_image(0).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_anchor_file(tiny, image_path, tmp_path_factory) -> Path:
    """Anchors for the tiny vocabulary that hit some tokens: the top-1 ids of three patches."""
    probe = tiny.probe(image_path, top_k=3)
    top1 = list(dict.fromkeys(int(i) for i in probe.top_ids[:, 0]))
    assert len(top1) >= 3
    anchors = Anchors.for_tokenizer(
        {"vit_sink": [top1[0]], "llm_sink": [top1[1]], "dead": [top1[2]]}, tiny.adapter.tokenizer, model="tiny"
    )
    return anchors.save(tmp_path_factory.mktemp("anchors") / "tiny-anchors.json")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A dataset folder: four noise images ``0.png`` .. ``3.png`` and ``9.png``, which is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        random_image(i).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"broken")
    return folder


# --------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="session")
def bench_dir(tiny, tmp_path_factory) -> Path:
    """A patch-compression benchmark for the tiny model's own processor: 3 items per category.

    Shared by every test that evaluates on it: tests must not modify its files.
    """
    out = tmp_path_factory.mktemp("bench")
    generate_benchmark(out, tiny.adapter, per_category=3, progress=False)
    return out
