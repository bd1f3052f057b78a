"""Smoke run of embedlens reproduce on embedlens-mini with a tiny local lmms-eval task (not the paper's numbers)."""
import os, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from embedlens.reproduce.costs import cost_model
from embedlens.reproduce.paper import TaskMetric, TaskSuite
from embedlens.reproduce.localtask import write_local_task
from embedlens.reproduce.plan import PlanOptions
from embedlens.reproduce.runner import run_all

root = Path(sys.argv[1])
task_dir, images = root / "tasks", root / "images"
for d in (task_dir, images):
    d.mkdir(parents=True, exist_ok=True)
rows = []
for i in range(4):
    path = images / f"img{i}.png"
    pixels = np.random.default_rng(300 + i).integers(0, 256, size=(56, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    rows.append({"image": str(path), "question": "what colour is it", "answer": ("red", "blue")[i % 2]})
write_local_task(task_dir, rows, names=("tinyrep", "tinyrep_cv"))
suite = TaskSuite(
    groups={"General": ("tinyrep",), "CV-centric": ("tinyrep_cv",)},
    metrics={t: TaskMetric(t, ("exact_match",), 100.0, "exact match, x100") for t in ("tinyrep", "tinyrep_cv")},
)
options = PlanOptions(model="embedlens-mini", out=root / "out", suite=suite, seeds=(0, 1), inject_layers=(0, 8),
                      images=images, limit=2, device="cpu", include_path=task_dir)
env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           HF_HOME=str(root / "hf"))
started = time.time()
outcome = run_all(options, cost_model("embedlens-mini"), echo=lambda l: print(l, flush=True), env=env)
print(f"wall {time.time() - started:.0f} s; ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, pending {outcome.pending}")
