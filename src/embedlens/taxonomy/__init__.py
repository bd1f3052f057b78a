"""Sink / dead / alive: the paper's anchor rule, anchors tied to a vocabulary, per-token diagnostics.

Typical use::

    import embedlens
    session = embedlens.load("llava-hf/llava-1.5-7b-hf")
    result = session.classify("photo.jpg")           # built-in anchors for LLaVA-1.5-7B
    result.counts                                    # {"vit_sink": .., "llm_sink": .., "dead": .., "alive": ..}
    frame = embedlens.taxonomy.diagnose(session, "photo.jpg", cross_layer=16, attention_layers=[15])
"""

from embedlens.taxonomy.anchors import (
    LLAVA15_7B_ANCHORS,
    Anchors,
    builtin_anchors,
    vocabulary_hash,
)
from embedlens.taxonomy.classify import classify_batch, resolve_anchors
from embedlens.taxonomy.diagnostics import (
    attention_implementation,
    cross_image_cosine,
    diagnose,
    eager_attention,
)
from embedlens.taxonomy.discover import (
    AnchorCandidate,
    Discovery,
    DiscoveryConfig,
    SkippedImage,
    discover_anchors,
)
from embedlens.taxonomy.groups import ALIVE, ALL_GROUPS, GROUPS
from embedlens.taxonomy.groups import COLOURS as GROUP_COLOURS
from embedlens.taxonomy.result import ClassifiedResult
from embedlens.taxonomy.rule import Classification, check_precedence, classify_ids

__all__ = [
    "ALIVE",
    "ALL_GROUPS",
    "GROUPS",
    "GROUP_COLOURS",
    "LLAVA15_7B_ANCHORS",
    "AnchorCandidate",
    "Anchors",
    "Classification",
    "ClassifiedResult",
    "Discovery",
    "DiscoveryConfig",
    "SkippedImage",
    "attention_implementation",
    "builtin_anchors",
    "check_precedence",
    "classify_batch",
    "classify_ids",
    "cross_image_cosine",
    "diagnose",
    "discover_anchors",
    "eager_attention",
    "resolve_anchors",
    "vocabulary_hash",
]
