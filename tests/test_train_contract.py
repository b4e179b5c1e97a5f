"""The trainer contract and the ``train`` stage: units, labels, per-sample outputs, exit codes, the cache,
the Argo fan-out. The trainer here is a tiny script that obeys (or breaks) the contract on command, so
every test runs in seconds."""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from libcurate.columns import gather
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import build_stage, context, run_recipe, run_stage
from libcurate.stage import PermanentInputError, StageContext
from libcurate.storage import open_store
from libcurate.train import contract as C
from libcurate.train.stage import COLLECT_ONLY_ENV

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "data" / "argo-schemas"
TASKS = ("a", "b", "c")

# The fake trainer: counts its launches, then behaves as MODE says (argv: data workdir mode counter).
TRAINER = textwrap.dedent("""
    import json, os, sys
    data, workdir, mode, counter = sys.argv[1:5]
    with open(counter, "a") as f:
        f.write(os.environ["CURATE_UNIT"] + "\\n")
    keys = [k.strip() for k in open(os.path.join(data, "keys.txt")) if k.strip()]
    assert len(json.load(open(os.path.join(data, "llava", "data.json")))) == len(keys)
    if mode == "exit3":
        sys.exit(3)
    if mode == "exit1":
        sys.exit(1)
    if mode == "sleep":
        import time; time.sleep(30)
    evaluated = 0
    if len(sys.argv) > 5 and sys.argv[5]:                     # {eval}: a local LLaVA JSON + its images
        for rec in json.load(open(sys.argv[5])):
            assert os.path.exists(os.path.join(os.path.dirname(sys.argv[5]), rec["image"]))
            evaluated += 1
    if mode != "noresult":
        out = keys[:-1] if mode == "missing_output" else keys
        with open(os.path.join(workdir, "outputs.jsonl"), "w") as f:
            for i, k in enumerate(out):
                f.write(json.dumps({"key": k, "difficulty": i / 10}) + "\\n")
        json.dump({"eval_loss": len(keys) / 10, "world_size": os.environ["CURATE_WORLD_SIZE"],
                   "evaluated": evaluated},
                  open(os.path.join(workdir, "result.json"), "w"))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """12 LLaVA samples in three tasks (the units), tiny distinct images."""
    d = tmp_path_factory.mktemp("src")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    recs = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
        recs.append({"id": str(i), "image": f"images/{i}.png", "task": TASKS[i % 3], "y": 30 - 2 * i,
                     "conversations": [{"from": "human", "value": f"<image>\nWhat is {i}?"},
                                       {"from": "gpt", "value": f"It is number {i}."}]})
        if i < 11:
            recs[-1]["x"] = float(i * i)             # sample 11 lacks feature x
    (d / "data.json").write_text(json.dumps(recs))
    (d / "trainer.py").write_text(TRAINER)
    return d


def _recipe(tmp: Path, source: Path, mode: str = "ok", unit_by: str = "ingest.task", prefix: str | None = None,
            **train) -> str:
    counter = tmp / "launches.txt"
    d = {"name": "t", "storage": {"prefix": prefix or str(tmp / "run")},
         "stages": [{"stage": "ingest", "with": {"format": "llava", "annotations": str(source / "data.json"),
                                                 "images": str(source), "shard_size": 5}},
                    {"stage": "train", "with": {
                        "unit_by": unit_by, "outputs": ["difficulty"], "label": "eval_loss",
                        "trainer": {"command": ["python", str(source / "trainer.py")],
                                    "args": ["{data}", "{workdir}", mode, str(counter), "{eval}"], "gpus": 2,
                                    **train.pop("trainer", {})}, **train}}]}
    path = tmp / f"recipe-{mode}.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _launches(tmp: Path) -> list[str]:
    p = tmp / "launches.txt"
    return p.read_text().split() if p.exists() else []


def _fields(recipe_path: str, fields) -> dict:
    r = load_recipe(recipe_path)
    ps = plan(r)
    store = open_store(r.prefix, r.storage_options)
    ctx = StageContext(store=store, prefix="x", upstream={p.id: p.prefix for p in ps})
    t = gather(ctx, fields=fields)
    return {"keys": [k.decode() for k in t.keys], **t.values}


def test_units_labels_outputs_and_cache(tmp_path, source):
    path = _recipe(tmp_path, source)
    run_recipe(load_recipe(path), progress=False)
    assert sorted(_launches(tmp_path)) == list(TASKS)          # one trainer run per unit
    v = _fields(path, ["train.unit", "train.label", "train.quality", "train.difficulty", "ingest.task"])
    assert [u.decode() for u in v["train.unit"]] == [t.decode() for t in v["ingest.task"]]
    assert np.allclose(v["train.label"], 0.4) and np.allclose(v["train.quality"], -0.4)   # 4 samples a unit
    assert np.isfinite(v["train.difficulty"]).all()
    ps = plan(load_recipe(path))[-1]
    res = json.loads((tmp_path / "run" / ps.prefix / "_units" / "a" / "result.json").read_text())
    assert res["world_size"] == "2"                            # trainer.gpus -> CURATE_WORLD_SIZE
    assert not (tmp_path / "run" / ps.prefix / "_units" / "a" / "data").exists()   # no second copy of images
    assert json.loads((tmp_path / "run" / ps.prefix / "_units" / "a" / "unit.json").read_text())["samples"] == 4

    # A re-run trains nothing; nor does a re-fit (fit marker gone): every unit is cached by its signature.
    run_recipe(load_recipe(path), progress=False)
    os.unlink(tmp_path / "run" / ps.prefix / "_done" / "_fit")
    run_recipe(load_recipe(path), progress=False)
    assert len(_launches(tmp_path)) == 3
    # A unit whose result was lost (or whose samples changed) trains again, alone.
    os.unlink(tmp_path / "run" / ps.prefix / "_units" / "b" / "_done")
    os.unlink(tmp_path / "run" / ps.prefix / "_done" / "_fit")
    run_recipe(load_recipe(path), progress=False)
    assert _launches(tmp_path) [3:] == ["b"]


def test_unit_all_and_excluded_samples(tmp_path, source):
    path = _recipe(tmp_path, source, unit_by="all")
    run_recipe(load_recipe(path), progress=False)
    assert _launches(tmp_path) == ["all"]
    v = _fields(path, ["train.label", "train.difficulty"])
    assert np.allclose(v["train.label"], 1.2) and sorted(v["train.difficulty"]) == [i / 10 for i in range(12)]


def test_on_s3_results_uploaded_and_eval_downloaded(tmp_path, source, s3_bucket):
    """An S3 run root: the unit works in a local temporary directory; result.json, outputs.jsonl, the log
    and unit.json go to the store (the staged data does not); an s3:// eval set is downloaded for the
    trainer with its images."""
    from libcurate.storage import s3_client

    bucket = s3_bucket[len("s3://"):]
    ev = [{"id": "e0", "image": "eval_images/e0.png",
           "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}]
    s3_client().put_object(Bucket=bucket, Key="src/eval.json", Body=json.dumps(ev).encode())
    s3_client().put_object(Bucket=bucket, Key="src/eval_images/e0.png", Body=(source / "images" / "0.png").read_bytes())
    path = _recipe(tmp_path, source, prefix=f"{s3_bucket}/run", eval=f"{s3_bucket}/src/eval.json")
    run_recipe(load_recipe(path), progress=False)
    run_recipe(load_recipe(path), progress=False)
    assert sorted(_launches(tmp_path)) == list(TASKS)
    r = load_recipe(path)
    store = open_store(r.prefix)
    ps = plan(r)[-1]
    files = store.list(f"{ps.prefix}/_units/a")
    assert {"result.json", "outputs.jsonl", "trainer.log", "unit.json", "_done"} <= set(files)
    assert not any(f.startswith(("data/", "eval/")) for f in files)
    assert json.loads(store.read_text(f"{ps.prefix}/_units/a/result.json"))["evaluated"] == 1
    v = _fields(path, ["train.label", "train.difficulty"])
    assert np.allclose(v["train.label"], 0.4) and np.isfinite(v["train.difficulty"]).all()


def test_features_in_one_named_order_and_missing_ones_excluded(tmp_path, source):
    """features.npy columns follow the recipe's list (not alphabetical), scalars min-max mapped to [-1, 1]
    over the samples that enter a unit; a sample missing a feature is in no unit, with its reason."""
    from libcurate.train.units import minmax_pm1

    feats = ["ingest.metadata.y", "ingest.metadata.x"]
    path = _recipe(tmp_path, source, unit_by="all", features=feats, keep_data=True)
    run_recipe(load_recipe(path), progress=False)
    data = tmp_path / "run" / plan(load_recipe(path))[-1].prefix / "_units" / "all" / "data"
    x, meta = C.load_features(str(data))
    assert meta["names"] == feats and meta["dims"] == [1, 1]
    keys = C.load_keys(str(data))
    v = _fields(path, ["ingest.metadata.x", "ingest.metadata.y", "train.excluded", "train.label"])
    row = {k: i for i, k in enumerate(v["keys"])}
    rows = [row[k] for k in keys]
    assert len(keys) == 11
    assert np.allclose(x[:, 0], minmax_pm1(v["ingest.metadata.y"][rows]))
    assert np.allclose(x[:, 1], minmax_pm1(v["ingest.metadata.x"][rows]))
    assert x.min() == -1.0 and x.max() == 1.0
    missing = np.flatnonzero(np.isnan(v["ingest.metadata.x"]))
    assert len(missing) == 1 and v["train.excluded"][missing[0]] == b"missing_feature: ingest.metadata.x"
    assert np.isnan(v["train.label"][missing[0]])


def test_numeric_unit_ids_and_small_units(tmp_path, source):
    """A numeric unit field gives ids "1" (not "1.0"); units below min_unit_size are not trained and
    their samples carry the reason."""
    path = _recipe(tmp_path, source, unit_by="ingest.n_images")
    run_recipe(load_recipe(path), progress=False)
    assert _launches(tmp_path) == ["1"]
    assert {u.decode() for u in _fields(path, ["train.unit"])["train.unit"]} == {"1"}
    small = tmp_path / "small"
    small.mkdir()
    path = _recipe(small, source, unit_by="ingest.metadata.y", min_unit_size=2)   # 12 units of one sample
    run_recipe(load_recipe(path), progress=False)
    assert _launches(small) == []
    v = _fields(path, ["train.excluded", "train.unit"])
    assert all(e.startswith(b"unit_too_small: ") for e in v["train.excluded"])
    assert np.isnan(v["train.unit"]).all()                    # no sample has a unit (the column is absent)


def test_plan_units_on_columns(tmp_path):
    """The plain function: first reason wins, numeric ids sort numerically, rows stay in raw order."""
    from libcurate.columns import Table
    from libcurate.train.units import plan_units

    keys = np.array([f"{i:024x}".encode() for i in range(7)], dtype="S24")
    t = Table(keys=keys, shard_offsets=np.array([0, 4, 7]), shards=["shard-000000.tar", "shard-000001.tar"],
              values={"c.cluster": np.array([10, 2, np.nan, 2, 10, 2, 3.0]),
                      "s.f": np.array([1.0, 2.0, 3.0, np.nan, 5.0, 6.0, 7.0])},
              quarantine=np.array([0, 0, 0, 0, 0, 1, 0], np.int32), quarantine_reasons=["", "score_clip: bad"])
    plan = plan_units(t, "c.cluster", ("s.f",), 2, str(tmp_path))
    assert plan.units == ["10"]                                # "2" keeps 1 sample, "3" one: too small
    assert plan.rows["10"].tolist() == [0, 4]
    why = [plan.reasons[c] for c in plan.excluded_code]
    assert why == ["", "unit_too_small: 2 has 1 < 2", "no_unit: c.cluster", "missing_feature: s.f", "",
                   "quarantined: score_clip: bad", "unit_too_small: 3 has 1 < 2"]
    assert plan.features[[0, 4], 0].tolist() == [-1.0, 1.0] and not plan.features[[1, 2, 3, 5, 6]].any()
    plan.close()


def _job(path: str, *extra: str) -> int:
    from jobs._main import main

    return main("train", ["--recipe", path, *extra])


@pytest.mark.parametrize("mode,code,exc", [("exit3", 3, C.TrainerPermanentError),
                                           ("exit1", 1, C.TrainerRetryableError),
                                           ("noresult", 3, C.ResultMissing),
                                           ("missing_output", 3, C.ResultMissing)])
def test_failures_and_exit_codes(tmp_path, source, mode, code, exc):
    path = _recipe(tmp_path, source, mode=mode, unit_by="all")
    r = load_recipe(path)
    run_recipe(r, progress=False, only=["ingest"])
    ps = plan(r)[-1]
    with pytest.raises(exc):
        run_stage(ps, r, open_store(r.prefix), progress=False)
    assert issubclass(exc, PermanentInputError) == (code == 3)
    # No label was invented: no unit done marker, no fit, no sidecar.
    unit_dir = tmp_path / "run" / ps.prefix / "_units" / "all"
    assert not (unit_dir / "_done").exists() and not (tmp_path / "run" / ps.prefix / "_done").exists()
    assert _job(path) == code                                  # the job entrypoint's contract code
    assert (unit_dir / "trainer.log").exists()


def test_stale_result_is_never_read(tmp_path, source):
    """A result.json left by an earlier attempt must not stand in for a run that wrote none."""
    ok = _recipe(tmp_path, source, unit_by="all")
    run_recipe(load_recipe(ok), progress=False)
    bad = _recipe(tmp_path, source, mode="noresult", unit_by="all", outputs=[])
    r = load_recipe(bad)
    ps = plan(r)[-1]
    # same unit directory layout under the new config's prefix: plant a result there first
    unit_dir = tmp_path / "run" / ps.prefix / "_units" / "all"
    unit_dir.mkdir(parents=True)
    (unit_dir / "result.json").write_text(json.dumps({"eval_loss": 0.1}))
    with pytest.raises(C.ResultMissing):
        run_stage(ps, r, open_store(r.prefix), progress=False)


def test_timeout_is_retryable(tmp_path, source):
    path = _recipe(tmp_path, source, mode="sleep", unit_by="all", trainer={"timeout_s": 1})
    r = load_recipe(path)
    run_recipe(r, progress=False, only=["ingest"])
    with pytest.raises(C.TrainerRetryableError, match="timeout"):
        run_stage(plan(r)[-1], r, open_store(r.prefix), progress=False)


def test_result_validation(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"eval_loss": float("nan")}).replace("NaN", "NaN"))
    with pytest.raises(C.ResultMissing, match="finite"):
        C.read_result(str(tmp_path), "u", ["k1"], "eval_loss")
    (tmp_path / "result.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(C.ResultMissing, match="eval_loss"):
        C.read_result(str(tmp_path), "u", ["k1"], "eval_loss")
    (tmp_path / "result.json").write_text(json.dumps({"eval_loss": 2}))
    (tmp_path / "outputs.jsonl").write_text('{"key": "k1", "difficulty": 1}\n{"key": "zz", "difficulty": 1}\n')
    with pytest.raises(C.ResultMissing, match="not a sample"):
        C.read_result(str(tmp_path), "u", ["k1"], "eval_loss", ("difficulty",))
    (tmp_path / "outputs.jsonl").write_text('{"key": "k1", "difficulty": 1.5}\n')
    r = C.read_result(str(tmp_path), "u", ["k1"], "eval_loss", ("difficulty",))
    assert r.label == 2.0 and r.outputs["difficulty"].tolist() == [1.5]
    with pytest.raises(PermanentInputError, match="placeholder"):
        C.TrainerSpec.from_dict({"command": ["x", "{dta}"]})
    with pytest.raises(PermanentInputError, match="credentials"):
        C.TrainerSpec.from_dict({"command": ["x"], "env": {"HF_HOME": "/tmp", "WANDB_API_KEY": "abc"}})
    assert C.TrainerSpec.from_dict({"command": ["x"], "env": {"HF_HOME": "/tmp/hf"}}).env == {"HF_HOME": "/tmp/hf"}


def test_argo_unit_jobs_and_collect_only(tmp_path, source, capsys):
    """The pods' path: list the undone units, train one per call, the fit pod only collects."""
    from jobs.train_unit import main as unit_main

    path = _recipe(tmp_path, source)
    run_recipe(load_recipe(path), progress=False, only=["ingest"])
    args = ["--recipe", path, "--stage-id", "train"]
    assert unit_main(args + ["--list"]) == 0
    assert [u["unit"] for u in json.loads(capsys.readouterr().out)] == list(TASKS)
    assert unit_main(args + ["--unit", "b"]) == 0
    assert unit_main(args + ["--unit", "nope"]) == 3
    assert unit_main(args + ["--list"]) == 0
    assert [u["unit"] for u in json.loads(capsys.readouterr().out)] == ["a", "c"]
    assert unit_main(args + ["--collect"]) == 1                # units missing: the collector trains nothing
    assert _launches(tmp_path) == ["b"]
    for u in ("a", "c"):
        assert unit_main(args + ["--unit", u]) == 0
    assert unit_main(args + ["--collect"]) == 0 and _job(path, "--phase", "write") == 0
    assert _launches(tmp_path) == ["b", "a", "c"] and COLLECT_ONLY_ENV not in os.environ


# -- Argo rendering --------------------------------------------------------------------------------
def _ig4(trainer: dict | None = None) -> dict:
    return {"name": "ig4", "storage": {"prefix": "s3://curate-test/runs/ig4"},
         "stages": [{"stage": "ingest", "with": {"format": "llava", "annotations": "s3://curate-test/src/d.json",
                                                 "images": "s3://curate-test/src"}},
                    {"stage": "score_clip"},
                    {"stage": "cluster", "with": {"method": "balanced", "n_clusters": 30}},
                    {"stage": "train", "as": "subset_train", "with": {
                        "unit_by": "cluster.cluster", "eval": "s3://curate-test/src/eval.json",
                        "trainer": {"command": ["torchrun", "--nproc_per_node", "{world_size}", "train.py"],
                                    "args": ["--data", "{data}"], "gpus": 4, "memory": "200Gi",
                                    "timeout_s": 7200, "image": "ghcr.io/acme/llava-curate:1.0",
                                    **(trainer or {})}}},
                    {"stage": "select", "with": {"score": "subset_train.quality", "budget": 200}},
                    {"stage": "export"}]}


def _render(tmp_path: Path, trainer: dict | None = None) -> dict:
    from workflows.render import render

    tmp_path.mkdir(exist_ok=True)
    p = tmp_path / "ig4.yaml"
    p.write_text(yaml.safe_dump(_ig4(trainer)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = render(str(p), str(tmp_path / "out"), registry="registry.example.com/curate")
    return {Path(x).stem: yaml.safe_load(Path(x).read_text()) for x in paths}


@pytest.mark.parametrize("version", ["v3.6.10", "v4.1.2"])
def test_train_fanout_renders_and_validates(tmp_path, version):
    docs = _render(tmp_path)
    schema = json.loads((SCHEMAS / f"argo-workflows-{version}.schema.json").read_text())
    for stem, doc in docs.items():
        if doc["apiVersion"].startswith("argoproj.io"):
            v = jsonschema.Draft7Validator({"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{doc['kind']}",
                                            "definitions": schema["definitions"]})
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(doc)]
            assert not errors, errors[:5]
    wt = docs["ig4-workflowtemplate"]
    tpl = {t["name"]: t for t in wt["spec"]["templates"]}
    unit = tpl["subset-train-train-unit"]
    res = unit["container"]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"
    assert res["limits"]["memory"] == "200Gi"
    assert unit["container"]["image"] == "ghcr.io/acme/llava-curate:1.0"
    assert unit["container"]["command"] == ["python", "-m", "jobs.train_unit"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in unit["tolerations"]
    assert unit["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert int(unit["activeDeadlineSeconds"]) == 7200 + C.POD_SLACK_S
    assert unit["retryStrategy"]["expression"] == "asInt(lastRetry.exitCode) != 3"
    assert unit["synchronization"]["semaphores"]
    fan = tpl["subset-train-train"]
    assert fan["parallelism"] >= 1 and fan["dag"]["tasks"][0]["withParam"] == "{{inputs.parameters.units}}"
    # The collector and the list step are CPU pods: no GPU, no GPU toleration.
    for name in ("subset-train-fit", "subset-train-units"):
        assert "nvidia.com/gpu" not in tpl[name]["container"]["resources"]["requests"]
        assert "tolerations" not in tpl[name]
    assert tpl["subset-train-fit"]["container"]["command"] == ["python", "-m", "jobs.train_unit"]
    assert "--collect" in tpl["subset-train-fit"]["container"]["args"]
    main = {t["name"]: t for t in tpl["main"]["dag"]["tasks"]}
    assert main["subset-train-units"]["depends"] == "cluster"
    assert main["subset-train-train"]["depends"] == "subset-train-units"
    assert main["subset-train-fit"]["depends"] == "subset-train-train"
    assert main["select"]["depends"] == "subset-train"


def _tmp_sizes(wt: dict) -> dict[str, str]:
    """template name -> sizeLimit of the emptyDir its container mounts at /tmp."""
    vols = {v["name"]: v for v in wt["spec"]["volumes"]}
    return {t["name"]: vols[m["name"]]["emptyDir"]["sizeLimit"] for t in wt["spec"]["templates"] if "container" in t
            for m in t["container"]["volumeMounts"] if m["mountPath"] == "/tmp"}


def test_trainer_scratch_sizes_the_unit_pods_tmp_and_not_the_hash(tmp_path):
    from workflows import tables as T

    default = _tmp_sizes(_render(tmp_path / "a")["ig4-workflowtemplate"])
    assert default["subset-train-train-unit"] == C.SCRATCH_DEFAULT
    # the default holds Self-Filter's full-data unit at the seed's size: its images at 150 KB each
    assert C.quantity_bytes(C.SCRATCH_DEFAULT, "x") >= 157_712 * 150_000
    # the list and collect pods gather every row's features, as a fit: the global /tmp; shard pods 8Gi
    assert default["subset-train-units"] == default["subset-train-fit"] == T.GLOBAL_TMP
    assert default["score-clip"] == default["plan-batches"] == T.TMP == "8Gi"
    wt = _render(tmp_path / "b", {"scratch": "300Gi"})["ig4-workflowtemplate"]
    assert _tmp_sizes(wt) == {**default, "subset-train-train-unit": "300Gi"}
    unit = next(t for t in wt["spec"]["templates"] if t["name"] == "subset-train-train-unit")
    assert unit["container"]["resources"]["requests"]["ephemeral-storage"] == "300Gi"
    # how it runs, not what it computes: the same stage prefix, so nothing re-trains
    prefix = {}
    for label, trainer in (("default", None), ("scratch", {"scratch": "300Gi"}), ("seed", {"seed": 1})):
        stages = plan(load_recipe(_ig4(trainer)))
        prefix[label] = next(ps.prefix for ps in stages if ps.id == "subset_train")
    assert prefix["scratch"] == prefix["default"] != prefix["seed"]


@pytest.mark.parametrize("key,value", [("scratch", "24GB"), ("scratch", "0Gi"), ("scratch", 24), ("memory", "lots")])
def test_bad_trainer_size_fails_at_recipe_load(key, value):
    with pytest.raises(PermanentInputError, match=rf"trainer\.{key}: {value!r} is not a size"):
        plan(load_recipe(_ig4({key: value})))


# -- the rendered fan-out, executed (tests/argo_exec.py: pods as local subprocesses against moto S3) ----
def _argo_recipe(source: Path, bucket: str, name: str, mode: str, counter: Path) -> dict:
    return {"name": name, "storage": {"prefix": f"{bucket}/{name}"}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{bucket}/src/data.json",
                                     "images": f"{bucket}/src", "shard_size": 5}},
        {"stage": "train", "with": {"unit_by": "ingest.task", "outputs": ["difficulty"], "trainer": {
            "command": ["python", str(source / "trainer.py")], "args": ["{data}", "{workdir}", mode, str(counter)],
            "gpus": 1, "timeout_s": 600}}},
        {"stage": "select", "with": {"score": "train.difficulty", "budget": 5}},
        {"stage": "export", "with": {"formats": ["llava"]}}]}


@pytest.mark.slow
def test_rendered_train_fanout_runs_like_curate_run(tmp_path, source, s3_bucket):
    """One GPU pod per unit, the collector, the per-shard writes: the store equals `curate run`'s byte for
    byte; a trainer's exit 3 is not retried and fails the workflow."""
    from tests.argo_exec import ArgoExecutor
    from tests.test_argo_exec import assert_same_store, curate_run, ok, render_docs, s3_secret, upload

    upload(source, f"{s3_bucket}/src")
    counter = tmp_path / "launches.txt"
    docs, path = render_docs(_argo_recipe(source, s3_bucket, "trainfan", "ok", counter), tmp_path, f"{s3_bucket}/trainfan")
    run = ArgoExecutor(docs, secrets=s3_secret(), workdir=str(tmp_path / "exec")).run()
    ok(run)
    pods = run.pods_of("train-train-unit")
    assert sorted(p.arg("--unit") for p in pods) == list(TASKS)
    assert sorted(counter.read_text().split()) == list(TASKS)
    assert len(run.pods_of("train-fit")) == 1 and "--collect" in run.pods_of("train-fit")[0].argv
    curate_run(path, f"{s3_bucket}/local")
    assert assert_same_store(f"{s3_bucket}/trainfan", f"{s3_bucket}/local") > 0

    (tmp_path / "f").mkdir()
    docs, _ = render_docs(_argo_recipe(source, s3_bucket, "trainfail", "exit3", tmp_path / "n.txt"), tmp_path / "f",
                          f"{s3_bucket}/trainfail")
    run = ArgoExecutor(docs, secrets=s3_secret(), workdir=str(tmp_path / "exec-fail")).run()
    assert run.phase == "Failed"
    units = run.pods_of("train-train-unit")
    assert units and all([a.exit_code for a in p.attempts] == [3] for p in units)
    assert not run.pods_of("train-fit")


def test_unit_data_in_every_format(tmp_path, source):
    """Each unit's data/ holds its samples in every requested layout (WebDataset shards included)."""
    from libcurate.shards import read_keys

    path = _recipe(tmp_path, source, formats=["llava", "cc_sbu_align", "webdataset"], keep_data=True)
    run_recipe(load_recipe(path), progress=False)
    ps = plan(load_recipe(path))[-1]
    unit = tmp_path / "run" / ps.prefix / "_units" / "a"
    info = json.loads((unit / "unit.json").read_text())
    assert info["formats"] == {"llava": 4, "cc_sbu_align": 4, "webdataset": 4}
    shards = sorted((unit / "data" / "webdataset").glob("*.tar"))
    keys = [k for s in shards for k in read_keys(open_store(str(unit)), str(s.relative_to(unit)))]
    assert len(keys) == len(set(keys)) == 4
    assert len(json.loads((unit / "data" / "llava" / "data.json").read_text())) == 4
