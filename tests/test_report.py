"""The run report: every section holds the run's real figures, it regenerates without running a stage,
it stays self-contained and within its size budget, and its streaming summaries are exact."""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

from libcurate.cli import main
from libcurate.columns import gather
from libcurate.pipeline import load_recipe, plan
from libcurate.report import collect as C
from libcurate.report import html as H
from libcurate.report import plots as P
from libcurate.report.run import locate
from libcurate.report.sampling import BottomK, StreamingHistogram, priorities
from libcurate.select.stage import read_decisions
from libcurate.stage import PermanentInputError, raw_shards
from libcurate.storage import open_store
from tests.report_run import THRESHOLDS, curated_run

SECTIONS = ["funnel", "scores", "embedding-map", "near-duplicates", "drop-reasons", "judges", "cost"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = curated_run(tmp_path_factory)
    r["store"] = open_store(r["prefix"])
    r["plan"] = {p.id: p for p in plan(load_recipe(r["recipe"]))}
    r["report"] = os.path.join(r["prefix"], r["plan"]["export"].prefix, "report.html")
    r["html"] = open(r["report"], encoding="utf-8").read()
    return r


def sections(doc: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', doc, re.S))


def stats_totals(store, prefix: str) -> dict:
    tot = {"in": 0, "out": 0, "quarantined": 0, "dropped": 0}
    for name in store.list(f"{prefix}/_stats"):
        st = json.loads(store.read_text(f"{prefix}/_stats/{name}"))
        for k in tot:
            tot[k] += st.get(k, 0)
    return tot


# -- streaming summaries ------------------------------------------------------------------------------
def test_streaming_histogram_is_exact_whatever_the_chunks():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(0.3, 0.05, 5000), rng.normal(-2.0, 0.5, 300), [np.nan] * 7]
    g = (rng.random(len(v)) < 0.3).astype(int)
    h1, h2 = StreamingHistogram(), StreamingHistogram()
    h1.add(v, g)
    for i in range(0, len(v), 97):  # narrow first chunk: the range grows by doubling many times
        h2.add(v[i:i + 97], g[i:i + 97])
    for h in (h1, h2):
        assert h.counts.shape[1] <= 40 and h.total == 5300 and h.n_missing.tolist() == [
            int(np.isnan(v[g == 0]).sum()), int(np.isnan(v[g == 1]).sum())]
        for grp in (0, 1):  # the same counts numpy finds on the final bins
            ref, _ = np.histogram(v[(g == grp) & np.isfinite(v)], bins=h.edges)
            assert h.counts[grp].tolist() == ref.tolist()
    words = StreamingHistogram()
    words.add(np.array([3, 4, 4, 5, 9], float))
    edges, counts = words.binned()                   # integers: shown in bins 1 wide
    assert np.diff(edges).tolist() == [1.0] * 7 and counts[0].tolist() == [1, 2, 1, 0, 0, 0, 1]
    words.add(np.array([4.5]))                        # a fraction: the stored bins are shown as they are
    assert words.binned()[0].tolist() == words.edges.tolist() and np.diff(words.edges)[0] < 1


def test_bottom_k_is_a_sample_independent_of_chunking():
    keys = np.array([f"{i:024x}".encode() for i in range(10_000)], dtype="S24")
    keys = np.array([bytes(f"{(i * 2654435761) % 16**24:024x}", "ascii") for i in range(10_000)], dtype="S24")
    p = priorities(keys, seed=3)
    whole, parts = BottomK(50), BottomK(50)
    whole.offer(p, row=np.arange(len(p)))
    for i in range(0, len(p), 333):
        parts.offer(p[i:i + 333], row=np.arange(i, min(i + 333, len(p))))
    assert whole.payload["row"].tolist() == parts.payload["row"].tolist()
    assert sorted(whole.payload["row"].tolist()) == sorted(np.argsort(p, kind="stable")[:50].tolist())
    assert np.median(whole.payload["row"]) == pytest.approx(5000, rel=0.35)   # spread over the rows


# -- the report of a real run -------------------------------------------------------------------------
def test_every_section_present_with_the_runs_figures(run):
    doc = run["html"]
    secs = sections(doc)
    assert list(secs) == SECTIONS
    view = locate(run["store"], recipe=load_recipe(run["recipe"]))
    data = C.collect(view)
    # funnel: the numbers are the stages' _stats summed
    rows = H.funnel_rows(data, view)
    assert [r["name"] for r in rows] == ["ingest", "score_length", "score_clip", "hash_image", "dedup", "cluster",
                                         "judge_score", "select"]
    for r in rows:
        assert {k: r[k] for k in ("in", "out", "quarantined", "dropped")} == stats_totals(run["store"], r["prefix"])
        assert f'<td class="l">{r["name"]}</td><td>{r["in"]}</td><td>{r["quarantined"]}</td>' in secs["funnel"]
    sel_stats = json.loads(run["store"].read_text(f"{run['plan']['select'].prefix}/_stats/all.json"))
    for reason, n in sel_stats["drop_reasons"].items():
        assert f"{reason}: {n}" in secs["funnel"]
        assert f"<h3>{reason}: {n} samples</h3>" in secs["drop-reasons"]
    judge = next(r for r in rows if r["name"] == "judge_score")
    assert judge["quarantine_reasons"].get("unparseable_reply", 0) > 0   # the fake judge refused some
    # scores, map and galleries hold plots and thumbnails
    assert secs["scores"].count('<img class="plot" src="data:image/png;base64,') == len(data.histograms) >= 10
    assert 'src="data:image/png;base64,' in secs["embedding-map"] and "PCA" in secs["embedding-map"]
    assert secs["embedding-map"].count('<div class="card ') == sum(len(data.clusters[c]["sample"])
                                                                   for c in data.clusters_shown) > 0
    assert secs["near-duplicates"].count('class="group"') == len(data.dup_groups) > 0
    groups = gather(view.context(), fields=["dedup.group"], quarantine_from=[]).values["dedup.group"]
    assert data.dup_total == len(set(groups[groups != b""].tolist())) and f"{data.dup_total} groups" in secs[
        "near-duplicates"]
    assert "KEPT, rank" in secs["near-duplicates"] and "near_duplicate_of" in secs["near-duplicates"]
    # judges: parse failures and agreement from the sidecars; cost = the stages' token counters
    j = data.judges["judge_score"]
    assert j["asked"] > j["parsed"] > 0 and j["repeated"] > 0 and j["mean_stdev"] > 0
    assert f"{j['asked'] - j['parsed']} of {j['asked']} replies" in secs["judges"]
    llm = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    jp = run["plan"]["judge_score"].prefix
    for name in run["store"].list(f"{jp}/_stats"):
        st = json.loads(run["store"].read_text(f"{jp}/_stats/{name}"))["llm"]
        for k in llm:
            llm[k] += st[k]
    assert llm["prompt_tokens"] > 0 and llm["cost_usd"] > 0
    assert f"<td>{llm['prompt_tokens']:,}</td><td>{llm['completion_tokens']:,}</td><td>${llm['cost_usd']:.4f}</td>" \
        in secs["cost"]


def test_histograms_count_every_sample_kept_and_dropped(run):
    view = locate(run["store"], recipe=load_recipe(run["recipe"]))
    data = C.collect(view)
    assert {"score_clip.cosine", "score_length.words", "judge_score.score", "cluster.distance"} <= set(data.histograms)
    assert not any(re.search(r"\.\d+(\.|$)", n) for n in data.histograms)       # no list elements
    t = gather(view.context(), fields=list(data.histograms), quarantine_from=[])
    sel = run["plan"]["select"].prefix
    selected = np.array([d["selected"] for sh in raw_shards(run["store"])
                         for d in read_decisions(run["store"], sel, sh)])
    for name, h in data.histograms.items():
        v = t.values[name]
        ok = np.isfinite(v)
        assert h.counts[0].sum() == (ok & selected).sum() and h.counts[1].sum() == (ok & ~selected).sum(), name
        assert h.lo == v[ok].min() and h.hi == v[ok].max()


def test_thresholds_are_drawn_at_the_configured_values(run, monkeypatch):
    drawn = {}
    real = P.figure_histogram

    def spy(name, edges, counts, thresholds, note=""):
        fig = real(name, edges, counts, thresholds, note)
        drawn[name] = (thresholds, fig, counts)
        return fig

    monkeypatch.setattr(P, "figure_histogram", spy)
    view = locate(run["store"], recipe=load_recipe(run["recipe"]))
    H.build_report(view)
    for field, rule in THRESHOLDS.items():
        thresholds, fig, counts = drawn[field]
        assert thresholds == [("min", float(rule["min"]))]
        ax = fig.axes[0]
        vlines = [ln.get_xdata()[0] for ln in ax.lines]
        assert vlines == [rule["min"]]
        kept, stacked = [p.get_data() for p in ax.patches]   # the steps are the streamed counts
        assert kept.values.tolist() == counts[0].tolist() and kept.baseline == 0
        assert (stacked.values - stacked.baseline).tolist() == counts[1].tolist()
    assert drawn["score_clip.cosine"][0] == []     # no threshold on the ranking score


def test_report_regenerates_identically_without_running_a_stage(run, tmp_path):
    def snapshot():
        out = {}
        for p in glob.glob(os.path.join(run["prefix"], "**", "*"), recursive=True):
            if os.path.isfile(p) and not p.endswith("report.html"):
                out[p] = (os.path.getmtime(p), os.path.getsize(p))
        return out

    before = snapshot()
    out = tmp_path / "again.html"
    assert main(["report", run["prefix"], "--out", str(out)]) == 0
    assert out.read_bytes() == open(run["report"], "rb").read()
    again = ["report", run["prefix"], "--out", str(tmp_path / "r.html"), "--recipe", _recipe_file(run, tmp_path)]
    assert main(again) == 0
    assert (tmp_path / "r.html").read_bytes() == out.read_bytes()
    assert snapshot() == before                     # nothing of the run was written again


def _recipe_file(run, tmp_path) -> str:
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(run["recipe"]))
    return str(p)


