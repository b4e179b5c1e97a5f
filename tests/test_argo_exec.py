"""The rendered Argo documents, executed: tests/argo_exec.py reads what ``curate render`` wrote and runs it
as the workflow controller would (DAG, list steps and withParam fan-outs, parameters, retries, deadlines),
each pod a local subprocess against moto S3. The final store must equal a ``curate run`` of the same
recipe, byte for byte (``seconds`` in ``_stats`` aside, and the run's own URL in ``report.html``).

Small batch sizes (``PROFILES[*].batch_size`` patched before rendering) give several batches per stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.argo_exec import ArgoExecutor, Unsupported, load_documents

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_src(tmp_path_factory) -> Path:
    from libcurate.demo import build

    out = tmp_path_factory.mktemp("argo-exec") / "source"
    build(str(out), copies=1)          # 59 records, planted defects included
    return out


def upload(src: Path, url: str) -> None:
    from libcurate.storage import open_store

    store = open_store(url)
    for p in sorted(src.rglob("*")):
        if p.is_file():
            store.write_bytes(str(p.relative_to(src)), p.read_bytes())


def small_batches(monkeypatch, batch_size: int, **extra) -> None:
    from workflows import tables as T

    for name, prof in list(T.PROFILES.items()):
        monkeypatch.setitem(T.PROFILES, name, dataclasses.replace(prof, batch_size=batch_size,
                                                                  **extra.get(name, {})))


def render_docs(recipe: dict, tmp_path: Path, prefix: str) -> tuple[list[dict], str]:
    from workflows.render import render

    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # local image paths in some recipes: pods here can read them
        paths = render(str(path), str(tmp_path / "argo"), prefix=prefix)
    return load_documents(paths), str(path)


def s3_secret() -> dict[str, dict[str, str]]:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    return {"curate-s3": {k: os.environ[k] for k in keys}}


def curate_run(recipe_path: str, prefix: str) -> None:
    r = subprocess.run([sys.executable, "-m", "libcurate.cli", "run", recipe_path, "--prefix", prefix,
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def objects(url: str) -> dict[str, bytes]:
    from libcurate.storage import open_store

    store = open_store(url)
    return {rel: store.read_bytes(rel) for rel in store.list("")}


def store_diff(argo: str, local: str) -> tuple[int, list[str]]:
    """(objects compared, keys whose bytes differ) of two runs with the same object keys; ``seconds`` in
    ``_stats`` may differ, and the report names its own run's URL (the only file that does: checked)."""
    a, b = objects(argo), objects(local)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:20], sorted(set(b) - set(a))[:20])
    naming = sorted(k for k, v in a.items() if argo.encode() in v)
    assert all(k.endswith("/report.html") for k in naming), naming
    diff = []
    for k in sorted(a):
        x, y = a[k], b[k]
        if "/_stats/" in k and k.endswith(".json"):
            x, y = json.loads(x), json.loads(y)
            x.pop("seconds", None), y.pop("seconds", None)
        elif k in naming:
            x = x.replace(argo.encode(), local.encode())
        if x != y:
            diff.append(k)
    return len(a), diff


def assert_same_store(argo: str, local: str) -> int:
    n, diff = store_diff(argo, local)
    assert not diff, f"{len(diff)} objects differ from the `curate run` store: {diff[:20]}"
    return n


def ok(run) -> None:
    print(run.summary())
    assert run.phase == "Succeeded", run.message + "\n" + run.summary()


def raw_shard_count(url: str) -> int:
    from libcurate.storage import open_store

    return sum(1 for k in open_store(url).list("raw") if k.endswith(".tar"))


def spec_of(shards: list[str]) -> list[int]:
    from libcurate.runner import parse_shard_spec

    return sorted(i for s in shards for i in parse_shard_spec(s))


# -- 1. the demo recipe ----------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_recipe_equals_curate_run(tmp_path, demo_src, s3_bucket, monkeypatch):
    """recipes/demo.yaml (inputs in S3, 4 raw shards in batches of 2): every stage fans out over
    several pods, the GPU-profile score_clip runs on CPU by a recorded rewrite, and the store equals
    ``curate run``."""
    small_batches(monkeypatch, 2)
    upload(demo_src, f"{s3_bucket}/src")
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    recipe["storage"] = {"prefix": argo}
    recipe["stages"][0]["with"].update(annotations=f"{s3_bucket}/src/data.json", images=f"{s3_bucket}/src",
                                       shard_size=16)
    docs, path = render_docs(recipe, tmp_path, argo)
    run = ArgoExecutor(docs, secrets=s3_secret(), device_rewrite="cpu", max_pods=2,
                       workdir=str(tmp_path / "exec")).run()
    ok(run)
    n = raw_shard_count(argo)
    assert n == 4
    fanouts = [t["name"] for t in next(d for d in docs if d["kind"] == "WorkflowTemplate")["spec"]["templates"]
               if t["name"].endswith("-fanout")]
    assert len(fanouts) >= 6
    for fan in fanouts:
        pod = fan[:-len("-fanout")]
        assert len(run.pods_of(pod)) == 2 and spec_of(run.shards(pod)) == list(range(n)), pod
    gpu = [t for t in next(d for d in docs if d["kind"] == "WorkflowTemplate")["spec"]["templates"]
           if "nvidia.com/gpu" in t.get("container", {}).get("resources", {}).get("limits", {})]
    assert [t["name"] for t in gpu] == ["score-clip"]
    assert any(r.startswith("score-clip: --device cuda -> cpu") for r in run.rewrites), run.rewrites
    assert all(p.arg("--device") == "cpu" for p in run.pods if p.arg("--device"))
    curate_run(path, local)
    assert assert_same_store(argo, local) > 150


# -- 2. GPU-profile stages, run as rendered -----------------------------------------------------------
def test_gpu_profile_stages_equal_curate_run(tmp_path, demo_src, s3_bucket, monkeypatch):
    """score_clip (GPU profile) with ``device: cpu`` in its config and cluster on the GPU profile: the
    GPU templates run exactly as rendered (``--device cuda`` stays; the config's device wins, no rewrite),
    two pods at a time with the GPU fan-out's ``parallelism`` of 1 honoured."""
    small_batches(monkeypatch, 2, gpu={"parallelism": 1})
    upload(demo_src, f"{s3_bucket}/src")
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    recipe = {"name": "gpu-profile", "storage": {"prefix": argo}, "workers": 1, "device": "cpu", "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{s3_bucket}/src/data.json",
                                     "images": f"{s3_bucket}/src", "shard_size": 16}},
        {"stage": "score_clip", "with": {"model": "test-tiny-clip", "batch_size": 16, "device": "cpu"}},
        {"stage": "cluster", "with": {"method": "kmeans", "n_clusters": 3, "n_init": 2, "profile": "gpu"}},
        {"stage": "select", "with": {"score": "score_clip.cosine", "budget": 20,
                                     "strategy": {"kind": "cluster_proportional", "cluster": "cluster.cluster"}}},
        {"stage": "export", "with": {"formats": ["webdataset", "llava"]}}]}
    docs, path = render_docs(recipe, tmp_path, argo)
    run = ArgoExecutor(docs, secrets=s3_secret(), max_pods=2, workdir=str(tmp_path / "exec")).run()
    ok(run)
    assert not any("--device" in r for r in run.rewrites), run.rewrites
    clip = run.pods_of("score-clip")
    assert len(clip) == 2 and all(p.arg("--device") == "cuda" for p in clip)
    assert run.pods_of("cluster-fit")[0].arg("--device") == "cuda"
    assert spec_of(run.shards("score-clip")) == spec_of(run.shards("cluster")) == [0, 1, 2, 3]
    assert run.parallelism["main.score-clip"] == 1 and run.peak["main.score-clip"] == 1
    assert run.peak["main.ingest"] <= run.parallelism["main.ingest"]
    assert any("tolerations" in s for s in run.scheduling_only)
    curate_run(path, local)
    assert_same_store(argo, local)


