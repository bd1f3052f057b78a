"""Cache directories converted from one pinned package file, shared by the vision tower and the LLM.

Each of the two parts (:mod:`embedlens.mini.vision`, :mod:`embedlens.mini.llm`) turns its package file
into a ``transformers`` model saved under :func:`~embedlens.cache.cache_dir`, with the same manifest
provenance, and loads it back with the same ``from_pretrained`` options; both live here once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

from embedlens.cache import cache_dir, ensure_built
from embedlens.mini.packages import PackageFile, package_file


def ensure_converted(
    spec: PackageFile,
    name: str,
    *,
    required: Iterable[str],
    convert: Callable[[Path, Path], None],
    what: str,
    wheels_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return ``cache_dir()/name``, converting ``spec``'s file into it on first use or when damaged.

    Args:
        spec: The package file the directory is made from (its sha256 is the manifest's source).
        name: The directory's name under :func:`~embedlens.cache.cache_dir`.
        required: Files the directory must hold.
        convert: ``convert(source, staging)`` fills the empty ``staging`` directory from the local
            package file ``source``.
        what: Name used in log messages.
        wheels_dir: Optional directory of wheels, see :func:`~embedlens.mini.packages.package_file`.

    Raises:
        MiniBuildError: The package file cannot be obtained (or ``convert`` raises it).
    """
    return ensure_built(
        cache_dir() / name,
        source_sha256=spec.sha256,
        required=required,
        build=lambda staging: convert(package_file(spec, wheels_dir), staging),
        info=conversion_provenance(spec),
        what=what,
    )


def conversion_provenance(spec: PackageFile) -> dict[str, str]:
    """Manifest provenance of a directory converted from ``spec``: the package, the file and the versions
    of ``transformers`` and ``torch`` that converted it."""
    return {
        "source_package": spec.requirement,
        "source_file": spec.member,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def pretrained_kwargs(dtype: torch.dtype, attn_implementation: str | None) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained``: the dtype, and the attention implementation when given."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs
