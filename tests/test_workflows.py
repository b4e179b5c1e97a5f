"""Argo backend without a cluster: rendered YAML vs committed snapshots, both pinned Argo schemas, Hera's
models, and the structural rules (GPU pods, security contexts, retries, secrets, image tags).

Regenerate snapshots after a deliberate change: ``CURATE_UPDATE_SNAPSHOTS=1 pytest tests/test_workflows.py``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml

from libcurate.registry import STAGES, stage_class

from workflows import __version__
from workflows import tables as T
from workflows.dag import build
from workflows.render import dump, render

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "snapshots"
SCHEMAS = ROOT / "tests" / "data" / "argo-schemas"
ARGO_VERSIONS = ("v3.6.10", "v4.1.2")
PREFIX = "s3://curate-test/runs/full"
REGISTRY = "registry.example.com/curate"

FULL = {
    "name": "full",
    "storage": {"prefix": PREFIX},
    "schedule": "0 3 * * *",
    "workers": 2,
    "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "s3://curate-test/src/data.json",
                                     "images": "s3://curate-test/src/images"}},
        {"stage": "score_length", "with": {"tokenizer": "whitespace"}},
        {"stage": "score_clip"},
        {"stage": "score_reward"},
        {"stage": "judge_score"},
        {"stage": "select", "with": {"rank_by": "score_clip.cosine", "budget": 1000}},
        {"stage": "export"},
    ],
}
# No schedule, a renamed stage and the torch tokenizer: exercises `as:`, no CronWorkflow, image choice.
SMALL = {
    "name": "small_Run",
    "storage": {"prefix": "s3://curate-test/runs/small"},
    "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "s3://curate-test/src/data.json",
                                     "images": "s3://curate-test/src/images"}},
        {"stage": "score_length", "as": "len_clip_tok"},
        {"stage": "select", "with": {"budget": 10}},
        {"stage": "export"},
    ],
}
# Selection: a per-shard hash stage, two fit stages (one on the GPU profile) and a strategy.
SELECTION = {
    "name": "selection",
    "storage": {"prefix": "s3://curate-test/runs/selection"},
    "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "s3://curate-test/src/data.json",
                                     "images": "s3://curate-test/src/images"}},
        {"stage": "score_clip"},
        {"stage": "hash_image"},
        {"stage": "dedup", "with": {"hash": "hash_image.phash", "embedding": "score_clip.img_emb"}},
        {"stage": "cluster", "with": {"method": "spectral", "n_clusters": 10, "profile": "gpu"}},
        {"stage": "select", "with": {"score": "score_clip.cosine", "budget": 200,
                                     "strategy": {"kind": "cluster_proportional", "cluster": "cluster.cluster"}}},
        {"stage": "export"},
    ],
}
# max_cost with two LLM stages side by side (raw-only) and a scorer beside them: a budget step before each.
BUDGET = {
    "name": "budget",
    "storage": {"prefix": "s3://curate-test/runs/budget"},
    "max_cost": 25.0,
    "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "s3://curate-test/src/data.json",
                                     "images": "s3://curate-test/src/images"}},
        {"stage": "judge_score", "as": "judge"},
        {"stage": "score_length", "with": {"tokenizer": "whitespace"}},
        {"stage": "blind_answer", "as": "blind"},
        {"stage": "select", "with": {"rank_by": "judge.score", "budget": 10}},
        {"stage": "export"},
    ],
}
RECIPES = {"full": FULL, "small": SMALL, "selection": SELECTION, "budget": BUDGET}


def _write_recipe(tmp_path: Path, d: dict) -> str:
    path = tmp_path / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """recipe key -> {file stem -> manifest}, rendered through the public ``render``."""
    out = {}
    for key, d in RECIPES.items():
        tmp = tmp_path_factory.mktemp(key)
        paths = render(_write_recipe(tmp, d), str(tmp / "out"), registry=REGISTRY)
        out[key] = {Path(p).stem: yaml.safe_load(Path(p).read_text()) for p in paths}
    return out


def _argo_docs(rendered):
    for key, docs in rendered.items():
        for stem, doc in docs.items():
            if doc["apiVersion"].startswith("argoproj.io"):
                yield f"{stem}", doc


def _templates(doc):
    spec = doc["spec"].get("workflowSpec", doc["spec"])
    return spec.get("templates", [])


# -- snapshots ------------------------------------------------------------------------------------
def test_snapshots(rendered):
    update = os.environ.get("CURATE_UPDATE_SNAPSHOTS") == "1"
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    stale = []
    for docs in rendered.values():
        for stem, doc in docs.items():
            path = SNAPSHOTS / f"{stem}.yaml"
            text = dump(doc)
            if update:
                path.write_text(text)
            elif not path.exists() or path.read_text() != text:
                stale.append(path.name)
    assert not stale, (f"rendered YAML differs from tests/snapshots for {stale}; if intended, regenerate with "
                       "CURATE_UPDATE_SNAPSHOTS=1 pytest tests/test_workflows.py and review the diff")


def test_expected_documents(rendered):
    assert set(rendered["full"]) == {"full-configmap-recipe", "full-workflowtemplate", "full-workflow",
                                     "full-cronworkflow"}
    assert "small-run-cronworkflow" not in rendered["small"]          # no schedule, no cron
    wt = rendered["full"]["full-workflowtemplate"]
    assert wt["metadata"]["name"] == f"curate-full-v{__version__.replace('.', '-')}"
    for stem in ("full-workflow", "full-cronworkflow"):
        doc = rendered["full"][stem]
        spec = doc["spec"].get("workflowSpec", doc["spec"])
        assert spec["workflowTemplateRef"]["name"] == wt["metadata"]["name"]


def test_version_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert __version__ == meta["project"]["version"]


# -- validation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schemas():
    return {v: json.loads((SCHEMAS / f"argo-workflows-{v}.schema.json").read_text()) for v in ARGO_VERSIONS}


@pytest.mark.parametrize("version", ARGO_VERSIONS)
def test_argo_schema(rendered, schemas, version):
    defs = schemas[version]["definitions"]
    checked = 0
    for name, doc in _argo_docs(rendered):
        schema = {"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{doc['kind']}", "definitions": defs}
        errors = [f"{name}: /{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        assert not errors, "\n".join(errors[:20])
        checked += 1
    assert checked == 9


def test_hera_models(rendered):
    from hera.workflows import models as m

    kinds = set()
    for name, doc in _argo_docs(rendered):
        obj = getattr(m, doc["kind"]).model_validate(doc)
        assert obj.metadata is not None
        kinds.add(doc["kind"])
    assert kinds == {"WorkflowTemplate", "Workflow", "CronWorkflow"}


def test_configmap_is_valid_core_manifest(rendered):
    import kubernetes_validate

    for docs in rendered.values():
        cm = next(d for d in docs.values() if d["kind"] == "ConfigMap")
        kubernetes_validate.validate(cm, "1.37.0", strict=True)
        assert yaml.safe_load(cm["data"]["recipe.yaml"])["stages"]


# -- structure ------------------------------------------------------------------------------------
def test_dag_is_the_plan(rendered, tmp_path):
    """Every planned stage runs its own jobs module with its id, in an order the plan allows."""
    bundle = build(_write_recipe(tmp_path, FULL), registry=REGISTRY)
    wt = rendered["full"]["full-workflowtemplate"]
    by_name = {t["name"]: t for t in _templates(wt)}
    tasks = {t["name"]: t for t in by_name["main"]["dag"]["tasks"]}
    for ps in bundle.stages:
        tname = ps.id.replace("_", "-")
        ctr = by_name[tname]["container"]
        assert ctr["command"] == ["python", "-m", "jobs", ps.stage]
        assert ps.stage in STAGES   # one generic entrypoint: python -m jobs <stage>
        assert ctr["args"][ctr["args"].index("--stage-id") + 1] == ps.id
        assert tname in tasks
    # raw-only scorers run side by side after ingest; select waits for all of them; export for select
    for s in ("score-length", "score-clip", "score-reward", "judge-score"):
        assert tasks[f"{s}-batches"]["depends"] == "ingest"
        assert tasks[s]["template"] == f"{s}-fanout"
    assert set(tasks["select"]["depends"].split(" && ")) == {"score-length", "score-clip", "score-reward",
                                                             "judge-score"}
    assert tasks["export"]["depends"] == "select"
    assert tasks["ingest"]["when"] == "{{workflow.parameters.ingest}} == true"
    cron = rendered["full"]["full-cronworkflow"]
    params = {p["name"]: p["value"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
    assert params["ingest"] == "true" and cron["spec"]["concurrencyPolicy"] == "Forbid"  # appended records


def test_fanout_over_batches(rendered):
    for name, doc in _argo_docs(rendered):
        by_name = {t["name"]: t for t in _templates(doc)}
        for t in _templates(doc):
            if not t["name"].endswith("-fanout"):
                continue
            (task,) = t["dag"]["tasks"]
            assert task["withParam"] == "{{inputs.parameters.batches}}"
            assert t["parallelism"] >= 1
            stage_t = by_name[task["template"]]
            assert "{{inputs.parameters.shards}}" in stage_t["container"]["args"]
        pb = by_name.get("plan-batches")
        if pb:
            assert pb["container"]["command"] == ["python", "-m", "jobs.plan_batches"]
            assert "--batch-size" in pb["container"]["args"]


def test_ingest_fans_out(rendered):
    """Ingest is a list step + fan-out like the CPU stages: skipped as a whole when ingest=false, no GPU."""
    prof = T.PROFILES["ingest"]
    when = "{{workflow.parameters.ingest}} == true"
    for key, first in (("full", ("score-length", "score-clip", "score-reward", "judge-score")),
                       ("small", ("len-clip-tok",))):
        wt = next(d for s, d in rendered[key].items() if s.endswith("-workflowtemplate"))
        by_name = {t["name"]: t for t in _templates(wt)}
        tasks = {t["name"]: t for t in by_name["main"]["dag"]["tasks"]}
        lst, fan = tasks["ingest-batches"], tasks["ingest"]
        assert "depends" not in lst and lst["when"] == when and fan["when"] == when
        assert fan["depends"] == "ingest-batches" and fan["template"] == "ingest-fanout"
        assert fan["arguments"]["parameters"] == [{"name": "batches",
                                                   "value": "{{tasks.ingest-batches.outputs.result}}"}]
        args = {p["name"]: p["value"] for p in lst["arguments"]["parameters"]}
        assert args == {"stage-id": "ingest", "batch-size": str(prof.batch_size)}
        # only the two ingest steps are conditional; every stage after ingest waits for its fan-out
        assert [t for t, v in tasks.items() if "when" in v] == ["ingest-batches", "ingest"]
        for s in first:
            assert tasks[f"{s}-batches"]["depends"] == "ingest"
        # the list step parses the annotations: its own template, sized by the profile, not the shared one
        pb = by_name[lst["template"]]
        assert pb["container"]["command"] == ["python", "-m", "jobs.plan_batches"]
        assert pb["container"]["resources"] == prof.plan_resources
        assert by_name["plan-batches"]["container"]["resources"] == T.PLAN_BATCHES_RESOURCES
        fan_t = by_name["ingest-fanout"]
        assert fan_t["parallelism"] == prof.parallelism
        (item,) = fan_t["dag"]["tasks"]
        assert item["withParam"] == "{{inputs.parameters.batches}}"
        assert item["arguments"]["parameters"] == [{"name": "shards", "value": "{{item.shards}}"}]
        pod = by_name[item["template"]]
        ctr = pod["container"]
        assert ctr["command"] == ["python", "-m", "jobs", "ingest"]
        assert ctr["args"][ctr["args"].index("--shards") + 1] == "{{inputs.parameters.shards}}"
        assert ctr["args"][ctr["args"].index("--workers") + 1] == str(prof.workers)
        assert "tolerations" not in pod and "nodeSelector" not in pod and "synchronization" not in pod
        assert "nvidia.com/gpu" not in ctr["resources"]["requests"] and prof.shm is None
        assert ctr["image"].endswith(f"curate-cpu:{__version__}")
        assert pod["metadata"]["labels"]["curate/profile"] == "ingest"


def test_ingest_batches_run_as_independent_pods(tmp_path):
    """What the fan-out relies on, run locally: the list step's batches, each ingested by its own process
    (each parsing the annotations and writing raw/_ingest.json), equal one ingest over everything; an
    appended record becomes one new batch."""
    import contextlib
    import io

    from jobs._main import main as job_main
    from jobs.plan_batches import main as plan_main
    from libcurate.demo import build as build_demo
    from libcurate.shards import iter_samples
    from libcurate.storage import open_store

    build_demo(str(tmp_path / "src"), copies=2)

    def recipe(prefix: str) -> str:
        cfg = {"format": "llava", "annotations": str(tmp_path / "src" / "data.json"),
               "images": str(tmp_path / "src"), "shard_size": 8}
        return _write_recipe(tmp_path, {"name": prefix, "storage": {"prefix": str(tmp_path / prefix)},
                                        "workers": 1, "device": "cpu",
                                        "stages": [{"stage": "ingest", "with": cfg}]})

    def batches(r: str) -> list[dict]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert plan_main(["--recipe", r, "--stage-id", "ingest", "--batch-size", "3"]) == 0
        return json.loads(buf.getvalue())

    def ingest(r: str, spec: str | None = None) -> None:
        assert job_main("ingest", ["--recipe", r, "--stage-id", "ingest"] + (["--shards", spec] if spec else [])) == 0

    def contents(prefix: str) -> dict:
        store = open_store(str(tmp_path / prefix))
        return {"manifest": store.read_text("raw/_ingest.json"),
                "shards": {p.name: [s.key for s in iter_samples(store, f"raw/{p.name}", with_images=False)]
                           for p in sorted((tmp_path / prefix / "raw").glob("*.tar"))}}

    fan, one = recipe("fan"), recipe("one")
    plan = batches(fan)
    n_shards = -(-len(json.loads((tmp_path / "src" / "data.json").read_text())) // 8)
    assert [b["shards"] for b in plan][:2] == ["0-2", "3-5"] and len(plan) == -(-n_shards // 3)
    for b in reversed(plan):             # any order: pods are independent
        ingest(fan, b["shards"])
    ingest(one)
    got = contents("fan")
    assert got == contents("one") and len(got["shards"]) == n_shards and sum(map(len, got["shards"].values())) > 50
    assert batches(fan) == []            # a re-run starts no ingest pod

    # scheduled re-curation: one appended record -> one new shard in a new segment -> one batch
    data = json.loads((tmp_path / "src" / "data.json").read_text())
    (tmp_path / "src" / "data.json").write_text(json.dumps(data + [{**data[0], "id": "appended"}]))
    assert batches(fan) == [{"shards": str(n_shards)}]
    ingest(fan, str(n_shards))
    ingest(one)
    assert contents("fan") == contents("one") and batches(fan) == []

    # records appended while the pods run: the list step fixed the layout, a pod that parses the longer
    # file keeps it (the new record waits for the next run) instead of re-laying out the shards
    data = json.loads((tmp_path / "src" / "data.json").read_text())
    (tmp_path / "src" / "data.json").write_text(json.dumps(data + [{**data[1], "id": "appended-2"}]))
    manifest = contents("fan")["manifest"]
    ingest(fan, "0-2")                   # a late pod of the previous run: nothing to do, layout untouched
    assert contents("fan")["manifest"] == manifest
    assert batches(fan) == [{"shards": str(n_shards + 1)}]   # the next run's list step extends it


def _containers(rendered):
    for name, doc in _argo_docs(rendered):
        for t in _templates(doc):
            if "container" in t:
                yield name, t


def test_gpu_and_cpu_profiles(rendered):
    gpu = T.PROFILES["gpu"]
    n_gpu = 0
    for name, t in _containers(rendered):
        res = t["container"]["resources"]
        is_gpu = "nvidia.com/gpu" in res.get("limits", {})
        tol_keys = {x["key"] for x in t.get("tolerations", [])}
        assert t.get("activeDeadlineSeconds"), f"{t['name']}: no timeout"
        if is_gpu:
            n_gpu += 1
            assert res["requests"]["nvidia.com/gpu"] == "1"
            assert "nvidia.com/gpu" in tol_keys
            assert t["nodeSelector"] == gpu.node_selector
            assert t["priorityClassName"] == gpu.priority_class
            assert t["synchronization"]["semaphores"][0]["configMapKeyRef"]["name"] == T.GPU_SEMAPHORE[0]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in t["container"]["volumeMounts"]
            assert t["container"]["image"].split("/")[-1].startswith("curate-gpu:")
        else:
            assert "nvidia.com/gpu" not in tol_keys, f"CPU template {t['name']} tolerates the GPU taint"
            assert "nvidia.com/gpu" not in res.get("requests", {})
            assert "nodeSelector" not in t and "priorityClassName" not in t and "synchronization" not in t
    assert n_gpu == 4          # full: score_clip, score_reward; selection: score_clip, cluster's fit


def test_images(rendered):
    for name, t in _containers(rendered):
        image = t["container"]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo.startswith(REGISTRY + "/") and tag == __version__ and tag != "latest", image
    by_name = {t["name"]: t for _, t in _containers(rendered)}
    assert by_name["score-length"]["container"]["image"].endswith(f"curate-cpu:{__version__}")   # whitespace
    assert by_name["len-clip-tok"]["container"]["image"].endswith(f"curate-gpu:{__version__}")   # clip BPE
    assert by_name["judge-score"]["container"]["image"].endswith(f"curate-cpu:{__version__}")


def test_security_retry_and_mounts(rendered):
    for name, t in _containers(rendered):
        sc = t["container"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert t["securityContext"]["runAsNonRoot"] is True and t["securityContext"]["runAsUser"] != 0
        mounts = {v["mountPath"]: v for v in t["container"]["volumeMounts"]}
        assert "/tmp" in mounts and mounts["/etc/curate"]["readOnly"] is True
        assert "--recipe" in t["container"]["args"]
        rs = t["retryStrategy"]
        assert rs["expression"] == "asInt(lastRetry.exitCode) != 3" and rs["retryPolicy"] == "Always"
        assert isinstance(rs["limit"], str) and isinstance(rs["backoff"]["factor"], str)
    for name, doc in _argo_docs(rendered):
        spec = doc["spec"]
        if doc["kind"] == "WorkflowTemplate":
            assert spec["podGC"]["strategy"] == "OnPodSuccess"
            assert spec["ttlStrategy"]["secondsAfterFailure"] > spec["ttlStrategy"]["secondsAfterSuccess"]
            assert spec["serviceAccountName"] == T.SERVICE_ACCOUNT
            assert spec["securityContext"]["runAsNonRoot"] is True
            vols = {v["name"]: v for v in spec["volumes"]}
            assert vols["recipe"]["configMap"]["name"] == "{{workflow.parameters.recipe}}"


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                          # AWS access key id
    re.compile(r"sk-[A-Za-z0-9]{16,}"),                       # OpenAI-style API key
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(secret|password|token|api_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}"),
]


def test_no_literal_secrets(rendered):
    for docs in rendered.values():
        for stem, doc in docs.items():
            text = dump(doc)
            for pat in SECRET_PATTERNS:
                assert not pat.search(text), f"{stem}: looks like a literal secret ({pat.pattern})"
    for name, t in _containers(rendered):
        for env in t["container"].get("env", []):
            assert "value" not in env or not re.search(r"(?i)key|secret|token|password", env["name"])
        refs = [e["secretRef"]["name"] for e in t["container"]["envFrom"]]
        assert T.S3_SECRET in refs
        stage = t["metadata"]["labels"]["curate/stage"]
        llm = stage not in ("plan_batches", "check_budget") and stage_class(stage).llm
        assert (T.LLM_SECRET in refs) == llm


def test_every_registered_stage_has_an_image():
    from libcurate.registry import STAGES

    for stage in STAGES:
        assert T.image_family(stage_class(stage)) in T.IMAGE_REPO


def test_demo_recipe_renders(tmp_path):
    demo = ROOT / "recipes" / "demo.yaml"
    if not demo.exists():
        pytest.skip("recipes/demo.yaml not written yet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = render(str(demo), str(tmp_path), prefix="s3://curate-demo/run")
    # the demo reads a local directory: render says so instead of shipping a broken workflow silently
    assert any("local path" in str(w.message) for w in caught)
    docs = [yaml.safe_load(Path(p).read_text()) for p in paths]
    from hera.workflows import models as m

    for d in docs:
        if d["kind"] != "ConfigMap":
            getattr(m, d["kind"]).model_validate(d)


def test_rejects_colliding_template_names(tmp_path):
    d = {**SMALL, "stages": SMALL["stages"][:1] + [{"stage": "score_length", "as": "a_b"},
                                                   {"stage": "score_length", "as": "a-b"}]}
    with pytest.raises(ValueError, match="same template name"):
        build(_write_recipe(tmp_path, d))


# -- submit through a fake Argo server -------------------------------------------------------------
class FakeService:
    """Records what ``submit`` sends; behaves like Hera's WorkflowsService for the calls it makes."""

    def __init__(self):
        self.templates, self.calls = {}, []

    def get_workflow_template(self, name, namespace=None):
        return self.templates[name]

    def create_workflow_template(self, req, namespace=None):
        self.calls.append(("create_template", namespace))
        self.templates[req.template.metadata.name] = req.template
        req.template.metadata.resource_version = "1"
        return req.template

    def update_workflow_template(self, name, req, namespace=None):
        assert req.template.metadata.resource_version == "1"
        self.calls.append(("update_template", namespace))
        return req.template

    def create_workflow(self, req, namespace=None):
        self.calls.append(("create_workflow", namespace))
        req.workflow.metadata.name = req.workflow.metadata.generate_name + "x7k2p"
        return req.workflow

    def delete_cron_workflow(self, name, namespace=None):
        raise KeyError(name)

    def create_cron_workflow(self, req, namespace=None):
        self.calls.append(("create_cron", namespace))
        return req.cron_workflow