@pytest.mark.slow
def test_score_reward_fanout_equals_curate_run(tmp_path, demo_src, s3_bucket, monkeypatch):
    small_batches(monkeypatch, 2)
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    recipe = {"name": "reward", "storage": {"prefix": argo}, "workers": 1, "device": "cpu", "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": str(demo_src / "data.json"),
                                     "images": str(demo_src), "shard_size": 16}},
        {"stage": "score_reward", "with": {"model": "test-tiny-reward", "device": "cpu"}}]}
    docs, path = render_docs(recipe, tmp_path, argo)
    run = ArgoExecutor(docs, secrets=s3_secret(), workdir=str(tmp_path / "exec")).run()
    assert run.phase == "Succeeded", run.message + "\n" + run.summary()
    curate_run(path, local)
    # each pod scores its own shards; batches never span shards, so the bytes equal the one-process run
    _, diff = store_diff(argo, local)
    assert not diff, f"score_reward outputs differ from `curate run`: {diff}"


# -- 3. the CronWorkflow's incremental path ----------------------------------------------------------
def test_cron_workflow_processes_only_new_shards(tmp_path, demo_src, s3_bucket, monkeypatch):
    """Run the CronWorkflow, append records to the annotations, run it again: ingest and the per-shard
    stages run only the new shard, select and export run again, and the store equals ``curate run`` with
    the same history. A run with ``ingest=false`` then skips both ingest steps and starts no fan-out."""
    small_batches(monkeypatch, 2)
    src = f"{s3_bucket}/src"
    upload(demo_src, src)
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    recipe = {"name": "nightly", "storage": {"prefix": argo}, "schedule": "0 3 * * *", "workers": 1,
              "device": "cpu", "stages": [
                  {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json",
                                               "images": src, "shard_size": 16}},
                  {"stage": "score_length", "with": {"tokenizer": "whitespace"}},
                  {"stage": "hash_image"},
                  {"stage": "select", "with": {"thresholds": {"score_length.words": {"min": 3}},
                                               "score": "score_length.chars", "budget": 25}},
                  {"stage": "export", "with": {"formats": ["llava"]}}]}
    docs, path = render_docs(recipe, tmp_path, argo)
    assert any(d["kind"] == "CronWorkflow" for d in docs)
    ex = ArgoExecutor(docs, secrets=s3_secret(), max_pods=2, workdir=str(tmp_path / "exec"))

    first = ex.run("CronWorkflow")
    ok(first)
    curate_run(path, local)
    n = raw_shard_count(argo)
    for stage in ("ingest", "score-length", "hash-image"):
        assert spec_of(first.shards(stage)) == list(range(n)), stage

    # new data: records appended to the annotations (a new segment: new shards, old ones untouched)
    data = json.loads((demo_src / "data.json").read_text())
    extra = [dict(rec, id=f"{rec['id']}-new") for rec in data[:20]]
    (tmp_path / "data.json").write_text(json.dumps(data + extra))
    from libcurate.storage import open_store

    open_store(src).write_bytes("data.json", (tmp_path / "data.json").read_bytes())
    second = ex.run("CronWorkflow")
    ok(second)
    m = raw_shard_count(argo)
    assert m == n + 2
    for stage in ("ingest", "score-length", "hash-image"):
        assert spec_of(second.shards(stage)) == list(range(n, m)), (stage, second.shards(stage))
    batches = [json.loads(p.result) for p in second.pods if p.template.startswith("plan-batches")]
    assert len(batches) == 3 and all(spec_of([b["shards"] for b in v]) == list(range(n, m)) for v in batches)
    assert [p.phase for p in second.pods_of("select") + second.pods_of("export")] == ["Succeeded"] * 2
    curate_run(path, local)
    assert_same_store(argo, local)

    # ingest=false (another producer writes raw/): both ingest steps skipped, nothing left to do
    third = ex.run("Workflow", parameters={"ingest": "false"})
    ok(third)
    assert third.nodes["main.ingest-batches"] == third.nodes["main.ingest"] == "Skipped", third.nodes
    assert third.nodes["main.hash-image.hash-image"] == "Skipped"     # an empty withParam skips the pods
    assert {p.template for p in third.pods} == {"plan-batches", "select", "export"}
    assert_same_store(argo, local)


