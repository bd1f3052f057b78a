"""Plain helpers shared by several test modules (fixtures live in ``conftest.py``).

Import them as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.cli import main

#: ChatML-style conversation format, as a jinja chat template (a second, non-LLaVA template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    """A reproducible RGB noise image of ``width`` x ``height`` pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``embedlens`` in process with ``args`` (turned into strings): ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, fragment: str = "") -> None:
    """Exit code 2, nothing on stdout, exactly one line on stderr naming the problem (containing
    ``fragment``), no traceback."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("embedlens: error: "), err
    assert err.endswith("\n"), err
    assert fragment in err, err


def probe_args(model_dir: Path, image: Path, *extra: object) -> list[object]:
    """The command line of ``embedlens probe`` on ``image`` with the model in ``model_dir``, on the CPU."""
    return ["probe", image, "--model", model_dir, "--device", "cpu", *extra]


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_launched(rank: int, world: int, port: int) -> None:
    """Give this (spawned) process the environment ``accelerate launch`` / ``torchrun`` would give it."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")


def weightless_geometry(model_dir: Path) -> tuple[Any, Any]:
    """``make-patchbench``'s view of a saved model (config and processor only, the model on the meta
    device): its adapter and its :class:`~embedlens.bench.patchgeom.PatchGeometry`."""
    from embedlens.bench.patchgeom import PatchGeometry, processor_adapter
    from embedlens.models.registry import load_config, load_processor, resolve

    resolved = resolve(str(model_dir))
    weightless = processor_adapter(load_config(resolved), load_processor(resolved))
    return weightless, PatchGeometry.from_adapter(weightless)


def assert_pixel_changes_its_cell(adapter: Any, geometry: Any, cells: tuple[int, ...] = (0, 3, 5, 12, 15)) -> None:
    """One changed pixel at a cell's top-left or bottom-right corner (the cell's whole extent) changes
    exactly that cell, in every view of the picture."""
    from embedlens.bench.patchgeom import GREY, view_changes

    before = Image.new("RGB", (geometry.width, geometry.height), GREY)
    for cell in cells:
        left, top, right, bottom = geometry.cell_box(cell, margin=0)
        for x, y in ((left, top), (right - 1, bottom - 1)):
            after = before.copy()
            after.putpixel((x, y), (250, 10, 10))
            changes = view_changes(adapter, geometry, before, after)
            assert changes == [[cell]] * len(geometry.views), (cell, (x, y), changes)


def recorded_inputs(adapter: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One no-grad forward of the untouched model, read with pre-hooks that are always removed: the
    keyword arguments the language model receives, and per decoder layer its keyword arguments plus
    its input hidden states ``[B, L, d]`` under ``"hidden"``."""
    stack: dict[str, Any] = {}
    layers: list[dict[str, Any]] = [{} for _ in adapter.decoder_layers]

    def layer_hook(index: int) -> Any:
        def hook(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            layers[index].update(kwargs, hidden=(args[0] if args else kwargs["hidden_states"]).detach().clone())

        return hook

    with contextlib.ExitStack() as handles:
        llm = adapter.language_model.register_forward_pre_hook(lambda _m, _a, kw: stack.update(kw), with_kwargs=True)
        handles.enter_context(llm)
        for index, layer in enumerate(adapter.decoder_layers):
            handles.enter_context(layer.register_forward_pre_hook(layer_hook(index), with_kwargs=True))
        with torch.no_grad():
            adapter.model(**inputs)
    return stack, layers


def generate_forwards(model: Any, inputs: dict[str, Any], max_new_tokens: int = 2) -> list[dict[str, Any]]:
    """The keyword arguments of every forward of ``model`` while it greedily generates ``max_new_tokens``
    tokens from ``inputs`` (the first is the prefill), read with a pre-hook that is always removed."""
    calls: list[dict[str, Any]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    with hook, torch.no_grad():
        model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return calls
