"""Loading a family whose processor needs torchvision, on a machine without it: one line saying what to install.

The check runs in a fresh interpreter where torchvision cannot be found (``importlib.util.find_spec``
says so and importing it fails), as on a machine where it was never installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tiny_internvl
from helpers import assert_user_error, random_image

#: Hides torchvision from ``transformers``' availability checks and from ``import``.
HIDE_TORCHVISION = """
import importlib.util, sys
_find = importlib.util.find_spec
def _find_spec(name, package=None):
    if name == "torchvision" or name.startswith("torchvision."):
        return None
    return _find(name, package)
importlib.util.find_spec = _find_spec
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _Hide())
from embedlens.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_internvl.build(tmp_path_factory.mktemp("internvl") / "model")


def test_probe_without_torchvision_says_what_to_install(model_dir: Path, tmp_path: Path):
    image = tmp_path / "image.png"
    random_image(0, 112, 56).save(image)
    command = [sys.executable, "-c", HIDE_TORCHVISION, "probe", str(image), "--model", str(model_dir)]
    done = subprocess.run([*command, "--device", "cpu", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert_user_error(done.returncode, done.stdout, done.stderr, "needs torchvision")
    assert "pip install torchvision" in done.stderr
    assert not (tmp_path / "out").exists()
