"""Option types shared by the commands, checked by typer while it parses the command line.

A bad value stops the command before anything is loaded, with one line naming the option (for
example ``--top-k must be a positive integer, got 0``), exit code 2. The model options (``--model``,
``--device``, ``--dtype``, ``--revision``) are declared once here and reach a command as one
:class:`ModelArgs` through :func:`model_options`.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from embedlens.errors import InputError

if TYPE_CHECKING:
    from embedlens.session import Session

DEFAULT_MODEL = "embedlens-mini"

#: Where the ``--out`` value of the running command is kept (in ``typer.Context.meta``), so that a
#: file-system error without a file name can still name the directory it happened under.
OUT_META_KEY = "embedlens.out"


class OptionValueError(typer.BadParameter):
    """A bad option value; :func:`embedlens.cli.app.main` prints it as ``<option> <message>``."""


class Number:
    """Parser of an int or float option with a lower bound; NaN and infinities are refused.

    Args:
        kind: ``int`` or ``float``.
        low: The lower bound.
        inclusive: Whether ``low`` itself is allowed.
        wording: How the message names the allowed values, e.g. ``"a positive integer"``.
        high: An inclusive upper bound, if any.
    """

    def __init__(self, kind: type, low: float, *, inclusive: bool, wording: str, high: float | None = None) -> None:
        self.kind, self.low, self.inclusive, self.wording, self.high = kind, low, inclusive, wording, high

    def __call__(self, value: Any) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                raise OptionValueError(f"must be {self.wording}, got {value!r}") from None
        finite = not isinstance(number, float) or math.isfinite(number)
        above = self.high is not None and number > self.high
        if not finite or above or number < self.low or (number == self.low and not self.inclusive):
            raise OptionValueError(f"must be {self.wording}, got {value}")
        return number


POSITIVE_INT = Number(int, 0, inclusive=False, wording="a positive integer")
NON_NEGATIVE_INT = Number(int, 0, inclusive=True, wording="0 or a positive integer")
POSITIVE_FLOAT = Number(float, 0.0, inclusive=False, wording="a positive finite number")
FRACTION = Number(float, 0.0, inclusive=False, wording="a number in (0, 1]", high=1.0)


def remember_out(ctx: typer.Context, value: Path | None) -> Path | None:
    """Keep ``--out`` in the context (shared by the command's and the app's) for error messages."""
    if value is not None:
        ctx.meta[OUT_META_KEY] = value
    return value


def out_dir_option(help: str) -> Any:
    """``--out DIRECTORY``: an existing file is refused by typer's own path check (``file_okay=False``)."""
    return typer.Option("--out", file_okay=False, callback=remember_out, help=help)


def file_path(value: Any) -> Path:
    """Parser of ``--out FILE``: refuses an existing directory."""
    path = Path(value)
    if path.is_dir():
        raise OptionValueError(f"must be a file path, but {path} is a directory")
    return path


class LensName(str, Enum):
    """Lens choices on the command line."""

    embedding = "embedding"
    logit = "logit"


