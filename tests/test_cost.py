"""Cost: the image-token rule, prices (table, recipe override, unknown), `curate estimate` against the tokens
the test server counted over real HTTP, actual totals in audit and summary.json, and `max_cost`."""

from __future__ import annotations

import json

import pytest

from libcurate.audit import audit
from libcurate.cli import main as cli_main
from libcurate.llm.cost import PRICES, ensure_raw, estimate_recipe, image_tokens, request_cost, table_price
from libcurate.llm.settings import LLMSettings
from libcurate.llm.testing import FakeOpenAIServer
from libcurate.pipeline import load_recipe
from libcurate.runner import run_recipe
from libcurate.stage import PermanentInputError
from libcurate.storage import open_store

from .conftest import jpeg_bytes
from .test_ingest import llava, write_dataset


def test_image_tokens_follow_openais_examples():
    assert image_tokens(1024, 1024, "high") == 765       # 4 tiles
    assert image_tokens(2048, 4096, "high") == 1105      # -> 1024 x 2048 -> 768 x 1536: 6 tiles
    assert image_tokens(4096, 8192, "low") == 85
    assert image_tokens(100, 100, "auto") == 255         # auto counted as high


def test_prices_table_snapshot_override_and_unknown():
    s = LLMSettings()
    assert table_price("gpt-4o-mini-2024-07-18") == PRICES["gpt-4o-mini"]
    assert request_cost(s, "gpt-4o-mini", 1_000_000, 0) == pytest.approx(PRICES["gpt-4o-mini"][0])
    assert request_cost(LLMSettings(batch_api=True), "gpt-4o", 0, 1_000_000) == pytest.approx(PRICES["gpt-4o"][1] / 2)
    assert request_cost(s, "my-local-model", 10, 10) is None
    s2 = LLMSettings(prices={"my-local-model": {"input_per_1m": 1.0, "output_per_1m": 2.0}})
    assert request_cost(s2, "my-local-model", 1000, 500) == pytest.approx(0.002)
    assert request_cost(LLMSettings(price_prompt_per_1k=1.0), "anything", 1000, 0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        LLMSettings(prices={"m": {"input_per_1m": -1, "output_per_1m": 0}})


def make_src(tmp_path, photos):
    names = sorted(photos)
    files = {f"{i}.jpg": jpeg_bytes(photos[names[i % len(names)]], size=(1100, 700)) for i in range(6)}
    answers = ["Yes.", "3", "No", "A wooden table stands in a bright kitchen next to a window.", "7", "yes"]
    recs = [llava(f"r{i}", f"images/{i}.jpg", q=f"Question {i}: what is there?", a=answers[i]) for i in range(6)]
    return write_dataset(tmp_path / "src", recs, files), str(tmp_path / "src")


def recipe(tmp_path, ann, images, srv, **top):
    llm = {"base_url": srv.base_url, "max_attempts": 1, **top.pop("llm", {})}
    return load_recipe({"storage": {"prefix": str(tmp_path / "run")}, **top, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": images}},
        {"stage": "judge_score", "as": "judge", "with": {"prompt": "alpagasus_5", "with_image": True,
                                                          "image_detail": "high", "llm": llm}},
        {"stage": "blind_answer", "as": "blind", "with": {"llm": llm}},
        {"stage": "export", "with": {"formats": ["llava"]}}]})


def responder(body):
    last = body["messages"][-1]["content"]
    text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
    if "<candidate>" in text:
        return "SAME"
    if "<question>" in text:  # blind answers: the comparator sees the reference's own length
        return "A wooden table stands in a bright kitchen next to a window." if "Question 3" in text else "yes"
    return "4\nfine"


def test_estimate_matches_the_tokens_the_server_counted(tmp_path, photos, capsys):
    ann, images = make_src(tmp_path, photos)
    with FakeOpenAIServer(responder=responder) as srv:
        r = recipe(tmp_path, ann, images, srv)
        assert ensure_raw(r) and srv.count == 0          # ingest only: nothing sent
        est = estimate_recipe(r)
        assert srv.count == 0
        by = {e["id"]: e for e in est["stages"]}
        assert by["judge"]["requests"] == 6 and by["blind"]["requests"] == 6 + 1  # one comparator (long answer)
        assert by["judge"]["cost_usd"] > 0 and est["total"]["cost_usd"] == pytest.approx(
            by["judge"]["cost_usd"] + by["blind"]["cost_usd"], abs=1e-6)
        run_recipe(r, progress=False)
        sent = srv.count
    rep = audit(open_store(r.prefix))
    stages = {p.split("/")[1]: a for p, a in rep["stages"].items() if p.startswith("stages/")}
    for sid in ("judge", "blind"):
        counted = stages[sid]["llm"]["prompt_tokens"]
        assert abs(by[sid]["input_tokens"] - counted) <= 0.05 * counted, (sid, by[sid]["input_tokens"], counted)
    assert by["judge"]["input_tokens"] > 6 * 1105  # the 1100 x 700 image is 6 tiles at high detail
    assert sent == by["judge"]["requests"] + by["blind"]["requests"]
    # actual totals: audit (text and JSON) and summary.json
    t = rep["llm_total"]
    assert t["requests"] == sent and t["cost_usd"] > 0 and t["unpriced_requests"] == 0
    store = open_store(r.prefix)
    summ = [p for p in store.list("export") if p.endswith("summary.json")]
    summary = json.loads(store.read_text("export/" + summ[0]))
    assert summary["llm"]["total"]["prompt_tokens"] == t["prompt_tokens"]
    assert summary["llm"]["stages"]["judge"]["cost_usd"] == stages["judge"]["llm"]["cost_usd"]
    assert cli_main(["audit", r.prefix]) == 0
    assert f"{t['requests']} requests" in capsys.readouterr().out


