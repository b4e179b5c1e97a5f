"""The data engine in one run: generated samples are raw samples of the run (scored, judged, deduplicated,
selected, exported like ingested ones), over real HTTP against the project's OpenAI-compatible test
server (libcurate.generate.engine_demo), with recipes/mminstruct.yaml and recipes/lrv.yaml."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml

from libcurate.audit import audit, current_prefixes
from libcurate.generate.engine_demo import EngineServer, request_count, write_regions
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import run_recipe, run_stage, shard_indices, undone_shards, build_stage, context
from libcurate.select.stage import read_decisions
from libcurate.shards import iter_members, iter_samples
from libcurate.stage import done_rel, is_done, is_generated_shard, raw_shards, read_quarantine, unit_of
from libcurate.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "data" / "argo-schemas"
ARGO_VERSIONS = ("v3.6.10", "v4.1.2")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
MM_TYPES = {"judge", "choice", "long", "short"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Four demo photos (LLaVA format) plus one record whose image is missing, and their regions."""
    from libcurate.demo import build

    out = str(tmp_path_factory.mktemp("engine-src"))
    build(out, copies=1)
    recs = json.load(open(f"{out}/data.json"))
    keep = [r for r in recs if r["id"] in {f"{p}-full" for p in PHOTOS} | {"missing"}]
    json.dump(keep, open(f"{out}/data.json", "w"))
    write_regions(out)
    return out


@pytest.fixture(scope="module")
def server():
    with EngineServer() as srv:
        yield srv