# -- 4. retries and deadlines --------------------------------------------------------------------------
def _ingest_only(tmp_path, s3_bucket, demo_src, annotations=None, prefix="argo", **extra):
    recipe = {"name": "ingest-only", "storage": {"prefix": f"{s3_bucket}/{prefix}"}, "workers": 1, **extra, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": annotations or str(demo_src / "data.json"),
                                     "images": str(demo_src), "shard_size": 32}}]}
    return render_docs(recipe, tmp_path, f"{s3_bucket}/{prefix}")


def test_retry_after_exit_1_and_no_retry_after_exit_3(tmp_path, demo_src, s3_bucket, monkeypatch):
    small_batches(monkeypatch, 1)
    docs, _ = _ingest_only(tmp_path, s3_bucket, demo_src)

    def crash_first(pod, attempt, argv):     # the pod's first attempt dies with exit 1 (a node fault)
        if pod.template == "ingest" and attempt == 0:
            return [sys.executable, "-c", "import sys; sys.exit(1)"]
        return argv

    run = ArgoExecutor(docs, secrets=s3_secret(), wrap=crash_first, backoff_scale=0.01,
                       workdir=str(tmp_path / "a")).run()
    ok(run)
    pods = run.pods_of("ingest")
    assert len(pods) == 2 and all([a.exit_code for a in p.attempts] == [1, 0] for p in pods)
    assert all(p.attempts[0].wrapped and not p.attempts[1].wrapped for p in pods)
    assert all(p.waits == [pytest.approx(0.6)] for p in pods)      # backoff 1m x factor^0, scaled by 0.01
    assert raw_shard_count(f"{s3_bucket}/argo") == 2

    # a permanent input error (the annotations do not exist): exit 3, never retried, the workflow fails
    docs, _ = _ingest_only(tmp_path, s3_bucket, demo_src, annotations=str(tmp_path / "missing.json"),
                           prefix="missing")
    run = ArgoExecutor(docs, secrets=s3_secret(), workdir=str(tmp_path / "b")).run()
    print(run.summary())
    assert run.phase == "Failed"
    (pod,) = run.pods
    assert pod.template == "plan-batches-ingest" and [a.exit_code for a in pod.attempts] == [3]
    assert "annotations not found" in Path(pod.attempts[0].log).read_text()
    assert run.nodes["main.ingest"] == "Omitted"


def test_deadline_kills_and_retries_until_the_limit(tmp_path, demo_src, s3_bucket, monkeypatch):
    small_batches(monkeypatch, 1)
    docs, _ = _ingest_only(tmp_path, s3_bucket, demo_src)
    hang = lambda pod, attempt, argv: [sys.executable, "-c", "import time; time.sleep(120)"]  # noqa: E731
    # the list step's 2 h deadline scaled to 1 s
    run = ArgoExecutor(docs, secrets=s3_secret(), wrap=hang, deadline_scale=1 / 7200,
                       workdir=str(tmp_path / "a")).run()
    print(run.summary())
    assert run.phase == "Failed"
    (pod,) = run.pods
    assert [a.exit_code for a in pod.attempts] == [137] * 4 and all(a.killed for a in pod.attempts)  # limit 3
    assert all(a.seconds < 30 for a in pod.attempts)
    assert run.nodes["main.ingest"] == "Omitted"


def test_missing_required_secret_fails_the_pod(tmp_path, demo_src, s3_bucket):
    docs, _ = _ingest_only(tmp_path, s3_bucket, demo_src)
    wt = next(d for d in docs if d["kind"] == "WorkflowTemplate")
    for t in wt["spec"]["templates"]:
        for ref in t.get("container", {}).get("envFrom", []):
            ref["secretRef"]["optional"] = False
    run = ArgoExecutor(docs, secrets={}, workdir=str(tmp_path / "a")).run()
    assert run.phase == "Failed" and "CreateContainerConfigError" in run.message and not run.pods


# -- 5. whatever the harness does not implement fails ----------------------------------------------------
def _template(docs, name):
    wt = next(d for d in docs if d["kind"] == "WorkflowTemplate")
    return next(t for t in wt["spec"]["templates"] if t["name"] == name)


def _task(docs, dag, name):
    return next(t for t in _template(docs, dag)["dag"]["tasks"] if t["name"] == name)


def _wt(docs):
    return next(d for d in docs if d["kind"] == "WorkflowTemplate")


