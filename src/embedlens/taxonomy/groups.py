"""Every fact about the sink / dead / alive groups, in one place.

The paper's rule sorts visual tokens into three anchored groups (:data:`GROUPS`) and the rest
(:data:`ALIVE`). Everything that names, orders, abbreviates or paints a group reads it from here:

* :data:`GROUPS` — the anchored groups, in the default precedence order (vit_sink > llm_sink > dead);
* :data:`ALL_GROUPS` — those plus ``alive``, the order tables and pictures list them in;
* :data:`ALIASES` — names that stand for several groups (``sink`` = both sinks) in intervention targets;
* :data:`CODES` — one lower-case character per group, used to store a token's group compactly
  (``stats`` parts record an image's groups as a string of codes);
* :data:`LETTERS` — one character per group for the text map the CLI prints (``.`` for alive);
* :data:`COLOURS` — one fixed RGB colour per group (Okabe-Ito, distinguishable with the common
  colour-vision deficiencies); alive cells are never painted, white is its legend swatch;
* :data:`VISUAL_GROUPS` / :data:`TEXT_GROUPS` — the row groups of the alignment analysis and its plots.

This module imports nothing from the rest of the package, so every layer can use it.
"""

from __future__ import annotations

RGB = tuple[int, int, int]

#: The anchored groups, in the default precedence order (a token matching several gets the first).
GROUPS: tuple[str, ...] = ("vit_sink", "llm_sink", "dead")
#: Tokens that match no anchor.
ALIVE = "alive"
#: Every group, in the order tables and pictures list them.
ALL_GROUPS: tuple[str, ...] = (*GROUPS, ALIVE)
#: Names that stand for several anchored groups.
ALIASES: dict[str, tuple[str, ...]] = {"sink": ("vit_sink", "llm_sink")}
#: One character per group for compact storage (a string of codes per image).
CODES: dict[str, str] = {"vit_sink": "v", "llm_sink": "l", "dead": "d", ALIVE: "a"}
#: One character per group for the text map of a patch grid.
LETTERS: dict[str, str] = {"vit_sink": "S", "llm_sink": "L", "dead": "D", ALIVE: "."}
#: One fixed colour per group (Okabe-Ito).
COLOURS: dict[str, RGB] = {
    "vit_sink": (213, 94, 0),  # vermillion
    "llm_sink": (0, 114, 178),  # blue
    "dead": (0, 158, 115),  # bluish green
    ALIVE: (255, 255, 255),
}
#: Visual token groups of the alignment analysis, in table order; ``visual`` is every visual token.
VISUAL_GROUPS: tuple[str, ...] = ("visual", ALIVE, *GROUPS)
#: Rows of the alignment layer table that describe text (``prompt`` tokens and the text reference).
TEXT_GROUPS: tuple[str, ...] = ("text", "prompt")


def expand(name: str) -> tuple[str, ...]:
    """The groups a name stands for: an alias's members, or the name itself."""
    return ALIASES.get(name, (name,))


def group_of_code(code: str) -> str:
    """The group stored as ``code`` (inverse of :data:`CODES`); raises ``KeyError`` for an unknown code."""
    for name, value in CODES.items():
        if value == code:
            return name
    raise KeyError(code)