@pytest.fixture
def endpoint(server, monkeypatch):
    """The recipes take the endpoint from the environment, as a user's run does."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "local-test-key")
    return server


def engine_recipe(name: str, prefix: str, src: str, edit=None) -> dict:
    """recipes/<name>.yaml on the test source: small shards (several raw units), one worker."""
    d = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    d["storage"], d["workers"] = {"prefix": prefix}, 1
    for st in d["stages"]:
        w = st.setdefault("with", {})
        if st["stage"] == "ingest":
            w.update(annotations=f"{src}/data.json", images=src, shard_size=2)
        if "regions_file" in w:
            w["regions_file"] = f"{src}/regions.json"
    if edit:
        edit(d)
    return d


def by_id(recipe):
    return {ps.id: ps for ps in plan(recipe)}


def keys_of(store, shard: str) -> list[str]:
    return [s.key for s in iter_samples(store, f"raw/{shard}", with_images=False)]


def sidecar_keys(store, prefix: str, shard: str) -> set[str]:
    unit = unit_of(shard)
    out = {m["__key__"] for m in iter_members(store.uri(f"{prefix}/{unit}.tar"))}
    return out | {q["key"] for q in read_quarantine(store, prefix, unit)}


def raw_snapshot(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(os.path.join(root, "raw")):
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def test_mminstruct_generated_samples_are_judged_deduplicated_selected_and_exported(tmp_path, src, endpoint):
    prefix = str(tmp_path / "mm")
    recipe = load_recipe(engine_recipe("mminstruct", prefix, src))
    n0 = request_count(endpoint.base_url)
    run_recipe(recipe, progress=False)
    assert request_count(endpoint.base_url) > n0
    store, ps = open_store(prefix), by_id(recipe)
    shards = raw_shards(store)
    source = [s for s in shards if not is_generated_shard(s)]
    gen_cap = [s for s in shards if s.startswith(f"gen-generate_caption-{ps['generate_caption'].cfg_hash}-")]
    gen_mm = [s for s in shards if s.startswith(f"gen-generate_mminstruct-{ps['generate_mminstruct'].cfg_hash}-")]
    assert len(gen_cap) == len(gen_mm) == len(source) >= 2 and len(shards) == 3 * len(source)
    src_keys = {k for s in source for k in keys_of(store, s)}
    gen = {s.key: s for sh in gen_mm for s in iter_samples(store, f"raw/{sh}", with_images=False)}
    assert gen and {s.type for s in gen.values()} <= MM_TYPES
    for s in gen.values():  # provenance: generator stage, its config hash, the parent
        prov = s.metadata["provenance"]
        assert prov["stage_id"] == "generate_mminstruct" and prov["config_hash"] == ps["generate_mminstruct"].cfg_hash
        assert prov["parent_key"] == s.metadata["generated_from"] in src_keys and s.source.original_format == "generated"
    # every later stage saw the generated shards like ingested ones
    for sid in ("judge_score", "score_clip", "dedup"):
        for sh in shards:
            assert is_done(store, ps[sid].prefix, unit_of(sh)), (sid, sh)
    judged = set().union(*(sidecar_keys(store, ps["judge_score"].prefix, sh) for sh in gen_mm))
    assert set(gen) <= judged
    # the generators read only ingested shards: the instruction stage has no output for the caption shards
    assert not any(is_done(store, ps["generate_mminstruct"].prefix, unit_of(sh)) for sh in gen_cap)
    decisions = {d["key"]: d for sh in shards for d in read_decisions(store, ps["select"].prefix, sh)}
    assert set(gen) <= set(decisions)
    kept = [k for k, d in decisions.items() if d["selected"]]
    assert kept and all(k in gen for k in kept)  # quotas per instruction type: only generated types are kept
    exp = ps["export"].prefix
    summary = json.loads(store.read_text(f"{exp}/summary.json"))
    llava = json.loads(store.read_text(f"{exp}/llava/data.json"))
    assert summary["generated_exported"] == len(kept) == sum(r["generated"] for r in llava) == len(llava)
    assert summary["generated_by_stage"] == {"generate_mminstruct": len(kept)} and summary["source_exported"] == 0
    # malformed replies are quarantined item by item (raw/gen-* quarantine), never dropped silently
    rep = audit(store, current_prefixes(recipe))
    assert rep["ok"]
    gen_reasons = {q["reason"] for sh in gen_mm for q in read_quarantine(store, "raw", unit_of(sh))}
    assert gen_reasons & {"bad_options", "not_yes_no", "yes_no_balance", "missing_tag", "answer_too_long"}
    # curate status counts the generated shards a stage sees: complete, with the right totals
    from libcurate.status import StatusReader, planned_specs

    st = {s["id"]: s for s in StatusReader(store, planned_specs(recipe)).read()["stages"]}
    assert all(s["state"] == "done" for s in st.values())
    assert st["ingest"]["units_total"] == st["judge_score"]["units_total"] == st["dedup"]["units_total"] == len(shards)
    assert st["generate_mminstruct"]["units_total"] == len(source)
    # a second run sends nothing and writes nothing new
    before, n1 = raw_snapshot(prefix), request_count(endpoint.base_url)
    runs = run_recipe(recipe, progress=False)
    assert request_count(endpoint.base_url) == n1 and all(r.skipped for r in runs)
    assert raw_snapshot(prefix) == before


def test_lrv_gavie_select_by_ratio_and_generator_visibility(tmp_path, src, endpoint):
    """positive and negative instructions are GAVIE-graded and selected at the recipe's ratio in the same run;
    a stage before the generator never sees its shards; a changed generator config writes a new set and the
    old one is no longer seen; a second run sends 0 requests."""
    def edit(d, n_negative=3):
        d["stages"].insert(1, {"stage": "score_length", "as": "len_before"})
        d["stages"].insert(3, {"stage": "score_length", "as": "len_after"})
        for st in d["stages"]:
            if st["stage"] == "generate_lrv":
                st["with"]["n_negative"] = n_negative
            if st["stage"] == "select":
                st["with"]["budget"] = 20

    prefix = str(tmp_path / "lrv")
    recipe = load_recipe(engine_recipe("lrv", prefix, src, edit))
    run_recipe(recipe, progress=False)
    store, ps = open_store(prefix), by_id(recipe)
    shards = raw_shards(store)
    gen = [s for s in shards if is_generated_shard(s)]
    assert gen and all(s.startswith(f"gen-generate_lrv-{ps['generate_lrv'].cfg_hash}-") for s in gen)
    assert not any(is_done(store, ps["len_before"].prefix, unit_of(s)) for s in gen)
    assert all(is_done(store, ps["len_after"].prefix, unit_of(s)) for s in shards)
    gen_keys = {k for s in gen for k in keys_of(store, s)}
    gavie = {}
    for s in gen:
        gavie.update({m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri(f"{ps['judge_gavie'].prefix}/{unit_of(s)}.tar"))})
    graded = set().union(*(sidecar_keys(store, ps["judge_gavie"].prefix, s) for s in gen))
    assert gen_keys <= graded and gavie
    types = {s.key: s.type for sh in gen for s in iter_samples(store, f"raw/{sh}", with_images=False)}
    kept = [d["key"] for sh in shards for d in read_decisions(store, ps["select"].prefix, sh) if d["selected"]]
    n_pos, n_neg = sum(types.get(k) == "positive" for k in kept), sum(types.get(k) == "negative" for k in kept)
    assert 0 < n_pos <= 11 and 0 < n_neg <= 9 and n_pos + n_neg == len(kept)   # 55:45 of 20
    assert all(gavie[k]["accuracy"] >= 5 and gavie[k]["relevancy"] >= 5 for k in kept)
    n1 = request_count(endpoint.base_url)
    assert all(r.skipped for r in run_recipe(recipe, progress=False)) and request_count(endpoint.base_url) == n1

    # Argo batches name positions in the stage's units, generated shards included
    gp = ps["judge_gavie"]
    stage, ctx = build_stage(gp, recipe), context(gp, recipe, store, 1)
    units = stage.units(ctx)
    target = gen[-1]
    store.delete(done_rel(gp.prefix, unit_of(target)))
    assert undone_shards(stage, ctx) == [target]
    pos = shard_indices([target], units)
    run_stage(gp, recipe, store, shards=pos, progress=False)
    assert is_done(store, gp.prefix, unit_of(target)) and request_count(endpoint.base_url) == n1  # cached

    # a changed generator config: a new set is written and used; the old set stays but nobody sees it
    recipe2 = load_recipe(engine_recipe("lrv", prefix, src, lambda d: edit(d, n_negative=2)))
    run_recipe(recipe2, progress=False)
    ps2 = by_id(recipe2)
    assert ps2["generate_lrv"].cfg_hash != ps["generate_lrv"].cfg_hash
    assert request_count(endpoint.base_url) > n1
    new = [s for s in raw_shards(store) if s.startswith(f"gen-generate_lrv-{ps2['generate_lrv'].cfg_hash}-")]
    assert new and all(s in raw_shards(store) for s in gen)  # both sets exist
    exp = ps2["export"].prefix
    out = [s for n in store.list(f"{exp}/webdataset") for s in iter_samples(store, f"{exp}/webdataset/{n}")]
    assert out and all(s.metadata["provenance"]["config_hash"] == ps2["generate_lrv"].cfg_hash for s in out)
    decided = {n[:-len(".jsonl")] for n in store.list(f"{ps2['select'].prefix}/decisions")}
    assert decided == {unit_of(s) for s in raw_shards(store) if s not in gen}
    assert audit(store, current_prefixes(recipe2))["ok"]


@pytest.mark.parametrize("name", ["mminstruct", "lrv"])
def test_engine_recipes_render_for_argo(tmp_path, name):
    """Both recipes render; every Argo document validates against both vendored schemas; later stages
    wait for the generation stage (it adds the raw shards they read)."""
    from workflows.render import render

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recipes read local demo paths: render warns, as for the demo
        paths = render(str(ROOT / "recipes" / f"{name}.yaml"), str(tmp_path), prefix="s3://curate-demo/engine")
    docs = [yaml.safe_load(Path(p).read_text()) for p in paths]
    argo = [d for d in docs if d["apiVersion"].startswith("argoproj.io")]
    assert argo
    for v in ARGO_VERSIONS:
        defs = json.loads((SCHEMAS / f"argo-workflows-{v}.schema.json").read_text())["definitions"]
        for doc in argo:
            schema = {"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{doc['kind']}", "definitions": defs}
            errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
            assert not errors, errors[:5]
    wt = next(d for d in argo if d["kind"] == "WorkflowTemplate")
    tasks = {t["name"]: t for t in next(t for t in wt["spec"]["templates"] if t["name"] == "main")["dag"]["tasks"]}
    gen = "generate-mminstruct" if name == "mminstruct" else "generate-lrv"
    after = "judge-score-batches" if name == "mminstruct" else "judge-gavie-batches"
    assert tasks[after]["depends"] == gen
