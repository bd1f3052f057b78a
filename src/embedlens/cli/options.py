"""Option types shared by the commands, checked by typer while it parses the command line.

A bad value stops the command before anything is loaded, with one line naming the option (for
example ``--top-k must be a positive integer, got 0``), exit code 2. The model options (``--model``,
``--device``, ``--dtype``, ``--revision``) are declared once here and reach a command as one
:class:`ModelArgs` through :func:`model_options`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from embedlens import checks
from embedlens.checks import CHECK_KEY, Bound
from embedlens.errors import InputError

if TYPE_CHECKING:
    from embedlens.bench.runner import EvalOptions
    from embedlens.session import Session

DEFAULT_MODEL = "embedlens-mini"

#: Where the ``--out`` value of the running command is kept (in ``typer.Context.meta``), so that a
#: file-system error without a file name can still name the directory it happened under.
OUT_META_KEY = "embedlens.out"


class OptionValueError(typer.BadParameter):
    """A bad option value; :func:`embedlens.cli.app.main` prints it as ``<option> <message>``."""


class NumberParser:
    """Parser of an int or float option: a :class:`~embedlens.checks.Bound` whose complaint becomes an
    :class:`OptionValueError` (the library checks the same field with the same bound)."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound

    def __call__(self, value: Any) -> Any:
        try:
            return self.bound.parse(value)
        except ValueError as exc:
            raise OptionValueError(str(exc)) from None


POSITIVE_INT = NumberParser(checks.POSITIVE_INT)
NON_NEGATIVE_INT = NumberParser(checks.NON_NEGATIVE_INT)
POSITIVE_FLOAT = NumberParser(checks.POSITIVE_FLOAT)
FRACTION = NumberParser(checks.FRACTION)


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
#: ``--report`` on the commands whose output folder the report reads.
ReportOpt = Annotated[
    bool, typer.Option("--report", help="Also write OUT/report.html: the interactive, offline HTML report.")
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


#: One bundled option: its parameter name, its ``Annotated`` type and its default.
OptionSpec = tuple[str, Any, Any]

_MODEL_PARAMETERS: tuple[OptionSpec, ...] = (
    ("model", ModelOpt, DEFAULT_MODEL),
    ("device", DeviceOpt, "auto"),
    ("dtype", DtypeOpt, "auto"),
    ("revision", RevisionOpt, None),
    ("profile", ProfileOpt, "default"),
)


def bundle_options(
    parameter: str, factory: Callable[..., Any], specs: Sequence[OptionSpec], *, model_order: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that gives a command the options ``specs``, handed to its ``parameter`` as one
    ``factory(**values)`` (typer reads the rewritten signature).

    The options take the place of ``parameter`` in the command's signature; with ``model_order`` the
    first comes right after the command's required parameters and the rest after its optional ones
    (the order of the model options).
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [
            inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=hints[p.name])
            for p in inspect.signature(func).parameters.values()
        ]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, annotation, default in specs
        ]
        at = [p.name for p in own].index(parameter)
        parameters = [*own[:at], *added, *own[at + 1 :]]
        if model_order:
            rest = own[:at] + own[at + 1 :]
            required = [p for p in rest if p.default is inspect.Parameter.empty]
            optional = [p for p in rest if p.default is not inspect.Parameter.empty]
            parameters = [*required, added[0], *optional, *added[1:]]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            bundled = factory(**{name: kwargs.pop(name) for name, _, _ in specs})
            return func(**{parameter: bundled}, **kwargs)

        command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return command

    return decorate


def field_options(cls: type, helps: Mapping[str, str]) -> tuple[OptionSpec, ...]:
    """Options for the fields of the dataclass ``cls`` named in ``helps`` (in its order), for
    :func:`bundle_options`: each takes its type, default and check from the field (declared with
    :func:`embedlens.checks.option`), so the command line and the library cannot disagree on them."""
    hints = typing.get_type_hints(cls)
    fields = {spec.name: spec for spec in dataclasses.fields(cls)}
    specs: list[OptionSpec] = []
    for name, text in helps.items():
        check = fields[name].metadata.get(CHECK_KEY)
        parser = NumberParser(check) if isinstance(check, Bound) else None
        specs.append((name, Annotated[hints[name], typer.Option(parser=parser, help=text)], fields[name].default))
    return tuple(specs)


