"""The lmms-eval model ``embedlens``: any EmbedLens model, answering lmms-eval tasks under interventions.

Registered through the ``lmms_eval.models`` entry point (see :mod:`embedlens.bench.lmms_plugin`), so
stock lmms-eval runs it with no fork::

    lmms-eval --model embedlens \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,interventions="prune:sink+dead" \\
        --tasks pope --output_path logs/

    accelerate launch --num_processes 8 -m lmms_eval --model embedlens \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,interventions="prune:dead,select=matched_random,seed=0" \\
        --tasks mme,gqa,textvqa_val --output_path logs/

``--model_args`` (comma-separated ``key=value``; quote a value that has commas of its own):

* ``pretrained``: a built-in name, local directory or hub id (default ``embedlens-mini``);
* ``interventions``: interventions in EmbedLens' text notation, separated by spaces or ``;``
  (``"prune:dead inject@8"``), or a JSON list of intervention dicts; empty for the baseline;
* ``anchors``: an anchors JSON for group targets (default: the model's built-in anchors);
* ``device`` (``auto``), ``dtype`` (``auto``), ``revision``, ``device_map``, ``trust_remote_code``;
* ``batch_size``: questions per forward pass, left-padded so samples do not influence each other;
* ``max_new_tokens``: a cap on the tasks' own ``max_new_tokens``;
* ``profile``: an EmbedLens profile (``default``, ``paper``; see :mod:`embedlens.profiles`): how images
  and prompts are fed, the attention implementation, and per-task generation settings (``paper``
  answers MME and MMStar with one token, as the reference does).

Under ``accelerate launch`` every process loads the model on its own device and lmms-eval gives it its
share of the documents. ``matched_random`` seeds derive from the document id, so an answer does not
depend on how documents are spread over processes or batches. Decoding is greedy (the paper's tasks
ask for temperature 0); a task asking for sampling is answered greedily, with a warning.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance

try:  # lmms-eval >= 0.7
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # pragma: no cover - older lmms-eval passes outputs through as they are
    GenerationResult = None
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from embedlens.bench.flops import sample_flops
from embedlens.bench.runner import parse_setting
from embedlens.errors import InputError
from embedlens.interventions import Intervention, describe, from_dict, intervene, plan
from embedlens.interventions.records import InterventionRun, SampleRecord
from embedlens.models.base import ModelAdapter
from embedlens.profiles import get_profile
from embedlens.session import load

#: Longest answer when a task names no ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 256


def parse_interventions(value: Any) -> tuple[Intervention, ...]:
    """Interventions from a ``--model_args`` value: the text notation or a JSON list; ``""`` for none.

    Surrounding quotes (which lmms-eval keeps) are dropped.
    """
    if value is None:
        return ()
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    if not text:
        return ()
    if text.startswith("[{") or text.startswith("[ {"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"interventions look like JSON but do not parse: {exc.msg}") from exc
        if not isinstance(data, list):
            raise InputError("interventions given as JSON must be a list of objects")
        return tuple(from_dict(item) for item in data)
    return parse_setting(text).interventions


def _visuals(doc_to_visual: Callable[[Any], Any], doc: Any) -> list[Image.Image]:
    """The document's images as RGB PIL images (lmms-eval gives a list, a single image or None)."""
    found = doc_to_visual(doc)
    if found is None:
        return []
    items = found if isinstance(found, (list, tuple)) else [found]
    images = []
    for item in items:
        if not isinstance(item, Image.Image):
            raise InputError(
                f"the embedlens model answers image tasks only; got a visual of type {type(item).__name__}"
            )
        images.append(item.convert("RGB"))
    return images


def _loglikelihood_output(pair: tuple[float, bool]) -> Any:
    """A ``(logprob, is_greedy)`` pair in the form lmms-eval's evaluator passes on unchanged.

    lmms-eval 0.7's evaluator turns every model output that is neither a ``str`` nor a
    ``GenerationResult`` into ``str(output)``, which breaks multiple-choice tasks for any model that
    returns plain pairs; a ``GenerationResult`` hands its payload to the task untouched.
    """
    return GenerationResult(text=pair) if GenerationResult is not None else pair  # type: ignore[arg-type]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


@dataclass(frozen=True)
class ContinuationScore:
    """A continuation scored after its context.

    Attributes:
        logprob: Sum of the continuation tokens' log-probabilities (natural log).
        tokens: Number of continuation tokens.
        greedy: Whether greedy decoding would produce exactly these tokens.
    """

    logprob: float
    tokens: int
    greedy: bool