def test_max_cost_stops_before_the_first_request(tmp_path, photos):
    ann, images = make_src(tmp_path, photos)
    with FakeOpenAIServer(responder=responder) as srv:
        with pytest.raises(PermanentInputError, match="exceeds max_cost"):
            run_recipe(recipe(tmp_path, ann, images, srv, max_cost=0.0001), progress=False)
        assert srv.count == 0
        run_recipe(recipe(tmp_path, ann, images, srv, max_cost=1.0), progress=False)  # within budget: runs
        assert srv.count == 13
        # a re-run is answered from the cache: estimated at 0, the tiny budget no longer stops it
        run_recipe(recipe(tmp_path, ann, images, srv, max_cost=0.0001), progress=False)
        assert srv.count == 13


def test_unknown_price_is_unknown_not_zero(tmp_path, photos, capsys):
    ann, images = make_src(tmp_path, photos)
    with FakeOpenAIServer(responder=responder) as srv:
        r = recipe(tmp_path, ann, images, srv, llm={"model": "my-local-model"})
        with pytest.raises(PermanentInputError, match="unknown"):
            run_recipe(recipe(tmp_path, ann, images, srv, llm={"model": "my-local-model"}, max_cost=5.0),
                       progress=False)
        assert srv.count == 0
        assert cli_main(["estimate", str(_write(tmp_path, r)), "--json"]) == 0
        est = json.loads(capsys.readouterr().out)
        assert est["total"]["cost_usd"] is None and "my-local-model" in est["warnings"][0]
        run_recipe(r, progress=False)
        assert audit(open_store(r.prefix))["llm_total"]["cost_usd"] is None
        priced = recipe(tmp_path, ann, images, srv, llm={"model": "my-local-model"},
                        prices={"my-local-model": {"input_per_1m": 1.0, "output_per_1m": 2.0}})
        est = estimate_recipe(priced)  # everything is cached now: 0 requests, cost 0 (known)
        assert est["total"]["cost_usd"] == 0 and est["total"]["cached_requests"] == 13


def _write(tmp_path, r):
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"storage": {"prefix": r.prefix}, "stages": r.stages}))
    return p


def caption_or_grade_reply(body):
    """The test server's reply: a grade for a judge prompt, a long caption for a generator prompt."""
    last = body["messages"][-1]["content"]
    text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
    if "Grade" in text:
        return "4\nfine"
    return f"A long generated caption, number {len(json.dumps(body))}, with a good number of words in it."


def test_max_cost_is_checked_again_once_generated_samples_exist(tmp_path, photos):
    """The first check sees only the ingested samples; before the judge starts, the samples the generator
    wrote are in the store too and push the estimate over the budget: the judge sends nothing."""
    ann, images = make_src(tmp_path, photos)

    with FakeOpenAIServer(responder=caption_or_grade_reply) as srv:
        def rec(**top):
            llm = {"base_url": srv.base_url, "max_attempts": 1}
            return load_recipe({"storage": {"prefix": str(tmp_path / "run")}, **top, "stages": [
                {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": images}},
                {"stage": "generate_caption", "as": "gen", "with": {"min_words": 3, "llm": llm}},
                {"stage": "judge_score", "as": "judge", "with": {"prompt": "alpagasus_5", "llm": llm}}]})

        ensure_raw(rec())
        by = {e["id"]: e for e in estimate_recipe(rec())["stages"]}
        assert by["judge"]["requests"] == 6  # the generated samples do not exist yet
        budget = by["gen"]["cost_usd"] + 1.5 * by["judge"]["cost_usd"]
        with pytest.raises(PermanentInputError, match="before judge sent anything"):
            run_recipe(rec(max_cost=budget), progress=False)
        assert srv.count == by["gen"]["requests"] and all("Grade" not in json.dumps(b) for b in srv.requests)