#: Decorator: give a command ``--model``, ``--device``, ``--dtype``, ``--revision`` and ``--profile``,
#: handed to its ``models`` parameter as one :class:`ModelArgs`.
model_options = bundle_options("models", ModelArgs, _MODEL_PARAMETERS, model_order=True)


@dataclass(frozen=True)
class PromptArgs:
    """The prompt options of a one-image command: a question, or the model's full text (not both).

    Attributes:
        prompt: The user's question, placed with the image through the model's chat template.
        raw_prompt: The model's full text, used verbatim; it must hold the image placeholder.

    Raises:
        InputError: When both are given.
    """

    prompt: str | None = None
    raw_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and self.raw_prompt is not None:
            raise InputError("give either --prompt or --raw-prompt, not both")


#: Decorator: ``--prompt`` and ``--raw-prompt`` in place of a command's ``prompts`` parameter, as one
#: :class:`PromptArgs`.
prompt_options = bundle_options(
    "prompts", PromptArgs, (("prompt", PromptOpt, None), ("raw_prompt", RawPromptOpt, None))
)


@dataclass(frozen=True)
class RunArgs:
    """The options of a resumable run writing into ``--out``.

    Attributes:
        restart: Discard what ``--out`` holds and start over.
        progress: Show a progress bar on stderr.
        report: Also write ``OUT/report.html``.
    """

    restart: bool = False
    progress: bool = True
    report: bool = False

    def echo_report(self, out: Path) -> None:
        """With ``--report``, write ``out/report.html`` and say so on stdout."""
        if self.report:
            typer.echo(f"wrote {write_run_report(out)}")


#: Decorator: ``--restart``, ``--progress`` and ``--report`` in place of a command's ``runs`` parameter,
#: as one :class:`RunArgs`.
run_options = bundle_options(
    "runs", RunArgs, (("restart", RestartOpt, False), ("progress", ProgressOpt, True), ("report", ReportOpt, False))
)


@dataclass(frozen=True)
class EvalArgs:
    """The question-answering options of ``eval`` and ``inject-sweep``.

    Attributes:
        anchors: Anchors JSON file (None: the model's built-in anchors).
        batch_size: Questions per forward pass.
        max_new_tokens: Longest answer, in tokens.
        suffix: Text appended to every question; a literal ``\\n`` is a newline.
        bootstrap: Bootstrap resamples of questions for the intervals.
    """

    anchors: Path | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    suffix: str = ""
    bootstrap: int = 1000

    def options(self) -> EvalOptions:
        """The runner's :class:`~embedlens.bench.runner.EvalOptions`."""
        from embedlens.bench.runner import EvalOptions

        return EvalOptions(
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            suffix=self.suffix.replace("\\n", "\n"),
            anchors=str(self.anchors) if self.anchors is not None else None,
            bootstrap=self.bootstrap,
        )


#: Decorator: ``--anchors``, ``--batch-size``, ``--max-new-tokens``, ``--suffix`` and ``--bootstrap`` in
#: place of a command's ``evals`` parameter, as one :class:`EvalArgs`.
eval_options = bundle_options(
    "evals",
    EvalArgs,
    (
        ("anchors", AnchorsOpt, None),
        ("batch_size", QuestionBatchOpt, 8),
        ("max_new_tokens", MaxNewTokensOpt, 16),
        ("suffix", SuffixOpt, ""),
        ("bootstrap", BootstrapOpt, 1000),
    ),
)


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


def write_run_report(out: Path | None) -> Path:
    """Write ``out/report.html`` for the run in ``out``; the path written.

    Raises:
        InputError: When no output folder was given.
    """
    from embedlens.report import write_report

    if out is None:
        raise InputError("--report writes OUT/report.html: give --out")
    return write_report([out], out / "report.html").path