def test_submit(tmp_path):
    from workflows.submit import submit

    svc = FakeService()
    path = _write_recipe(tmp_path, FULL)
    assert submit(path, service=svc, namespace="ns", apply_config=False) == "workflow/curate-full-x7k2p"
    assert submit(path, cron=True, service=svc, namespace="ns", apply_config=False) == \
        "cronworkflow/curate-full-recurate"
    assert [c[0] for c in svc.calls] == ["create_template", "create_workflow", "update_template", "create_cron"]
    assert all(ns == "ns" for _, ns in svc.calls)
    with pytest.raises(ValueError, match="schedule"):
        submit(_write_recipe(tmp_path, SMALL), cron=True, service=svc, apply_config=False)


def test_fit_stages_have_their_own_fit_template(rendered):
    """A fit stage is one pod with its own profile (CPU `fit` or GPU), then a fan-out of light writes."""
    wt = rendered["selection"]["selection-workflowtemplate"]
    by_name = {t["name"]: t for t in _templates(wt)}
    tasks = {t["name"]: t for t in by_name["main"]["dag"]["tasks"]}
    for sid, profile in (("dedup", "fit"), ("cluster", "gpu")):
        fit = by_name[f"{sid}-fit"]
        args = fit["container"]["args"]
        assert fit["container"]["command"] == ["python", "-m", "jobs", sid]
        assert args[args.index("--phase") + 1] == "fit" and "--shards" not in args
        assert fit["metadata"]["labels"]["curate/profile"] == profile
        assert fit["container"]["resources"]["requests"] == {**T.PROFILES[profile].requests,
                                                             "ephemeral-storage": T.GLOBAL_TMP}
        assert ("tolerations" in fit) == (profile == "gpu")
        # the writes wait for the fit; the list step lists shards without a marker of this fit
        assert tasks[f"{sid}-batches"]["depends"] == f"{sid}-fit"
        (item,) = by_name[f"{sid}-fanout"]["dag"]["tasks"]
        pod = by_name[item["template"]]
        wargs = pod["container"]["args"]
        assert wargs[wargs.index("--phase") + 1] == "write" and "--shards" in wargs
        assert pod["metadata"]["labels"]["curate/profile"] == "cpu" and "tolerations" not in pod
    # dedup reads score_clip and hash_image: it waits for both; hash_image (raw only) ran beside score_clip
    assert tasks["hash-image-batches"]["depends"] == tasks["score-clip-batches"]["depends"] == "ingest"
    assert set(tasks["dedup-fit"]["depends"].split(" && ")) == {"score-clip", "hash-image"}
    assert tasks["cluster-fit"]["depends"] == "dedup"