def test_report_is_self_contained_and_within_budget(run):
    doc = run["html"]
    assert len(doc.encode()) < H.SIZE_BUDGET
    srcs = re.findall(r'\b(?:src|href)="([^"]*)"', doc)
    assert srcs and all(s.startswith(("data:", "#")) for s in srcs), [s for s in srcs if not s.startswith("data:")]
    assert "<script src" not in doc and "<link rel=\"stylesheet\"" not in doc and "@import" not in doc
    imgs = re.findall(r'<img [^>]*src="data:image/(jpeg|png);base64,', doc)
    assert len(imgs) > 20


def test_each_thumbnail_carries_the_samples_journey(run, capsys):
    doc = run["html"]
    cards = re.findall(r'<div class="card [^"]*" id="s-([0-9a-f]{24})">.*?<pre>\$ (curate inspect \S+ \S+)\n'
                       r'(.*?)</pre>', doc, re.S)
    assert len(cards) > 20
    import html as htmlmod

    for key, cmd, body in cards[:5] + cards[-5:]:
        assert cmd == f"curate inspect {run['prefix']} {key}"
        capsys.readouterr()
        assert main(["inspect", run["prefix"], key, "--json"]) == 0
        assert json.loads(htmlmod.unescape(body)) == json.loads(capsys.readouterr().out)


