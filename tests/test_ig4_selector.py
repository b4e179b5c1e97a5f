"""InstructionGPT-4's selector (libcurate/train/ig4_selector.py) and its stage: the seed's bugs stay fixed.

- a subset's prediction does not depend on the order of its samples;
- a sample's score does not depend on other subsets (the seed's attention ran across subsets);
- the kept checkpoint is the best validation epoch (the seed kept the last);
- training and inference share one PCA basis, fit on every sample (the seed fit two unrelated ones).
"""

from __future__ import annotations

import numpy as np
import pytest

from libcurate.train import ig4_selector as G

FAST = G.SelectorConfig(epochs=40, lr=1e-2, batch_subsets=4, seed=0)


def _data(n_subsets=8, size=12, di=24, dt=20, m=3, seed=0, ragged=False):
    """Random features whose subset labels depend on them (so the network has something to fit)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(size // 2, size + 1, n_subsets) if ragged else np.full(n_subsets, size)
    subset = np.repeat(np.arange(n_subsets), sizes)
    n = len(subset)
    img = rng.standard_normal((n, di)).astype(np.float32) + subset[:, None] * 0.1
    txt = rng.standard_normal((n, dt)).astype(np.float32)
    ind = rng.standard_normal((n, m)).astype(np.float32)
    feats, layout = G.build_features(img, txt, ind, tuple(f"s.ind{i}" for i in range(m)))
    quality = ind[:, 0] + 0.5 * img[:, 0]
    labels = {int(s): float(30 + quality[subset == s].mean()) for s in range(n_subsets)}
    return feats, subset, labels, layout


@pytest.fixture(scope="module")
def trained():
    feats, subset, labels, layout = _data(ragged=True)
    state, report = G.train_selector(feats, subset, labels, FAST, layout=layout)
    return feats, subset, labels, layout, state, report


def test_permuting_a_subset_leaves_its_prediction_unchanged(trained):
    feats, subset, _, _, state, _ = trained
    before = G.score_samples(state, feats, subset)
    # a global shuffle: the order of the samples inside every subset changes, and the subsets interleave
    perm = np.random.default_rng(1).permutation(len(subset))
    after = G.score_samples(state, feats[perm], subset[perm])
    np.testing.assert_allclose(after, before[perm], rtol=0, atol=1e-5)
    m0, m1 = G.subset_means(before, subset), G.subset_means(after, subset[perm])
    assert m0.keys() == m1.keys()
    for s in m0:
        assert m1[s] == pytest.approx(m0[s], abs=1e-5)
    # the attention really mixes samples of a subset: a sample's score changes when its mates change
    s0 = np.flatnonzero(subset == 0)
    changed = feats.copy()
    changed[s0[1:]] += 3.0
    assert abs(G.score_samples(state, changed, subset)[s0[0]] - before[s0[0]]) > 1e-3


def test_a_sample_score_does_not_depend_on_other_subsets(trained):
    """Score subset 0 alone, then beside other subsets of other sizes (padding): same scores. With the
    seed's attention axis (across subsets) this fails."""
    feats, subset, _, _, state, _ = trained
    a = np.flatnonzero(subset == 0)
    alone = G.score_samples(state, feats[a], subset[a])
    for others in ([1], [2, 5], [1, 3, 4, 6, 7]):
        rows = np.concatenate([a] + [np.flatnonzero(subset == s) for s in others])
        mixed = G.score_samples(state, feats[rows], subset[rows])[:len(a)]
        np.testing.assert_allclose(mixed, alone, rtol=0, atol=1e-5)
    # changing another subset's samples does not move subset 0's scores
    other = feats.copy()
    other[subset != 0] = np.random.default_rng(2).standard_normal(other[subset != 0].shape)
    np.testing.assert_allclose(G.score_samples(state, other, subset)[a], alone, rtol=0, atol=1e-5)
    # scored alone (no subset context), a sample's score depends on nothing but itself
    single = G.score_samples(state, feats[a[:1]])
    np.testing.assert_allclose(G.score_samples(state, feats)[a[:1]], single, rtol=0, atol=1e-5)