@dataclass
class _Tally:
    """What the interventions did to each request so far (the prefill's record), for the summary line."""

    samples: list[SampleRecord] = field(default_factory=list)

    def add(self, run: InterventionRun) -> None:
        self.samples.extend(run.last.samples)

    def line(self, setting: str, adapter: ModelAdapter) -> str:
        """``embedlens [SETTING]: N requests; tokens at layer 0 ... of ...; prefill ... GFLOPs (...x the baseline)``."""
        n = max(len(self.samples), 1)
        length = sum(sample.length for sample in self.samples) / n
        layer0 = sum(sample.tokens_per_layer[0] for sample in self.samples) / n
        gflops = sum(sample_flops(adapter, sample).total for sample in self.samples) / 1e9
        baseline = sum(sample_flops(adapter, sample, baseline=True).total for sample in self.samples) / 1e9
        ratio = gflops / baseline if baseline else float("nan")
        return (
            f"embedlens [{setting}]: {len(self.samples)} requests; tokens at layer 0 {layer0:.1f} of {length:.1f}; "
            f"prefill {gflops / n:.3g} GFLOPs ({ratio:.2f}x the baseline)"
        )


class EmbedLensLMM(lmms):
    """An EmbedLens session answering lmms-eval requests with interventions applied.

    Args:
        pretrained: Built-in name, local directory or hub id.
        interventions: See :func:`parse_interventions`.
        anchors: Anchors JSON for group targets.
        batch_size: Questions per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...; under several processes, each process's own.
        dtype: ``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"``.
        revision: Hub revision.
        device_map: Passed to ``from_pretrained`` (e.g. ``"auto"`` to split one model over GPUs).
        trust_remote_code: Off by default.
        max_new_tokens: Cap on the tasks' ``max_new_tokens``.
        profile: EmbedLens profile name (default ``default``).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "embedlens-mini",
        interventions: Any = "",
        anchors: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int | None = None,
        max_batch_size: int | None = None,
        profile: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise InputError(
                f"unknown model_args for embedlens: {', '.join(sorted(unknown))}; known: pretrained, "
                "interventions, anchors, batch_size, device, dtype, revision, device_map, trust_remote_code, "
                "max_new_tokens, profile"
            )
        del max_batch_size  # lmms-eval passes it to every model; batches here have a fixed size
        try:
            self.batch_size_per_device = int(batch_size)
        except ValueError as exc:
            raise InputError(f"embedlens needs an integer batch_size, got {batch_size!r}") from exc
        if self.batch_size_per_device <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size!r}")
        if max_new_tokens is not None and int(max_new_tokens) <= 0:
            raise InputError(f"max_new_tokens must be positive, got {max_new_tokens!r}")
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else None
        self.profile = get_profile(str(profile).strip("'\"") if profile is not None else None)
        # On a machine without CUDA, processes started by torchrun talk over gloo (accelerate's MULTI_CPU).
        self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
        if self.accelerator.num_processes > 1 and device_map is None:
            device = str(self.accelerator.device)
        self.session = load(
            str(pretrained),
            device=device or "auto",
            dtype=dtype,
            revision=revision,
            trust_remote_code=bool(trust_remote_code),
            device_map=device_map,
            profile=self.profile,
        )
        self.interventions = parse_interventions(interventions)
        #: The interventions checked against the model once, before any task runs; every request applies it.
        self.plan = plan(self.interventions, self.session.num_layers)
        self.anchors = str(anchors) if anchors else None
        self.setting = " ".join(describe(item) for item in self.interventions) or "baseline"
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.tally = _Tally()
        self._warned_sampling = False

    # ------------------------------------------------------------------ what lmms-eval reads
    @property
    def device(self) -> torch.device:
        """Where this process's model runs (lmms-eval puts its gather tensors here)."""
        return self.session.adapter.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def tokenizer(self) -> Any:
        return self.session.adapter.tokenizer

    # ------------------------------------------------------------------ helpers
    def _prompt(self, context: str) -> str:
        """The task's text without image placeholders (EmbedLens places the images itself)."""
        placeholder = self.session.adapter.image_placeholder
        return re.sub(r"[ \t]*" + re.escape(placeholder) + r"[ \t]*\n?", "", context).strip()

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _report(self) -> None:
        if self._rank == 0:
            sys.stderr.write(self.tally.line(self.setting, self.session.adapter) + "\n")

    def _greedy_only(self, gen_kwargs: dict[str, Any]) -> None:
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
        if sampling and not self._warned_sampling:
            self._warned_sampling = True
            sys.stderr.write("embedlens: this task asks for sampling; answering greedily\n")

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, cut at the task's stop strings, in the order of ``requests``."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for number, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups[(task, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(number)
        bar = tqdm(total=len(requests), desc="embedlens", unit="answer", disable=self._rank != 0)
        for numbers in groups.values():
            # Longest prompts first, so a batch holds prompts of similar length (less padding).
            numbers.sort(key=lambda n: -len(requests[n].args[0]))
            for start in range(0, len(numbers), self.batch_size):
                chunk = numbers[start : start + self.batch_size]
                for number, text in zip(chunk, self._answer([requests[n] for n in chunk]), strict=True):
                    answers[number] = text
                bar.update(len(chunk))
        bar.close()
        self._report()
        return [a if a is not None else "" for a in answers]

    def _answer(self, chunk: Sequence[Instance]) -> list[str]:
        """Answer requests of one task with the same generation settings, in one batch."""
        gen_kwargs = dict(chunk[0].args[1])
        self._greedy_only(gen_kwargs)
        stops = gen_kwargs.get("until") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        limit = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        setting = self.profile.task_settings.get(chunk[0].args[4], {}).get("max_new_tokens")
        if setting is not None:
            limit = int(setting)
        if self.max_new_tokens is not None:
            limit = min(limit, self.max_new_tokens)
        images, prompts, ids = [], [], []
        for request in chunk:
            context, _, doc_to_visual, doc_id, task, split = request.args
            images.append(_visuals(doc_to_visual, self._doc(task, split, doc_id)))
            prompts.append(self._prompt(context))
            ids.append(int(doc_id))
        prepared = self.session.adapter.prepare(images, prompts)
        texts, run = self.session.generate_batch(
            prepared, max_new_tokens=limit, interventions=self.plan, anchors=self.anchors, sample_ids=ids
        )
        self.tally.add(run)
        return [cut_at_stops(text, stops).strip() for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Log-probability of each continuation after its context (and whether greedy decoding gives it).

        One ``(loss, is_greedy)`` pair per request, where ``loss`` is the mean negative log-likelihood
        per continuation token: lmms-eval's convention (its multiple-choice tasks pick the choice with
        the *smallest* value, as its Hugging Face models return the loss). Wrapped for lmms-eval's
        evaluator, see :func:`_loglikelihood_output`. The prompt is the model's chat format with the
        context as the user's turn and the continuation after the generation prompt.
        """
        results = []
        bar = tqdm(total=len(requests), desc="embedlens", unit="request", disable=self._rank != 0)
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            scored = self.score(self._prompt(context), str(continuation), _visuals(doc_to_visual, doc), doc_id)
            results.append(_loglikelihood_output((-scored.logprob / scored.tokens, scored.greedy)))
            bar.update(1)
        bar.close()
        self._report()
        return results

    def score(self, context: str, continuation: str, images: list[Image.Image], doc_id: int) -> ContinuationScore:
        """How likely the model finds ``continuation`` after ``context`` and ``images``, under the interventions.

        Args:
            context: The user's turn, without image placeholders.
            continuation: Text scored after the model's generation prompt.
            images: The document's images.
            doc_id: Seeds ``matched_random`` selections.
        """
        adapter = self.session.adapter
        prompt = adapter.format_prompt(context, num_images=len(images))
        full = prompt + continuation
        tokenizer = adapter.tokenizer
        count = len(tokenizer(full, add_special_tokens=False).input_ids)
        count -= len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if count <= 0:
            raise InputError(f"the continuation {continuation!r} adds no tokens to its context")
        prepared = adapter.prepare([images], [full], raw=True)
        with (
            intervene(self.session, self.plan, anchors=self.anchors, sample_ids=[int(doc_id)]) as run,
            torch.inference_mode(),
        ):
            logits = adapter.model(**prepared.inputs, use_cache=False).logits[0]
        self.tally.add(run)
        # The continuation is the end of the sequence whatever the interventions removed before it.
        wanted = prepared.inputs["input_ids"][0, -count:].to(logits.device)
        scores = torch.log_softmax(logits[-count - 1 : -1].float(), dim=-1)
        logprob = float(scores.gather(1, wanted[:, None]).sum())
        return ContinuationScore(logprob, count, bool((scores.argmax(dim=-1) == wanted).all()))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise InputError("the embedlens model does not answer multi-round tasks")