def test_budget_step_gates_every_llm_stage_exactly_when_max_cost_is_set(rendered, tmp_path):
    """max_cost: a `<id>-budget` step (python -m jobs.check_budget, CPU image, no LLM key, exit 3 not
    retried) before each LLM stage's first pod, chained in plan order so each gets the previous one's
    ``spent``; without max_cost no such step, and the same recipe with it removed renders none."""
    for key, docs in rendered.items():
        wt = docs[f"{RECIPES[key]['name'].lower().replace('_', '-')}-workflowtemplate"]
        by_name = {t["name"]: t for t in _templates(wt)}
        checks = [t for t in by_name["main"]["dag"]["tasks"] if t["name"].endswith("-budget")]
        assert bool(checks) == ("max_cost" in RECIPES[key]) and ("check-budget" in by_name) == bool(checks), key
    wt = rendered["budget"]["budget-workflowtemplate"]
    by_name = {t["name"]: t for t in _templates(wt)}
    tasks = {t["name"]: t for t in by_name["main"]["dag"]["tasks"]}
    gate = by_name["check-budget"]
    ctr = gate["container"]
    assert ctr["command"] == ["python", "-m", "jobs.check_budget"]
    assert ctr["image"] == f"{REGISTRY}/curate-cpu:{__version__}"
    assert ctr["args"][ctr["args"].index("--spent") + 1] == "{{inputs.parameters.spent}}"
    assert [e["secretRef"]["name"] for e in ctr["envFrom"]] == [T.S3_SECRET]      # sends nothing: no LLM key
    assert gate["retryStrategy"]["expression"] == "asInt(lastRetry.exitCode) != 3"
    assert ctr["resources"]["requests"] == T.BUDGET_CHECK_RESOURCES["requests"]

    def args(t):
        return {p["name"]: p["value"] for p in t["arguments"]["parameters"]}

    # judge and blind read raw only: each waits for ingest and its own check; blind's check also waits
    # for judge's and adds to what judge's check printed (the local runner's `spent`)
    assert tasks["judge-budget"]["depends"] == "ingest"
    assert args(tasks["judge-budget"]) == {"stage-id": "judge", "spent": "0"}
    assert tasks["judge-batches"]["depends"] == "judge-budget"
    assert tasks["blind-budget"]["depends"] == "ingest && judge-budget"
    assert args(tasks["blind-budget"]) == {"stage-id": "blind",
                                          "spent": "{{tasks.judge-budget.outputs.result}}"}
    assert tasks["blind-batches"]["depends"] == "blind-budget"
    assert tasks["score-length-batches"]["depends"] == "ingest"                   # not an LLM stage
    assert set(tasks["select"]["depends"].split(" && ")) == {"judge", "score-length", "blind"}
    assert not [t for t in tasks if t.endswith("-budget") and t not in ("judge-budget", "blind-budget")]

    no_budget = {k: v for k, v in BUDGET.items() if k != "max_cost"}
    plain = {t["name"]: t for t in _templates(build(_write_recipe(tmp_path, no_budget)).template.to_dict())}
    assert "check-budget" not in plain
    assert {t["name"]: t.get("depends") for t in plain["main"]["dag"]["tasks"]}["judge-batches"] == "ingest"