def test_training_batches_do_not_mix_subsets(trained):
    """The training path (subset predictions of a mini-batch) gives a subset the same prediction whatever
    else is in the batch."""
    import torch

    feats, subset, _, layout, state, _ = trained
    z = G.transform_features(state, feats)
    net = G.load_net(state)
    ctx_rows, ctx_subset, ids = G.contexts(subset, 1024)
    sizes = np.bincount(subset)
    with torch.no_grad():
        alone = G._subset_predictions(net, z, ctx_rows, [0], [0], 1, sizes[[0]], "cpu")
        batch = G._subset_predictions(net, z, ctx_rows, [0, 3, 5], [0, 1, 2], 3, sizes[[0, 3, 5]], "cpu")
    assert float(batch[0]) == pytest.approx(float(alone[0]), abs=1e-5)


def test_kept_checkpoint_is_the_best_validation_epoch():
    """Over-fitting set-up (high lr, many epochs): validation loss bottoms out before the last epoch. The
    state must reproduce the best epoch's validation loss, not the last one's."""
    feats, subset, labels, layout = _data(n_subsets=10, size=10, seed=3)
    cfg = G.SelectorConfig(epochs=60, lr=3e-2, batch_subsets=2, val_fraction=0.3, seed=1)
    state, report = G.train_selector(feats, subset, labels, cfg, layout=layout)
    val = np.array(report["val_loss"])
    assert report["best_epoch"] == int(np.argmin(val))
    assert report["best_epoch"] < cfg.epochs - 1 and val[-1] > val.min() * 1.05   # the set-up is as intended
    scores = G.score_samples(state, feats, subset)
    means = G.subset_means(scores, subset)
    val_mse = np.mean([(means[s] - labels[s]) ** 2 for s in report["val_subsets"]])
    assert val_mse == pytest.approx(report["best_val_loss"], rel=1e-4)
    assert val_mse != pytest.approx(val[-1], rel=1e-3)
    train_mse = np.mean([(means[s] - labels[s]) ** 2 for s in report["train_subsets"]])
    assert train_mse == pytest.approx(report["train_loss_at_best"], rel=1e-4)
    assert state["meta"]["best_epoch"] == report["best_epoch"]


def test_training_and_inference_share_one_pca_basis_fit_on_every_sample(trained):
    feats, subset, labels, layout, state, report = trained
    # one basis per block, fit on all samples (labelled or not): the seed fit one per subset for training
    mean, axes = G.fit_pca(feats[:, :layout.image_dim], FAST.pca_dim)
    np.testing.assert_allclose(state["pca.image.axes"], axes, atol=1e-5)
    np.testing.assert_allclose(state["pca.image.mean"], mean, atol=1e-6)
    assert sorted(k for k in state if k.startswith("pca.")) == ["pca.image.axes", "pca.image.mean",
                                                              "pca.text.axes", "pca.text.mean"]
    # samples of unlabelled subsets shape the basis too
    unl = dict(labels)
    unl.pop(7)
    unl.pop(6)
    st2, rep2 = G.train_selector(feats, subset, unl, FAST, layout=layout)
    assert rep2["unlabelled_subsets"] == [6, 7]
    np.testing.assert_allclose(st2["pca.text.axes"], state["pca.text.axes"], atol=1e-5)
    # inference through the state's basis reproduces the subset predictions training measured
    scores = G.score_samples(st2, feats, subset)
    means = G.subset_means(scores, subset)
    mse = np.mean([(means[s] - unl[s]) ** 2 for s in rep2["train_subsets"]])
    assert mse == pytest.approx(rep2["train_loss_at_best"], rel=1e-4)