ImageArg = Annotated[Path | None, typer.Argument(help="Image file (default: the bundled example photo).")]
DatasetArg = Annotated[Path, typer.Argument(help='Folder of images, or JSONL of {"image": PATH, "prompt": TEXT}.')]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, directory or hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision of the model (hub ids only).")]
ProfileOpt = Annotated[
    str,
    typer.Option(
        help="default (the checkpoint's processor and chat template) or paper (the reference's LLaVA-1.5 "
        "settings: pad to square, vicuna_v1 prompt, base-vocabulary lens, membership targets, eager attention)."
    ),
]
RawPromptOpt = Annotated[
    str | None, typer.Option("--raw-prompt", help="Full model text used verbatim; must hold the image placeholder.")
]
PromptOpt = Annotated[str | None, typer.Option(help="Your question; the image is placed by the model's chat template.")]
DatasetPromptOpt = Annotated[str | None, typer.Option(help="Question for images without one in the dataset.")]
AnchorsOpt = Annotated[
    Path | None, typer.Option(help="Anchors JSON file (default: the model's built-in anchors, if any).")
]
RuleTopKOpt = Annotated[
    int | None,
    typer.Option(
        "--top-k", "-k", parser=POSITIVE_INT, help="Nearest ids the rule looks at (default: the anchors', 3)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
RestartOpt = Annotated[bool, typer.Option(help="Discard what --out holds and start over.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar on stderr.")]
ImageBatchOpt = Annotated[
    int, typer.Option(parser=POSITIVE_INT, help="Images per forward pass and per committed batch.")
]
QuestionBatchOpt = Annotated[
    int, typer.Option("--batch-size", parser=POSITIVE_INT, help="Questions per forward pass (left-padded).")
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", parser=POSITIVE_INT, help="Longest answer, in tokens.")
]
SuffixOpt = Annotated[
    str, typer.Option("--suffix", help="Text appended to every question (e.g. an answer-format hint).")
]
BootstrapOpt = Annotated[
    int, typer.Option("--bootstrap", parser=POSITIVE_INT, help="Bootstrap resamples of questions for the intervals.")
]


@dataclass(frozen=True)
class ModelArgs:
    """The model options of a command: what to load, where and how.

    Attributes:
        model: Built-in name, local directory or hub id.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        revision: Hub revision (hub ids only).
        profile: How the model is fed and read: ``default`` or ``paper`` (see :mod:`embedlens.profiles`).
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    profile: str = "default"

    def load(
        self,
        *,
        layer: int | None = None,
        raw_prompt: str | None = None,
        interventions: Sequence[Any] | None = None,
        settings: Sequence[Sequence[Any]] = (),
        device: str | None = None,
    ) -> Session:
        """Load the model quietly into a :class:`~embedlens.session.Session`.

        ``layer``, ``raw_prompt``, ``interventions`` (used together) and each of ``settings`` (lists of
        interventions used one at a time) are checked against the config before the weights load (see
        :func:`embedlens.models.loading.load_adapter`); ``device`` overrides :attr:`device`.
        """
        from embedlens.models import loading
        from embedlens.session import Session

        quiet_transformers()
        groups = [list(items) for items in ([interventions] if interventions else []) + list(settings) if items]
        check = functools.partial(_plan_each, groups) if groups else None
        adapter = loading.load_adapter(
            self.model,
            device=device or self.device,
            dtype=self.dtype,
            revision=self.revision,
            layer=layer,
            raw_prompt=raw_prompt,
            check_layers=check,
            profile=self.profile,
        )
        return Session(adapter)


def _plan_each(groups: list[list[Any]], num_layers: int) -> None:
    from embedlens.interventions import plan

    for items in groups:
        plan(items, num_layers)


_MODEL_PARAMETERS = (
    ("model", ModelOpt, DEFAULT_MODEL),
    ("device", DeviceOpt, "auto"),
    ("dtype", DtypeOpt, "auto"),
    ("revision", RevisionOpt, None),
    ("profile", ProfileOpt, "default"),
)


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: give a command ``--model``, ``--device``, ``--dtype`` and ``--revision``, handed to
    its ``models`` parameter as one :class:`ModelArgs` (typer reads the rewritten signature)."""
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=hints[p.name])
        for p in inspect.signature(func).parameters.values()
        if p.name != "models"
    ]
    required = [p for p in own if p.default is inspect.Parameter.empty]
    optional = [p for p in own if p.default is not inspect.Parameter.empty]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _MODEL_PARAMETERS
    ]
    parameters = [*required, added[0], *optional, *added[1:]]

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        models = ModelArgs(*(kwargs.pop(name) for name, _, _ in _MODEL_PARAMETERS))
        return func(models=models, **kwargs)

    command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    return command


def quiet_transformers() -> None:
    """Keep library chatter (warnings, loading bars) off stderr, which is reserved for our messages."""
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """Repeated and comma-separated values as one tuple: ``["a,b", "c"]`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def parse_layer_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"0,4,8"`` or ``"0-8"`` or ``"0-8:2"`` (every 2nd) -> layer numbers; None for None or ``"all"``."""
    if text is None or text.strip() == "all":
        return None
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            span, _, step = part.partition(":")
            low, dash, high = span.partition("-")
            first, last = int(low), int(high) if dash else int(low)
            stride = int(step) if step else 1
        except ValueError:
            raise InputError(f"{option} takes layers like 0,4,8 or 0-8 or 0-30:2, got {text!r}") from None
        if stride <= 0 or last < first or first < 0:
            raise InputError(f"{option}: bad layer range {part!r}")
        layers += range(first, last + 1, stride)
    if not layers:
        raise InputError(f"{option} names no layers")
    return tuple(sorted(set(layers)))