def test_ambiguous_run_needs_a_recipe(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run["prefix"], copy)
    old = copy / run["plan"]["cluster"].prefix
    shutil.copytree(old, old.parent / "0000000000")   # an older configuration of the cluster stage
    shutil.rmtree(copy / "export")
    with pytest.raises(PermanentInputError, match="stages/cluster .2 configurations.*--recipe"):
        locate(open_store(str(copy)))
    rf = _recipe_file({"recipe": {**run["recipe"], "storage": {"prefix": str(copy)}}}, tmp_path)
    assert main(["report", str(copy), "--recipe", rf, "--out", str(tmp_path / "r.html")]) == 0
    assert '<section id="funnel">' in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_report_of_an_s3_run_equals_the_local_one(run, s3_bucket, tmp_path):
    from libcurate.storage import s3_client, split_s3_url

    bucket, _ = split_s3_url(s3_bucket + "/x")
    client = s3_client()
    for p in glob.glob(os.path.join(run["prefix"], "**", "*"), recursive=True):
        if os.path.isfile(p):
            client.upload_file(p, bucket, "run/" + os.path.relpath(p, run["prefix"]))
    url = f"{s3_bucket}/run"
    assert main(["report", url, "--out", str(tmp_path / "s3.html")]) == 0
    got = (tmp_path / "s3.html").read_text(encoding="utf-8")
    assert got == run["html"].replace(run["prefix"], url)