def test_training_is_seeded_and_deterministic():
    import torch

    feats, subset, labels, layout = _data(n_subsets=6, size=8, seed=5)
    cfg = G.SelectorConfig(epochs=15, seed=7)
    threads = torch.get_num_threads()
    s1, r1 = G.train_selector(feats, subset, labels, cfg, layout=layout)
    assert torch.get_num_threads() == threads           # the single-thread setting is restored
    s2, r2 = G.train_selector(feats, subset, labels, cfg, layout=layout)
    assert r1["val_loss"] == r2["val_loss"] and r1["val_subsets"] == r2["val_subsets"]
    for k, v in s1.items():
        if k != "meta":
            np.testing.assert_array_equal(v, s2[k])
    s3, r3 = G.train_selector(feats, subset, labels, G.SelectorConfig(epochs=15, seed=8), layout=layout)
    assert r3["val_loss"] != r1["val_loss"]


def test_large_subsets_are_cut_into_contexts_in_training_and_inference():
    feats, subset, labels, layout = _data(n_subsets=4, size=30, seed=2)
    cfg = G.SelectorConfig(epochs=10, max_context=8, seed=0)
    rows, owner, ids = G.contexts(subset, 8)
    assert all(len(r) <= 8 for r in rows) and sorted(np.concatenate(rows).tolist()) == list(range(len(subset)))
    assert all((subset[r] == o).all() for r, o in zip(rows, owner))
    state, report = G.train_selector(feats, subset, labels, cfg, layout=layout)
    means = G.subset_means(G.score_samples(state, feats, subset), subset)
    mse = np.mean([(means[s] - labels[s]) ** 2 for s in report["val_subsets"]])
    assert mse == pytest.approx(report["best_val_loss"], rel=1e-4)


def test_bad_inputs_are_clear_errors():
    feats, subset, labels, layout = _data(n_subsets=3, size=5)
    with pytest.raises(ValueError, match="at least 2"):
        G.train_selector(feats, subset, {0: 1.0}, FAST, layout=layout)
    bad = feats.copy()
    bad[0, -1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        G.train_selector(bad, subset, labels, FAST, layout=layout)
    with pytest.raises(ValueError, match="want \\[n"):
        G.train_selector(feats[:, :-1], subset, labels, FAST, layout=layout)
    with pytest.raises(ValueError, match="unknown setting"):
        G.SelectorConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="divide"):
        G.SelectorConfig(d_model=10, n_heads=4)
    # labels as an array indexed by subset id, NaN = unlabelled
    state, report = G.train_selector(feats, subset, np.array([1.0, np.nan, 2.0]), FAST, layout=layout)
    assert report["unlabelled_subsets"] == [1]


def test_pca_randomised_path_matches_exact():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 8)) * np.linspace(8, 1, 8)
    x = (base @ rng.standard_normal((8, 1100)) + 0.1 * rng.standard_normal((300, 1100))).astype(np.float16)
    m1, a1 = G.fit_pca(x, 6)                                # randomised (d > 1024)
    m2, a2 = G.fit_pca(x, 6, exact_max_dim=4096)            # exact
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    np.testing.assert_allclose(np.abs((a1 * a2).sum(axis=1)), 1.0, atol=1e-4)
    np.testing.assert_allclose(a1, a2, atol=1e-3)           # signs fixed the same way


def test_time_selector_reports_the_shape():
    r = G.time_selector(n_subsets=4, subset_size=6, image_dim=16, text_dim=8, n_indicators=2,
                        config=G.SelectorConfig(epochs=3))
    assert r["samples"] == 24 and r["train_seconds"] > 0 and r["score_seconds"] > 0


# -- the stage and the recipe -----------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "instructiongpt4.yaml"
SCHEMAS = ROOT / "tests" / "data" / "argo-schemas"


def _judge(body) -> str:
    """A deterministic GPT-score judge: a score from the caption's words; captions about coffee get a reply
    without a score (those samples are quarantined by judge_score as unparseable)."""
    import re

    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
    caption = re.search(r"Caption: (.*)\n</example>", text, re.DOTALL).group(1)
    if "coffee" in caption:
        return "I cannot rate this."
    return f"{60 + 2 * min(len(caption.split()), 20)}\nA fair caption."