def test_budget_step_name_cannot_collide_with_a_stage(tmp_path):
    d = {**BUDGET, "stages": BUDGET["stages"][:2] + [{"stage": "score_length", "as": "check_budget"}]}
    with pytest.raises(ValueError, match="check-budget"):
        build(_write_recipe(tmp_path, d))


def _tmp_limit(doc: dict, template: dict) -> str:
    """sizeLimit of the emptyDir ``template``'s container mounts at /tmp (a KeyError if undefined)."""
    vols = {v["name"]: v for v in doc["spec"]["volumes"]}
    (name,) = [m["name"] for m in template["container"]["volumeMounts"] if m["mountPath"] == "/tmp"]
    return vols[name]["emptyDir"]["sizeLimit"]


def test_global_pods_get_the_large_tmp_and_shard_pods_8gi(rendered):
    """fit pods (CPU or GPU profile), select and export gather every sample's embeddings into /tmp:
    GLOBAL_TMP; per-shard pods, list and budget steps keep the 8Gi volume named ``tmp``."""
    seen = set()
    for docs in rendered.values():
        (wt,) = [doc for doc in docs.values() if doc["kind"] == "WorkflowTemplate"]
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}} in wt["spec"]["volumes"]
        for t in _templates(wt):
            if "container" not in t:
                continue
            glob = t["name"].endswith("-fit") or t["name"] in ("select", "export")
            seen.add(glob)
            assert _tmp_limit(wt, t) == (T.GLOBAL_TMP if glob else T.TMP), t["name"]
            # the scheduler places a large /tmp on a node with that much local disk
            assert t["container"]["resources"]["requests"].get("ephemeral-storage") == (T.GLOBAL_TMP if glob else None)
    assert seen == {True, False}
    assert T.PROFILES["fit"].tmp == T.SINGLE_POD_TMP == T.GLOBAL_TMP
    assert all(T.PROFILES[p].tmp == T.TMP for p in ("cpu", "ingest", "gpu"))