def _kind(kind):
    return lambda docs: next(d for d in docs if d["kind"] == kind)


def _ctr(docs):
    return _template(docs, "ingest")["container"]


def _main_ingest(docs):
    return _task(docs, "main", "ingest")


# case -> (what the error says, how the rendered documents are changed)
INJECTIONS = {
    "template podSpecPatch": (r"podSpecPatch: field not understood",
                              lambda d: _template(d, "ingest").update(podSpecPatch="{}")),
    "template outputs": (r"outputs: field not understood",
                         lambda d: _template(d, "ingest").update(outputs={"parameters": [{"name": "x"}]})),
    "container env": (r"container.env: field not understood",
                      lambda d: _ctr(d).update(env=[{"name": "X", "value": "1"}])),
    "container workingDir": (r"workingDir: field not understood", lambda d: _ctr(d).update(workingDir="/app")),
    "resources key": (r"amd.com/gpu: key not understood",
                      lambda d: _ctr(d)["resources"]["limits"].update({"amd.com/gpu": "1"})),
    "task continueOn": (r"continueOn: field not understood",
                        lambda d: _main_ingest(d).update(continueOn={"failed": True})),
    "task dependencies": (r"dependencies: field not understood",
                          lambda d: _main_ingest(d).update(dependencies=["ingest-batches"])),
    "spec onExit": (r"onExit: field not understood", lambda d: _wt(d)["spec"].update(onExit="main")),
    "workflow spec entrypoint": (r"Workflow.spec.entrypoint: field not understood",
                                 lambda d: _kind("Workflow")(d)["spec"].update(entrypoint="main")),
    "retry expression": (r"expression: value .* not implemented",
                         lambda d: _template(d, "ingest")["retryStrategy"].update(
                             expression="asInt(lastRetry.exitCode) > 3")),
    "retry policy": (r"retryPolicy: value 'OnError' not implemented",
                     lambda d: _template(d, "ingest")["retryStrategy"].update(retryPolicy="OnError")),
    "depends or": (r"only '&&' of task names",
                   lambda d: _main_ingest(d).update(depends="ingest-batches || ingest-batches")),
    "depends result": (r"only '&&' of task names",
                       lambda d: _main_ingest(d).update(depends="ingest-batches.Succeeded")),
    "when not equal": (r"only 'A == B'",
                       lambda d: _main_ingest(d).update(when="{{workflow.parameters.ingest}} != false")),
    "when and": (r"only 'A == B'", lambda d: _main_ingest(d).update(when="a == a && b == b")),
    "expression template": (r"jsonpath.* not implemented",
                            lambda d: _task(d, "ingest-fanout", "ingest").update(
                                withParam="{{=jsonpath(inputs.parameters.batches, '$')}}")),
    "outputs.parameters reference": (r"outputs.parameters.x}} not implemented",
                                     lambda d: _main_ingest(d)["arguments"]["parameters"][0].update(
                                         value="{{tasks.ingest-batches.outputs.parameters.x}}")),
    "undeclared input": (r"not a declared input", lambda d: _ctr(d)["args"].append("{{inputs.parameters.nope}}")),
    "command not python": (r"only the image's python", lambda d: _ctr(d).update(command=["sh", "-c"])),
    "foreign image": (r"only curate-cpu / curate-gpu", lambda d: _ctr(d).update(image="busybox:1")),
    "hostPath volume": (r"hostPath: field not understood",
                        lambda d: _wt(d)["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    "emptyDir elsewhere": (r"emptyDir at /data",
                           lambda d: _ctr(d)["volumeMounts"].append({"name": "tmp", "mountPath": "/data"})),
    "configmap annotation": (r"annotation 'other' not understood",
                             lambda d: _kind("ConfigMap")(d)["metadata"]["annotations"].update({"other": "x"})),
    "edited recipe": (r"does not match its curate/recipe-sha256",
                      lambda d: _kind("ConfigMap")(d)["data"].update({"recipe.yaml": "name: other\n"})),
    "cron concurrency": (r"concurrencyPolicy: value 'Allow'",
                         lambda d: _kind("CronWorkflow")(d)["spec"].update(concurrencyPolicy="Allow")),
    "cron workflowSpec": (r"workflowSpec.podGC: field not understood",
                          lambda d: _kind("CronWorkflow")(d)["spec"]["workflowSpec"].update(podGC={})),
}


@pytest.fixture(scope="module")
def ingest_docs(tmp_path_factory, demo_src):
    tmp = tmp_path_factory.mktemp("inject")
    return _ingest_only(tmp, "s3://unused-bucket", demo_src, schedule="0 3 * * *")[0]


@pytest.mark.parametrize("name", ["full", "small", "selection", "budget", "demo"])
def test_rendered_documents_are_understood(tmp_path, name):
    """Everything tests/test_workflows.py renders (LLM secrets, GPU semaphores, fit stages, a cron) and
    the demo: a feature added to workflows/dag.py fails here until the harness implements it."""
    from tests.test_workflows import RECIPES

    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text()) if name == "demo" else RECIPES[name]
    docs, _ = render_docs(recipe, tmp_path, "s3://bucket/run")
    ex = ArgoExecutor(docs, workdir=str(tmp_path / "exec"))
    assert ex.templates["main"]["dag"]["tasks"]
    assert any(s.startswith("WorkflowTemplate.spec.templates[].container.resources") for s in ex.sched)


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_unknown_field_or_form_raises(ingest_docs, tmp_path, case):
    docs = copy.deepcopy(ingest_docs)
    match, inject = INJECTIONS[case]
    inject(docs)
    with pytest.raises(Unsupported, match=match):
        ArgoExecutor(docs, workdir=str(tmp_path))