@pytest.fixture(scope="module")
def ig4_run(tmp_path_factory):
    """recipes/instructiongpt4.yaml on a fresh demo dataset, with the GPT-score indicator added against the
    project's fake OpenAI-compatible server and the reference trainer cut to 3 steps a subset."""
    import yaml

    from libcurate.demo import build
    from libcurate.llm.testing import FakeOpenAIServer
    from libcurate.pipeline import load_recipe
    from libcurate.runner import run_recipe

    tmp = tmp_path_factory.mktemp("ig4")
    src = tmp / "source"
    build(str(src))
    d = yaml.safe_load(RECIPE.read_text())
    by_id = {s.get("as", s["stage"]): s for s in d["stages"]}
    by_id["ingest"]["with"].update(annotations=str(src / "data.json"), images=str(src))
    tr = by_id["train"]["with"]
    tr["eval"] = str(src / "eval.json")
    args = tr["trainer"]["args"]
    args[args.index("--steps") + 1] = "3"
    d["storage"] = {"prefix": str(tmp / "run")}
    with FakeOpenAIServer(responder=_judge) as srv:
        pos = d["stages"].index(by_id["score_reward"]) + 1
        d["stages"].insert(pos, {"stage": "judge_score", "with": {
            "prompt": "caption_quality_100", "llm": {"model": "judge", "base_url": srv.base_url,
                                                     "backoff_base_s": 0.001, "max_failed_fraction": 0.5}}})
        by_id["selector"]["with"]["indicators"].append("judge_score.score")
        r = load_recipe(d)
        runs = run_recipe(r, progress=False)
        again = run_recipe(r, progress=False)
    return r, d, runs, again


@pytest.mark.slow
def test_recipe_end_to_end_exports_exactly_the_budget_with_a_reason_for_every_drop(ig4_run):
    import json

    from libcurate.audit import audit, current_prefixes
    from libcurate.pipeline import plan
    from libcurate.runner import load_fitted
    from libcurate.select.stage import read_decisions
    from libcurate.stage import raw_shards
    from libcurate.storage import open_store

    r, d, runs, again = ig4_run
    store = open_store(r.prefix)
    assert audit(store, current_prefixes(r))["ok"]
    assert all(x.skipped for x in again)            # a re-run trains nothing and selects nothing again
    ps = {p.id: p for p in plan(r)}
    budget = d["stages"][[s["stage"] for s in d["stages"]].index("select")]["with"]["budget"]
    decisions = [x for sh in raw_shards(store) for x in read_decisions(store, ps["select"].prefix, sh)]
    n_raw = sum(json.loads(store.read_text(f"raw/_stats/{sh[:-4]}.json"))["out"] for sh in raw_shards(store))
    assert len(decisions) == n_raw
    assert sum(x["selected"] for x in decisions) == budget
    assert all(x["reason"] for x in decisions if not x["selected"])
    reasons = {x["reason"].split(":")[0] for x in decisions if not x["selected"]}
    assert {"cluster_quota", "above_max"} <= reasons      # above_max: multi-turn, not a cc_sbu_align caption
    # the GPT score's unparseable replies reach select as the upstream reason, not as a made-up score
    assert any(x["reason"] == "quarantined: judge_score: unparseable_reply" for x in decisions if not x["selected"])
    caps = json.loads(store.read_text(f"{ps['export'].prefix}/cc_sbu_align/filter_cap.json"))["annotations"]
    assert len(caps) == budget
    fitted = load_fitted(store, ps["selector"].prefix)
    st = fitted["stats"]
    assert st["inputs"][-4:] == ["score_clip.igpt4", "score_reward.reward", "score_length.first_chars",
                                 "judge_score.score"]
    assert st["scored"] + st["quarantined_upstream"] + st["missing_feature"] == n_raw
    assert st["quarantined_upstream"] > 0 and len(st["val_subsets"]) >= 1
    # every sample the trainer used has a score; the selected ones are ranked by it within their cluster
    from libcurate.columns import gather
    from libcurate.stage import StageContext

    ctx = StageContext(store=store, prefix="x", upstream={p.id: p.prefix for p in plan(r)})
    t = gather(ctx, fields=["selector.score", "train.quality", "diversity.cluster"])
    has_label = np.isfinite(t.values["train.quality"])
    assert has_label.any() and np.isfinite(t.values["selector.score"][has_label]).all()
    assert not np.isfinite(t.values["selector.score"][~has_label]).any()