def test_global_tmp_holds_a_10m_gather_of_an_embedding_list_on_s3(tmp_path, photos, s3_bucket):
    """Measure what gather keeps in its scratch directory on S3 (the shards' downloaded .npy files and
    the joined memmap of [img_emb, txt_emb], 512 fp16 dims each), scale it to the 10M-sample design, add
    a train stage's fp32 feature matrix (libcurate.train.units) and check it fits GLOBAL_TMP."""
    import numpy as np

    from libcurate.columns import embedding_key, gather
    from libcurate.quantity import quantity_bytes
    from libcurate.stage import StageContext

    from .test_ingest import ingest, llava, write_dataset
    from .test_select_concat import write_two_embeddings
    from .conftest import jpeg_bytes

    n, d = 12, 512
    files = {f"{i}.jpg": jpeg_bytes(photos[sorted(photos)[i % len(photos)]], size=(40 + 8 * i, 48)) for i in range(n)}
    ann = write_dataset(tmp_path / "src", [llava(f"r{i}", f"images/{i}.jpg", a=f"answer {i}") for i in range(n)], files)
    store, samples, _ = ingest(f"{s3_bucket}/run", ann, str(tmp_path / "src"), shard_size=4)
    keys = [s.key for s in samples]
    rng = np.random.default_rng(0)
    write_two_embeddings(store, "stages/a/1", {k: {} for k in keys},
                         {k: rng.normal(size=(1, d)).astype(np.float16) for k in keys},
                         {k: rng.normal(size=(1, d)).astype(np.float16) for k in keys})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ctx = StageContext(store=store, prefix="select/x/1", upstream={"ingest": "raw", "a": "stages/a/1"})
    t = gather(ctx, embeddings=[embedding_key(["a.img_emb", "a.txt_emb"])], scratch=str(scratch))
    assert t.embeddings["a.img_emb+a.txt_emb"].shape == (n, 2 * d)
    paths = sorted(scratch.iterdir())
    total = sum(p.stat().st_size for p in paths)
    data = sum(np.load(p, mmap_mode="r").nbytes for p in paths)
    assert data == n * 2 * d * 2 * 2         # fp16, twice: the downloads stay beside the joined memmap
    per_row, per_file = data / n, (total - data) / len(paths)
    shards = T.DESIGN_SAMPLES // 1000                # 1,000 samples a shard (workflows/README.md)
    need = T.DESIGN_SAMPLES * per_row + (2 * shards + 1) * per_file + T.DESIGN_SAMPLES * 2 * d * 4
    assert 2 * d == T.DESIGN_EMBEDDING_DIMS and need <= quantity_bytes(T.GLOBAL_TMP, "GLOBAL_TMP")
    assert need > quantity_bytes(T.TMP, "TMP") * 9    # the 8Gi /tmp every pod had is far too small