def test_sections_without_data_say_so(tmp_path, photos):
    """A run with no select, dedup, cluster or LLM stage: every section is still there, in one line."""
    from libcurate.runner import run_recipe
    from tests.conftest import jpeg_bytes

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    recs = []
    for i, (name, im) in enumerate(sorted(photos.items())):
        (src / "images" / f"{name}.jpg").write_bytes(jpeg_bytes(im))
        recs.append({"id": name, "image": f"images/{name}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"A photo of {name}."}]})
    (src / "data.json").write_text(json.dumps(recs))
    prefix = str(tmp_path / "run")
    run_recipe(load_recipe({"storage": {"prefix": prefix}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": str(src / "data.json"), "images": str(src)}},
        {"stage": "score_length"}]}), progress=False)
    assert main(["report", prefix, "--out", str(tmp_path / "r.html")]) == 0
    secs = sections((tmp_path / "r.html").read_text())
    assert list(secs) == SECTIONS
    assert "No stage stored embeddings" in secs["embedding-map"] and "No cluster stage ran" in secs["embedding-map"]
    assert "No dedup stage ran" in secs["near-duplicates"]
    assert "No selection ran" in secs["drop-reasons"]
    assert "No LLM judge ran" in secs["judges"] and "No LLM stage ran" in secs["cost"]
    assert secs["scores"].count("data:image/png") >= 3 and "score_length.words" in secs["scores"]


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_tarscan_picks_members_without_reading_the_rest(tmp_path, fmt):
    import io
    import tarfile

    from libcurate.report.tarscan import TarScanError, scan

    path = tmp_path / "s.tar"
    names = {f"{i:024x}": {"json": f'{{"i": {i}}}'.encode(), "img0.jpg": bytes([i]) * (i * 300)} for i in range(40)}
    names["k" * 120] = {"json": b"{}"}          # a name longer than ustar's 100 bytes
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if fmt == "pax" else tarfile.GNU_FORMAT) as t:
        for key, members in names.items():
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    want = {f"{3:024x}", f"{17:024x}", "k" * 120, "absent"}
    with open(path, "rb") as f:
        got = scan(f, want)
    assert set(got) == want - {"absent"}
    assert got[f"{17:024x}"] == names[f"{17:024x}"] and got["k" * 120] == {"json": b"{}"}

    class Stream(io.RawIOBase):  # what an S3 body looks like: no seek
        def __init__(self, data):
            self.b = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buf):
            chunk = self.b.read(len(buf))
            buf[:len(chunk)] = chunk
            return len(chunk)

    assert scan(Stream(path.read_bytes()), want) == got
    # it stops after the last wanted key: a stream cut off further on is not read to its (broken) end
    data = path.read_bytes()
    cut = data[: data.index(f"{20:024x}.img0.jpg".encode()) + 700]
    assert scan(Stream(cut), {f"{3:024x}"}) == {f"{3:024x}": names[f"{3:024x}"]}
    with pytest.raises(TarScanError):
        scan(Stream(cut), {"absent"})
    with pytest.raises(TarScanError):
        scan(io.BytesIO(b"x" * 1024), {"a"})


def test_map_uses_umap_when_installed_else_pca(monkeypatch):
    import sys
    import types

    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, (30, 8)) + 5, rng.normal(0, 1, (30, 8)) - 5]
    monkeypatch.setitem(sys.modules, "umap", None)         # not installed: PCA
    xy, how = P.project_2d(x)
    assert how == "PCA" and xy.shape == (60, 2)
    assert abs(xy[:30, 0].mean() - xy[30:, 0].mean()) > 10   # the first axis separates the two groups
    calls = {}

    class FakeUMAP:
        def __init__(self, **kw):
            calls.update(kw)

        def fit_transform(self, a):
            return a[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    xy, how = P.project_2d(x, seed=7)
    assert how == "UMAP" and calls["random_state"] == 7 and np.allclose(xy, x[:, :2] * 2)


def test_judges_without_repeats_say_agreement_needs_them():
    data = C.ReportData(run="r")
    data.llm = {"judge": {"in": 50, "quarantined_by_reason": {"unparseable_reply": 5}, "retries": 3, "requests": 60,
                          "failed": 1}}
    data.judges = {"judge": {"samples": 45, "asked": 45, "parsed": 45, "partial_samples": 0, "repeated": 0,
                             "mean_stdev": None, "mean_stdev_norm": None, "stdev_hist": None}}
    out = H._judges(data)
    assert "needs repeats" in out and "5 (10.0%)" in out and "3 / 60" in out and "<img" not in out


def test_parse_decisions_reads_what_json_reads(run):
    sel = run["plan"]["select"].prefix
    for sh in raw_shards(run["store"]):
        lines = [x for x in run["store"].read_text(f"{sel}/decisions/{sh[:-4]}.jsonl").splitlines() if x]
        selected, rank, kinds = C.parse_decisions(lines + ['{"selected": false, "key": "x", "reason": "odd: 1"}'])
        ref = [json.loads(x) for x in lines]
        assert selected[:-1].tolist() == [d["selected"] for d in ref]
        assert rank[:-1].tolist() == [d.get("rank", 0) for d in ref]
        assert kinds[:-1].tolist() == ["" if d["selected"] else d["reason"].split(":")[0] for d in ref]
        assert (selected[-1], kinds[-1]) == (False, "odd")


def test_cost_of_a_model_without_a_price_is_unknown_not_zero():
    data = C.ReportData(run="r")
    data.llm = {"a": {"model": "m", "requests": 4, "prompt_tokens": 100, "completion_tokens": 10, "cost_usd": 0.5},
                "b": {"model": "n", "requests": 2, "prompt_tokens": 50, "completion_tokens": 5, "cost_usd": 0,
                      "cost_unknown": True}}
    out = H._cost_section(data)
    assert "$0.5000" in out and out.count("unknown (no price)") == 2   # stage b and the total