@pytest.mark.parametrize("version", ["v3.6.10", "v4.1.2"])
def test_recipe_renders_for_argo_with_the_subset_fanout(tmp_path, version):
    import json
    import warnings

    import jsonschema
    import yaml

    from workflows.render import render

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = render(str(RECIPE), str(tmp_path), prefix="s3://curate-demo/ig4")
    docs = {p.rsplit("/", 1)[-1]: yaml.safe_load(open(p)) for p in paths}
    schema = json.loads((SCHEMAS / f"argo-workflows-{version}.schema.json").read_text())
    checked = 0
    for name, doc in docs.items():
        if doc["apiVersion"].startswith("argoproj.io"):
            v = jsonschema.Draft7Validator({"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{doc['kind']}",
                                            "definitions": schema["definitions"]})
            errors = [f"{name} {list(e.absolute_path)}: {e.message}" for e in v.iter_errors(doc)]
            assert not errors, errors[:5]
            checked += 1
    assert checked == 2
    wt = next(d for d in docs.values() if d["kind"] == "WorkflowTemplate")
    tpl = {t["name"]: t for t in wt["spec"]["templates"]}
    unit = tpl["train-train-unit"]                    # one GPU pod per subset
    assert unit["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in unit["tolerations"]
    assert int(unit["activeDeadlineSeconds"]) > 0
    assert tpl["train-train"]["dag"]["tasks"][0]["withParam"] == "{{inputs.parameters.units}}"
    # the selector fits in the torch image on the CPU fit profile; its per-shard writes use the slim image
    assert "curate-gpu" in tpl["selector-fit"]["container"]["image"]
    assert "nvidia.com/gpu" not in tpl["selector-fit"]["container"]["resources"]["requests"]
    assert "curate-cpu" in tpl["selector"]["container"]["image"]
    main = {t["name"]: t for t in tpl["main"]["dag"]["tasks"]}
    assert main["selector-fit"]["depends"] == "train"


def test_stage_scores_every_complete_sample_and_quarantines_missing_features(tmp_path, monkeypatch):
    """The stage on a synthetic column table: a sample lacking an embedding or an indicator (and not
    quarantined upstream) is quarantined here with the missing fields named; an upstream-quarantined one
    gets ``{}`` (select keeps the upstream reason); the rest get scores in their subset's context."""
    import json

    from libcurate.columns import Table
    from libcurate.stage import StageContext, read_quarantine
    from libcurate.storage import open_store
    from libcurate.train import ig4_stage as S

    feats, subset, labels, layout = _data(n_subsets=4, size=6, di=8, dt=6, m=2, seed=4)
    n = len(subset)
    keys = np.array([f"{i:024x}".encode() for i in range(n)], dtype="S24")
    img, txt = feats[:, :8].astype(np.float16), feats[:, 8:14].astype(np.float16)
    cfg = S.IG4SelectorConfig.from_dict({"indicators": ["s.ind0", "s.ind1"], "subset": "subsets.cluster",
                                         "label": "train.quality", "selector": {"epochs": 5}})
    values = {"s.ind0": feats[:, 14].astype(np.float64), "s.ind1": feats[:, 15].astype(np.float64),
              "subsets.cluster": subset.astype(np.float64),
              "train.quality": np.array([labels[s] for s in subset])}
    present = {"score_clip.img_emb": np.ones(n, bool), "score_clip.txt_emb": np.ones(n, bool)}
    present["score_clip.img_emb"][3] = False                 # no image embedding
    values["s.ind1"][5] = np.nan                              # no indicator
    quarantine = np.zeros(n, np.int32)
    quarantine[7] = 1                                         # quarantined upstream (and missing a field)
    values["s.ind0"][7] = np.nan
    for r in (3, 5, 7):
        values["train.quality"][r] = np.nan                   # the trainer left them out, as its contract says
    table = Table(keys=keys, shard_offsets=np.array([0, 10, n]), shards=["shard-000000.tar", "shard-000001.tar"],
                  values=values, quarantine=quarantine, quarantine_reasons=["", "judge_score: unparseable_reply"],
                  embeddings={"score_clip.img_emb": img, "score_clip.txt_emb": txt}, present=present)
    monkeypatch.setattr(S, "gather", lambda ctx, **kw: table)
    store = open_store(str(tmp_path / "run"))
    ctx = StageContext(store=store, prefix="stages/selector/x")
    stage = S.IG4SelectorStage(cfg)
    fitted = stage.fit(ctx)
    assert fitted["stats"]["scored"] == n - 3 and fitted["stats"]["missing_feature"] == 2
    for shard in table.shards:
        stage.write_shard(ctx, shard, fitted)
    q = read_quarantine(store, ctx.prefix, "shard-000000")
    assert {x["key"]: (x["reason"], x["detail"]) for x in q} == {
        keys[3].decode(): ("missing_feature", "no score_clip.img_emb"),
        keys[5].decode(): ("missing_feature", "no s.ind1")}
    stats = json.loads(store.read_text(f"{ctx.prefix}/_stats/shard-000000.json"))
    assert stats["in"] == 10 and stats["out"] == 8 and stats["quarantined"] == 2
    from libcurate.shards import iter_members

    side = {m["__key__"]: json.loads(m["json"]) for sh in ("shard-000000", "shard-000001")
            for m in iter_members(store.uri(f"{ctx.prefix}/{sh}.tar"))}
    assert side[keys[7].decode()] == {}
    scored = [side[k.decode()] for i, k in enumerate(keys) if i not in (3, 5, 7)]
    assert all(set(s) == {"score", "subset", "subset_prediction", "split"} for s in scored)
    # the scores are the library's, in subset context over exactly the samples the stage kept
    rows = np.array([i for i in range(n) if i not in (3, 5, 7)])
    state = G.state_from_fitted(fitted)
    stored = np.hstack([img[rows].astype(np.float32), txt[rows].astype(np.float32), feats[rows, 14:]])
    want = G.score_samples(state, stored, subset[rows])
    got = np.array([side[keys[i].decode()]["score"] for i in rows])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(Exception, match="differs within subset"):
        values["train.quality"][0] += 1.0
        stage.fit(ctx)


def test_stage_config_is_strict_and_its_hash_covers_what_changes_the_scores():
    from libcurate.stage import PermanentInputError, config_hash
    from libcurate.train import ig4_stage as S

    def h(**kw):
        return config_hash("ig4_selector", S.IG4SelectorConfig.from_dict(kw).hash_dict(), None)

    base = h()
    for kw in ({"selector": {"epochs": 10}}, {"selector": {"pca_dim": 4}}, {"device": "cuda"},
               {"indicators": ["score_reward.reward", "score_clip.igpt4", "score_length.chars"]},
               {"context": "alone"}, {"label": "train.label"}, {"subset": "subsets.cluster"}):
        assert h(**kw) != base, kw
    assert h(profile="gpu") == base                      # where it runs, not what it computes
    for bad in ({"selector": {"epoch": 3}}, {"indicators": ["nodot"]}, {"context": "batch"},
                {"device": "tpu"}, {"indicators": ["a.x", "a.x"]}):
        with pytest.raises(PermanentInputError):
            S.IG4SelectorConfig.from_dict(bad)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PermanentInputError, match="no CUDA device"):
            S._device("cuda")
