"""EmbedLens: what do visual tokens really encode, and which of them does a multimodal LLM need?

Public API::

    import embedlens
    session = embedlens.load("llava-hf/llava-1.5-7b-hf")   # or a local directory, or "tiny-llava"
    result = session.probe("cat.jpg", prompt="What is this?", layer=0, top_k=10)
    result.to_pandas()
    labels = session.classify("cat.jpg")                   # sink / dead / alive (embedlens.taxonomy)
"""

from embedlens._version import __version__
from embedlens.errors import EmbedLensError, InputError, UnsupportedModelError
from embedlens.lens import EmbeddingLens, Lens, LensOutput, LogitLens
from embedlens.models import ModelAdapter, PreparedBatch, VisualSpan, load_adapter
from embedlens.nearest import ExactSearch, TopK
from embedlens.result import ProbeResult, Provenance
from embedlens.session import Session, load
from embedlens.taxonomy import Anchors, Classification, ClassifiedResult

__all__ = [
    "Anchors",
    "Classification",
    "ClassifiedResult",
    "EmbedLensError",
    "EmbeddingLens",
    "ExactSearch",
    "InputError",
    "Lens",
    "LensOutput",
    "LogitLens",
    "ModelAdapter",
    "PreparedBatch",
    "ProbeResult",
    "Provenance",
    "Session",
    "TopK",
    "UnsupportedModelError",
    "VisualSpan",
    "__version__",
    "load",
    "load_adapter",
]
