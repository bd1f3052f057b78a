"""``embedlens train-mini``: train the mini model's projector (LLaVA stage-1 style) on generated data.

Recipe: frozen vision tower (its features are computed once and cached), frozen LLM (a bfloat16 copy
where the CPU has bfloat16 matrix units, else float32: see :mod:`embedlens.dtypes`),
trainable 2-layer MLP projector (float32 master weights), next-token loss on answer tokens only,
several question/answer turns about one image packed into one sequence, AdamW with linear warm-up and
cosine decay. Everything is seeded; the same seed and step count give the same weights on the same
machine. Progress is checkpointed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from embedlens.capture import capture
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.mini.assemble import STRATEGY_KEY
from embedlens.mini.config import TrainConfig, llm_compute_dtype
from embedlens.mini.lora import load_lora_tensors, lora_attached, lora_tensors, save_lora
from embedlens.mini.sequences import IGNORE, Encoded, SequenceBuilder, Turn, answer_weights, collate

logger = logging.getLogger(__name__)

CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?", "Write a short caption.")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def extract_features(model: Any, processor: Any, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """Vision features exactly as the model feeds its projector, shape ``[N, tokens, d_vision]`` (bf16).

    Runs the model's own ``get_image_features`` and reads the projector's input with a hook, so the
    layer choice and CLS handling are the library's.
    """
    from embedlens.models.llava import LlavaAdapter

    adapter = LlavaAdapter(model, processor, source="embedlens-mini")
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="vision features", unit="batch"):
        pixels = processor.image_processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        with capture(adapter, [], vision_features=True) as store, torch.inference_mode():
            model.model.get_image_features(pixel_values=pixels.to(model.dtype))
        chunks.append(store.vision_features.to(torch.bfloat16))
    return torch.cat(chunks)


def sample_turns(sample: Any, rng: random.Random, config: TrainConfig) -> list[Turn]:
    """A random conversation about one sample: some of its questions, maybe its caption, shuffled."""
    qas = list(sample.qas)
    rng.shuffle(qas)
    turns = [Turn(qa.question, qa.answer) for qa in qas[: config.max_turns]]
    if rng.random() < config.caption_prob or not turns:
        turns.insert(rng.randrange(len(turns) + 1), Turn(rng.choice(CAPTION_PROMPTS), sample.caption))
    return turns


class ProjectorTrainer:
    """Holds the frozen model, the cached features and the optimiser state of one training run."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        samples: Sequence[Any],
        config: TrainConfig,
        adapters: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.adapters = dict(adapters or {})
        self.model = model
        self.processor = processor
        self.samples = list(samples)
        tokenizer = processor.tokenizer
        image_tokens = int(model.config.image_seq_length)
        self.builder = SequenceBuilder(tokenizer, int(model.config.image_token_id), image_tokens)
        self.pad_id = int(tokenizer.pad_token_id)
        self.llm = model.model.language_model
        self.projector = model.model.multi_modal_projector
        self.lm_head = model.lm_head
        model.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.projector.float()
        low_rank = [p for a in self.adapters.values() for p in (a.lora_a, a.lora_b)]
        masters = [p.data.float().clone() for p in low_rank]
        self.llm_dtype = llm_compute_dtype(config, next(self.llm.parameters()).device)
        self.llm.to(self.llm_dtype)  # frozen: a bfloat16 copy is enough, and twice as fast where it is fast
        groups = [{"params": list(self.projector.parameters()), "peak_lr": config.lr}]
        if low_rank:
            for parameter, master in zip(low_rank, masters, strict=True):
                parameter.data = master  # float32 master weights beside the (maybe bfloat16) LLM
                parameter.requires_grad_(True)
            groups.append({"params": low_rank, "peak_lr": config.lora_lr})
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        self.features: torch.Tensor | None = None
        self.step = 0
        self.losses: list[float] = []

    def prepare_features(self, cache: Path | None = None) -> None:
        """Compute (or read from ``cache``) the vision features of every sample."""
        if cache is not None and cache.is_file():
            features = torch.load(cache, weights_only=True)
            if features.shape[0] == len(self.samples):
                self.features = features
                return
        self.features = extract_features(self.model, self.processor, [s.image for s in self.samples])
        if cache is not None:
            with atomic_path(cache) as tmp:
                torch.save(self.features, tmp)

    def batch_for(self, step: int) -> tuple[list[int], list[Encoded]]:
        """The sample indices and encoded sequences of ``step`` (a pure function of seed and step)."""
        rng = random.Random(self.config.seed * 1_000_003 + step)
        indices = [rng.randrange(len(self.samples)) for _ in range(self.config.batch_size)]
        encoded = [self.builder.encode(sample_turns(self.samples[i], rng, self.config)) for i in indices]
        return indices, encoded

    def loss(self, indices: list[int], encoded: list[Encoded]) -> torch.Tensor:
        """Answer-only next-token loss for one batch."""
        ids, mask, labels = collate(encoded, self.pad_id)
        image_features = self.projector(self.features[indices].float())  # [B, tokens, d]
        with torch.no_grad():
            embeds = self.llm.embed_tokens(ids)
        image_mask = (ids == self.model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.lm_head(hidden[:, :-1][keep])
        if self.config.loss_weighting == "answer":
            losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
            return (losses * answer_weights(targets)).sum()
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])

    def train(self, until: int, deadline: float, on_step: Callable[[int, float], None] | None = None) -> bool:
        """Optimise up to step ``until`` or ``deadline`` (a ``time.monotonic`` value); True if finished."""
        torch.manual_seed(self.config.seed + self.step)
        bar = tqdm(total=until, initial=self.step, desc="train-mini", unit="step")
        while self.step < until:
            if time.monotonic() > deadline:
                bar.close()
                return False
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_at(self.step, self.config) / self.config.lr
            indices, encoded = self.batch_for(self.step)
            loss = self.loss(indices, encoded)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            value = loss.item()
            self.losses.append(value)
            self.step += 1
            recent = self.losses[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            bar.update(1)
            if on_step is not None:
                on_step(self.step, value)
        bar.close()
        return True

    def state(self) -> dict[str, Any]:
        """Everything needed to resume."""
        return {
            "step": self.step,
            "projector": self.projector.state_dict(),
            "lora": lora_tensors(self.adapters),
            "optimizer": self.optimizer.state_dict(),
            "losses": self.losses,
            "config": dataclasses.asdict(self.config),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state` (:class:`InputError` if it was made with other result-shaping settings)."""
        check_same_settings(state, self.config)
        self.step = int(state["step"])
        self.projector.load_state_dict(state["projector"])
        load_lora_tensors(self.adapters, state.get("lora", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses = list(state["losses"])


def check_same_settings(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume from a checkpoint ``state`` made with other result-shaping settings than ``config``.

    Raises:
        InputError: Naming the settings that differ (saved -> asked for).
    """
    saved = _result_settings({**dataclasses.asdict(TrainConfig()), **state["config"]})  # newer settings: defaults
    asked = _result_settings(dataclasses.asdict(config))
    changed = [f"{name} {saved.get(name)!r} -> {asked[name]!r}" for name in asked if saved.get(name) != asked[name]]
    if changed:
        raise InputError(
            f"the checkpoint was made with another configuration ({', '.join(changed)}); "
            "use a fresh --out directory or the same settings"
        )


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint in ``path`` if there is one; a damaged one is an :class:`InputError`."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read the checkpoint {path} ({reason}); delete it to start over") from exc
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise InputError(f"{path} is not a train-mini checkpoint; delete it to start over")
    return state


def _result_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the settings that only steer the run (time budget, checkpoint interval)."""
    return {k: v for k, v in config.items() if k not in ("minutes", "checkpoint_every")}


def save_projector(projector: torch.nn.Module, path: Path, strategy: str) -> None:
    """Write the projector's weights (float32 safetensors) atomically, recording its vision ``strategy``."""
    tensors = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", STRATEGY_KEY: strategy})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


CHECKPOINT = "checkpoint.pt"
FEATURES = "features.pt"
PROJECTOR = "projector.safetensors"
LORA = "lora.safetensors"
LOG = "train_log.json"


def training_samples(config: TrainConfig) -> list[Any]:
    """The generated training images (seed ``config.seed``) plus every packaged photo available."""
    from embedlens.mini.assemble import IMAGE_SIZE
    from embedlens.synth.photos import photo_samples
    from embedlens.synth.scenes import generate

    samples = list(
        tqdm(
            generate(config.images, config.seed, image_size=IMAGE_SIZE), total=config.images, desc="images", unit="img"
        )
    )
    return samples + photo_samples(IMAGE_SIZE)


def run_training(out: Path, config: TrainConfig, *, wheels_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the projector into ``out`` (resuming from a checkpoint there) and return the log.

    Writes ``out/projector.safetensors`` (the weights to ship), with ``lora_rank`` also
    ``out/lora.safetensors`` (the LLM's adapters), ``out/train_log.json`` (config, data, loss curve,
    timings, software versions) and keeps ``out/checkpoint.pt`` / ``out/features.pt`` for resuming.

    Raises:
        InputError: ``out`` holds a checkpoint made with other settings, or a damaged one (checked
            before anything is built).
    """
    from embedlens.mini.assemble import build_mini

    state = _read_checkpoint(out / CHECKPOINT)
    if state is not None:
        check_same_settings(state, config)  # before minutes of building and data generation
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    model, processor = build_mini(projector=None, seed=config.seed, wheels_dir=wheels_dir, strategy=config.strategy)
    samples = training_samples(config)
    llm = model.model.language_model
    with lora_attached(llm, config.lora_rank, seed=config.seed) if config.lora_rank else nullcontext({}) as adapters:
        return _train(out, config, model, processor, samples, adapters, started, state)


def _train(
    out: Path,
    config: TrainConfig,
    model: Any,
    processor: Any,
    samples: list[Any],
    adapters: dict[str, Any],
    started: float,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of :func:`run_training`, with the LoRA adapters (if any) attached."""
    import platform

    import transformers

    from embedlens import __version__

    trainer = ProjectorTrainer(model, processor, samples, config, adapters)
    checkpoint = out / CHECKPOINT
    if state is not None:
        trainer.load_state(state)
        logger.info("resuming from step %d", trainer.step)
    trainer.prepare_features(out / FEATURES)
    prepared = time.monotonic()
    earlier = sum(_elapsed_before(out))
    deadline = prepared + 60.0 * config.minutes - earlier

    def save_checkpoint(step: int, _loss: float) -> None:
        if step % config.checkpoint_every == 0 or step == config.steps:
            with atomic_path(checkpoint) as tmp:
                torch.save(trainer.state(), tmp)

    finished = trainer.train(config.steps, deadline, on_step=save_checkpoint)
    save_checkpoint(config.steps, 0.0)  # also on an early stop, so a later run can resume
    save_projector(trainer.projector, out / PROJECTOR, config.strategy)
    if adapters:
        save_lora(adapters, out / LORA)
    kinds: dict[str, int] = {}
    for sample in samples:
        for qa in sample.qas:
            kinds[qa.kind] = kinds.get(qa.kind, 0) + 1
    log = {
        "config": dataclasses.asdict(config),
        "finished": finished,
        "steps_done": trainer.step,
        "samples": len(samples),
        "questions_per_kind": kinds,
        "loss_first_50": _mean(trainer.losses[:50]),
        "loss_last_50": _mean(trainer.losses[-50:]),
        "loss_every_50": [_mean(trainer.losses[i : i + 50]) for i in range(0, len(trainer.losses), 50)],
        "llm_dtype": str(trainer.llm_dtype).removeprefix("torch."),
        "seconds_preparation": round(prepared - started, 1),
        "seconds_training": round(earlier + time.monotonic() - prepared, 1),
        "versions": {
            "embedlens": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    write_json(out / LOG, log)
    return log


def _elapsed_before(out: Path) -> list[float]:
    """Training seconds spent by earlier (interrupted) runs in ``out``, from their log, if any."""
    path = out / LOG
    if not path.is_file():
        return []
    try:
        return [float(json.loads(path.read_text())["seconds_training"])]
    except (ValueError, KeyError):
        return []


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")