def test_parameter_outside_its_enum_raises(ingest_docs, tmp_path):
    ex = ArgoExecutor(copy.deepcopy(ingest_docs), workdir=str(tmp_path))
    with pytest.raises(Unsupported, match="enum"):
        ex.run(parameters={"ingest": "maybe"})
    with pytest.raises(Unsupported, match="not a parameter"):
        ex.run(parameters={"shards": "0"})


# -- DAG semantics with stub pods (fast: each pod is a trivial process) ---------------------------------
def _stub(batches: list | str, sleep: float = 0.0):
    """List steps print ``batches``; every other pod sleeps and exits 0."""
    out = batches if isinstance(batches, str) else json.dumps(batches)

    def wrap(pod, attempt, argv):
        if pod.template.startswith("plan-batches"):
            return [sys.executable, "-c", f"print({out!r})"]
        return [sys.executable, "-c", f"import time; time.sleep({sleep})"]
    return wrap


def test_fanout_parallelism_caps_running_pods(ingest_docs, tmp_path):
    docs = copy.deepcopy(ingest_docs)
    _template(docs, "ingest-fanout")["parallelism"] = 2
    batches = [{"shards": str(i)} for i in range(5)]
    run = ArgoExecutor(docs, max_pods=4, wrap=_stub(batches, 0.5), workdir=str(tmp_path)).run()
    ok(run)
    assert run.shards("ingest") == ["0", "1", "2", "3", "4"]
    assert run.parallelism["main.ingest"] == 2 and run.peak["main.ingest"] == 2
    assert run.nodes["main.ingest"] == "Succeeded" and run.nodes['main.ingest.ingest(4:{"shards":"4"})'] == "Succeeded"


def test_with_items_fans_out_over_the_literal_list(ingest_docs, tmp_path):
    docs = copy.deepcopy(ingest_docs)
    task = _task(docs, "ingest-fanout", "ingest")
    del task["withParam"]
    task["withItems"] = [{"shards": "7"}, {"shards": "9-11"}]
    run = ArgoExecutor(docs, wrap=_stub([]), workdir=str(tmp_path)).run()
    ok(run)
    assert run.shards("ingest") == ["7", "9-11"]


def test_list_step_output_that_is_not_a_json_list_fails_the_workflow(ingest_docs, tmp_path):
    run = ArgoExecutor(copy.deepcopy(ingest_docs), wrap=_stub("shards 0-3"), workdir=str(tmp_path)).run()
    assert run.phase == "Failed" and "withParam is not JSON" in run.message
    assert run.nodes["main.ingest.ingest"] == "Failed" and run.pods_of("ingest") == []
