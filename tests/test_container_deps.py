"""The slim CPU image holds what its stages import, and no torch (no container needed).

Each stage that workflows/tables.py maps to the CPU image is imported in a fresh interpreter in which
torch, torchvision, open_clip and transformers cannot be imported (as in the image); every third-party
module it loads must come from a distribution in images/requirements-cpu.txt (or their dependencies).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

from libcurate.registry import STAGES, stage_class
from workflows import tables as T

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, importlib.abc, json, sys
BLOCKED = {"torch", "torchvision", "open_clip", "transformers", "timm", "sentence_transformers"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the CPU image)")
sys.meta_path.insert(0, Block())
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _closure(req_file: Path) -> set[str]:
    """Normalised names of the requirements and all their installed dependencies."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    todo = [norm(ln.split("#")[0].strip()) for ln in req_file.read_text().splitlines()
            if ln.split("#")[0].strip() and not ln.startswith("-")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            todo.append(norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]))
    return seen


def test_cpu_image_stages_import_without_torch():
    allowed = _closure(ROOT / "images" / "requirements-cpu.txt")
    dists = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    cpu_modules = {name: STAGES[name].split(":")[0] for name in STAGES if T.image_family(stage_class(name)) == "cpu"}
    cpu_modules["plan_batches"] = "jobs.plan_batches"
    cpu_modules["check_budget"] = "jobs.check_budget"      # the max_cost step runs on the CPU image
    checked = 0
    for stage, module in sorted(cpu_modules.items()):
        r = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, f"{stage} ({module}) needs torch or fails to import:\n{r.stderr[-2000:]}"
        checked += 1
        for top in json.loads(r.stdout):
            if top in stdlib or top.startswith("_") or top in ("libcurate", "jobs", "workflows"):
                continue
            owners = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [])}
            if not owners:
                continue      # a module of the interpreter itself
            assert owners & allowed, (f"{stage} imports {top!r} ({sorted(owners)}), which the CPU image lacks: add "
                                      "it to images/requirements-cpu.txt or map the stage to the GPU image")
    assert checked == len(cpu_modules)


PLAN_PROBE = PROBE.replace("importlib.import_module(sys.argv[1])\n", "") + r"""
from libcurate.registry import STAGES, stage_class
from libcurate.pipeline import load_recipe, plan
stages = [{"stage": "ingest", "with": {"format": "llava", "annotations": "a.json", "images": "."}}]
settings = json.loads(sys.argv[2])  # stages that read an input file to plan (decontaminate's benchmarks)
stages += [{"stage": n, "with": settings.get(n, {})} for n in STAGES
           if n not in ("ingest", "select", "export") and not stage_class(n).produces_raw]  # retrieve: a first stage
stages += [{"stage": "select"}, {"stage": "export"}]
print([p.stage for p in plan(load_recipe({"storage": {"prefix": sys.argv[1]}, "stages": stages}))])
"""


def test_cpu_image_plans_recipes_with_gpu_stages(tmp_path):
    """plan_batches, select and export run in the CPU image and plan the whole recipe, GPU stages included:
    planning must not import torch."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"question_id": 1, "text": "What is shown in the image?"}\n')
    settings = {"decontaminate": {"benchmarks": [{"name": "b", "questions": str(bench), "match": ["question"]}]}}
    r = subprocess.run([sys.executable, "-c", PLAN_PROBE, str(tmp_path / "run"), json.dumps(settings)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "score_clip" in r.stdout and "score_reward" in r.stdout
