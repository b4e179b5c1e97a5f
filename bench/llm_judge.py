"""Benchmark: the real judge_score stage beside a plain asyncio client, against the same test server.

Contenders, alternating in one run (curate, plain, curate, plain, ...), each round on fresh prompts:

* ``curate``: the ``judge_score`` stage over raw shards in a temp store, exactly as the runner calls it
  (``stage.process_shards(ctx, shards)``: one event loop over all the shards of the stage run): reads the
  raw tars, renders the versioned prompt, sends through :class:`~libcurate.llm.online.LLMClient`, writes
  every reply to the response cache, parses the score, writes sidecars, column files, quarantine, ``_stats``
  and the done markers. Untimed: writing the raw shards before the round.
* ``plain``: what a user would write: ``asyncio`` + one ``openai.AsyncOpenAI`` + a semaphore of the same
  concurrency, ``chat.completions.create`` on prompts rendered in memory beforehand, replies kept in a
  list. No I/O, no cache, no parsing, no retries.

The server is the project's OpenAI-compatible test server (:mod:`libcurate.llm.testing`, aiohttp) in its
own process with ``latency_s`` added to every request. To show it is not the bottleneck, its CPU use is
reported per round (``server_cpu_frac``: CPU seconds over wall seconds), and ``server_capacity_rps`` is
what it answers with no added latency to a bare aiohttp client.

    .venv/bin/python bench/llm_judge.py --samples 2000 --concurrency 64 --latency 0.2 --rounds 3 --json

The last line with ``--json`` is the :func:`run_judge_pair` dict: per-round ``curate_rps`` and
``plain_rps``, ``ratios`` (curate / plain per round) and ``ratio_median``. ``--profile FILE`` runs one
more curate round under cProfile and writes its stats there. ``bench/peers.py`` imports
:func:`run_judge_pair` for its ``judge_vs_plain`` key.
"""

from __future__ import annotations

import os as _os
import sys as _sys

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if __name__ == "__main__":
    # Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
    # would shadow the standard library's `select` (imported by subprocess): put the repository root there.
    _sys.path[0] = _ROOT
elif _ROOT not in _sys.path:
    _sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage  # noqa: E402
from libcurate.llm.testing import make_sample, write_raw_shards  # noqa: E402
from libcurate.stage import StageContext  # noqa: E402
from libcurate.storage import open_store  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, int]:
    """The test server in its own process; returns (process, port)."""
    p = subprocess.Popen([sys.executable, "-m", "libcurate.llm.testing", "--latency", str(latency)],
                         stdout=subprocess.PIPE, text=True, cwd=_ROOT)
    line = p.stdout.readline()
    if not line.startswith("PORT "):
        p.kill()
        raise RuntimeError(f"test server did not start: {line!r}")
    return p, int(line.split()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_samples(n: int, salt: str) -> list:
    from PIL import Image

    img = Image.new("RGB", (64, 64), (120, 80, 40))
    return [make_sample(img, "Describe this image in detail.",
                        f"caption {salt} number {i} " + "word " * (i % 30), i=i) for i in range(n)]


def judge_config(port: int, concurrency: int) -> JudgeScoreConfig:
    return JudgeScoreConfig.from_dict({"llm": {
        "model": "bench-judge", "base_url": f"http://127.0.0.1:{port}/v1", "concurrency": concurrency,
        "timeout_s": 30, "max_attempts": 3}})


def run_curate(port: int, samples: list, n_shards: int, concurrency: int, profile: str | None = None) -> dict:
    """One timed run of the judge_score stage over ``samples`` split into ``n_shards`` raw shards."""
    per = -(-len(samples) // n_shards)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(os.path.join(tmp, "run"))
        write_raw_shards(store, [samples[i:i + per] for i in range(0, len(samples), per)])
        shards = [f"shard-{i:06d}.tar" for i in range(-(-len(samples) // per))]
        stage = JudgeScoreStage(judge_config(port, concurrency))
        ctx = StageContext(store=store, prefix="stages/judge_score/bench")
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile(time.thread_time)  # CPU of the event loop's thread, not wall time
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = list(stage.process_shards(ctx, shards))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        done = sum(store.exists(f"stages/judge_score/bench/_done/{s[:-4]}") for s in shards)
    sent = sum(s["llm"]["requests"] for s in stats)
    return {"rps": sent / dt, "requests": sent, "scored": sum(s["out"] for s in stats), "seconds": dt,
            "cpu_us_per_request": cpu / max(1, sent) * 1e6, "done_markers": done, "shards": len(shards)}


def run_plain(port: int, samples: list, concurrency: int) -> dict:
    """One timed run of the plain client: asyncio + AsyncOpenAI + a semaphore, prompts rendered beforehand."""
    import openai

    from libcurate.llm.prompts import load_template
    from libcurate.llm.judge import IMAGE_UNSEEN, REPLY_TEXT, render_conversation

    tpl = load_template("caption_quality_100")
    prompts = []
    for s in samples:
        (instr, resp), *_ = s.turn_pairs()
        prompts.append(tpl.render(instruction=instr, response=resp, conversation=render_conversation(s),
                                  image_note=IMAGE_UNSEEN, reply_format=REPLY_TEXT.format(lo=0, hi=100)))

    async def go() -> tuple[list, float]:
        client = openai.AsyncOpenAI(api_key="EMPTY", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0,
                                    timeout=30)
        sem = asyncio.Semaphore(concurrency)

        async def one(msgs):
            async with sem:
                r = await client.chat.completions.create(model="bench-judge", messages=msgs, temperature=0.0,
                                                         max_tokens=512)
                return r.choices[0].message.content

        t0, c0 = time.perf_counter(), time.process_time()
        out = await asyncio.gather(*(one(m) for m in prompts))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        await client.close()
        return out, dt, cpu

    out, dt, cpu = asyncio.run(go())
    return {"rps": len(out) / dt, "requests": len(out), "scored": sum(o is not None for o in out), "seconds": dt,
            "cpu_us_per_request": cpu / max(1, len(out)) * 1e6}


TRANSPORTS = {
    # name: (HTTP client factory or None for openai's default, number of openai clients, cast_to object?)
    "httpx_1pool_model": ("httpx", 1, False),
    "httpx_8pools_model": ("httpx", 8, False),
    "httpx_8pools_json": ("httpx", 8, True),
    "aiohttp_model": ("aiohttp", 1, False),
    "aiohttp_json": ("aiohttp", 1, True),
}


def run_transport(port: int, name: str, n: int, concurrency: int) -> dict:
    """The bare request path of an openai client variant (``client.post("/chat/completions")``, one
    short prompt each, no stage around it): how much client CPU each transport and reply parsing cost.
    ``httpx_8pools_model`` was curate's client before (eight openai clients of eight connections, replies
    built into ``ChatCompletion``); ``aiohttp_json`` is curate's client now."""
    import openai
    from openai.types.chat import ChatCompletion

    kind, n_clients, as_json = TRANSPORTS[name]

    async def go():
        def make():
            http = openai.DefaultAioHttpClient(timeout=30) if kind == "aiohttp" else None
            return openai.AsyncOpenAI(api_key="EMPTY", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0,
                                      timeout=30, http_client=http)

        clients = [make() for _ in range(n_clients)]
        sem = asyncio.Semaphore(concurrency)
        cast = object if as_json else ChatCompletion

        async def one(i):
            async with sem:
                body = {"model": "m", "messages": [{"role": "user", "content": f"rate caption {i} " + "word " * 40}],
                        "temperature": 0.0, "max_tokens": 512}
                return await clients[i % n_clients].post("/chat/completions", cast_to=cast, body=body,
                                                          options={"timeout": 30})

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(n)))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        for c in clients:
            await c.close()
        return {"rps": round(n / dt, 1), "cpu_us_per_request": round(cpu / n * 1e6)}

    return asyncio.run(go())


def run_transports(n_requests: int = 2000, concurrency: int = 64, latency_s: float = 0.2, rounds: int = 2,
                   log=None) -> dict:
    """Every :data:`TRANSPORTS` variant, alternating, ``rounds`` times: median req/s and CPU per request."""
    proc, port = start_server(latency_s)
    rows: dict[str, list] = {k: [] for k in TRANSPORTS}
    try:
        for k in TRANSPORTS:
            run_transport(port, k, concurrency, concurrency)  # warm-up
        for _ in range(rounds):
            for k in TRANSPORTS:
                rows[k].append(run_transport(port, k, n_requests, concurrency))
                if log:
                    log(f"{k}: {rows[k][-1]}")
    finally:
        proc.terminate()
        proc.wait(5)
    return {k: {"rps_median": statistics.median(r["rps"] for r in v),
                "cpu_us_per_request_median": statistics.median(r["cpu_us_per_request"] for r in v)}
            for k, v in rows.items()}


def server_capacity(n: int = 2000, concurrency: int = 64) -> float:
    """Requests per second the test server answers with no added latency, to a bare aiohttp client (the
    cheapest client there is): the ceiling the server would put on any contender."""
    import aiohttp

    proc, port = start_server(0.0)

    async def go() -> float:
        sem = asyncio.Semaphore(concurrency)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            async def one(i):
                async with sem:
                    async with s.post(url, json={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
                        await r.json()

            await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return n / (time.perf_counter() - t0)

    try:
        return asyncio.run(go())
    finally:
        proc.terminate()
        proc.wait(5)


def run_judge_pair(n_requests: int = 2000, concurrency: int = 64, latency_s: float = 0.2, rounds: int = 3,
                   n_shards: int = 4, profile: str | None = None, log=None) -> dict:
    """curate's judge stage and the plain client, alternating for ``rounds`` rounds against one test server.

    Returns per-round ``curate_rps`` / ``plain_rps``, their ``ratios`` (curate / plain), ``ratio_median``
    and the medians of both rates, with the server's CPU share per contender and round.
    """
    proc, port = start_server(latency_s)
    rows = {"curate": [], "plain": []}
    try:
        # Untimed warm-up of both contenders (imports, first connections): one-time costs, not throughput.
        run_curate(port, make_samples(concurrency, "warm"), 1, concurrency)
        run_plain(port, make_samples(concurrency, "warm"), concurrency)
        for r in range(rounds):
            for who in ("curate", "plain"):
                samples = make_samples(n_requests, f"{who}{r}")
                c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                res = (run_curate(port, samples, n_shards, concurrency) if who == "curate"
                       else run_plain(port, samples, concurrency))
                res["server_cpu_frac"] = (cpu_seconds(proc.pid) - c0) / (time.perf_counter() - t0)
                if res["scored"] != n_requests or res["requests"] != n_requests:
                    raise RuntimeError(f"{who} round {r}: {res}")
                rows[who].append(res)
                if log:
                    log(f"round {r} {who}: {res['rps']:.1f} req/s ({res['seconds']:.2f} s, client CPU "
                        f"{res['cpu_us_per_request']:.0f} us/request, server CPU {res['server_cpu_frac']:.0%})")
        prof_row = run_curate(port, make_samples(n_requests, "profile"), n_shards, concurrency, profile) \
            if profile else None
    finally:
        proc.terminate()
        proc.wait(5)
    cur = [round(x["rps"], 1) for x in rows["curate"]]
    pla = [round(x["rps"], 1) for x in rows["plain"]]
    ratios = [round(a["rps"] / b["rps"], 3) for a, b in zip(rows["curate"], rows["plain"])]
    out = {"curate_rps": cur, "plain_rps": pla, "ratios": ratios, "ratio_median": statistics.median(ratios),
           "curate_rps_median": statistics.median(cur), "plain_rps_median": statistics.median(pla),
           "cpu_us_per_request": {k: [round(x["cpu_us_per_request"]) for x in v] for k, v in rows.items()},
           "server_cpu_frac": {k: [round(x["server_cpu_frac"], 2) for x in v] for k, v in rows.items()},
           "load_avg_1m": round(os.getloadavg()[0], 2),
           "n_requests": n_requests, "concurrency": concurrency, "latency_s": latency_s, "rounds": rounds,
           "shards": n_shards, "ideal_rps": round(concurrency / latency_s, 1) if latency_s else None}
    out["server_capacity_rps"] = round(server_capacity(n_requests, concurrency), 1)
    if prof_row is not None:
        out["profiled_curate_rps"] = round(prof_row["rps"], 1)
        out["profile"] = profile_breakdown(profile, prof_row["requests"])
    return out


# Where the curate contender's event-loop thread spends its CPU (cProfile on time.thread_time), by part
# of the work: (label, pstats function pattern). Cumulative times, so a part includes what it calls; the
# parts do not overlap. Cache writes themselves run on pool threads and are not in this profile.
PARTS = [
    ("read raw shards (tar, records)", r"libcurate/llm/stage\.py:\d+\(inputs\)"),
    ("plan: prompt rendering, request", r"libcurate/llm/judge\.py:\d+\(plan\)"),
    ("cache key (sha256 of canonical JSON)", r"libcurate/llm/messages\.py:\d+\(cache_key\)"),
    ("cache lookup", r"libcurate/llm/cache\.py:\d+\(get\)"),
    ("cache write hand-off (JSON + buffer)", r"libcurate/llm/cache\.py:\d+\(put_nowait\)"),
    ("HTTP: openai client + aiohttp", r"openai/_base_client\.py:\d+\(request\)"),
    ("record: parse score, sidecar dict", r"libcurate/llm/judge\.py:\d+\(record\)"),
    ("sidecar + column write (JSON, tar)", r"libcurate/stage\.py:\d+\(write_json\)"),
    ("shard finish (quarantine, _stats, done)", r"libcurate/stage\.py:\d+\(finish\)"),
]


def cache_write_cpu_us(n: int = 2000) -> float:
    """CPU microseconds per entry of the response cache's background writes (the pool thread's part, which
    the event-loop profile does not see): ``n`` entries shaped like the judge's, through
    :class:`~libcurate.llm.cache.ResponseCache` into a temp local store, timed with ``time.thread_time``."""
    import concurrent.futures
    import hashlib

    from libcurate.llm.cache import ResponseCache

    entry = {"text": "88\nA clear, specific caption.", "finish_reason": "stop", "model": "bench-judge",
             "template_version": "caption_quality_100@0123456789ab", "time": time.time(),
             "usage": {"prompt_tokens": 180, "completion_tokens": 8}, "response_model": "bench-judge"}
    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(open_store(tmp), "llm_cache", concurrent.futures.ThreadPoolExecutor(1))
        batch = [(hashlib.sha256(str(i).encode()).hexdigest(), json.dumps(entry).encode()) for i in range(n)]
        t0 = time.thread_time()
        cache._write_batch(batch)
        return (time.thread_time() - t0) / n * 1e6


def profile_breakdown(path: str, n_requests: int) -> dict:
    """Microseconds per request of each :data:`PARTS` entry in a cProfile dump, plus the rest (event
    loop, asyncio, the stage's own loop) and the total."""
    import pstats
    import re

    st = pstats.Stats(path)
    total = st.total_tt
    out = {}
    for label, pat in PARTS:
        rx = re.compile(pat)
        cum = sum(v[3] for k, v in st.stats.items() if rx.search(f"{k[0]}:{k[1]}({k[2]})"))
        out[label] = round(cum / n_requests * 1e6, 1)
    out["rest: event loop, asyncio, stage loop"] = round(total / n_requests * 1e6 - sum(out.values()), 1)
    out["total CPU of the event loop's thread"] = round(total / n_requests * 1e6, 1)
    out["cache write on a pool thread (measured apart, no cProfile)"] = round(cache_write_cpu_us(n_requests), 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="requests per contender and round")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default=None, help="write cProfile stats of one extra curate round here")
    ap.add_argument("--transports", action="store_true",
                    help="instead: the bare openai request path with each HTTP transport / reply parsing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.transports:
        res = run_transports(args.samples, args.concurrency, args.latency, args.rounds,
                             log=None if args.json else print)
        print(json.dumps(res))
        return 0
    res = run_judge_pair(args.samples, args.concurrency, args.latency, args.rounds, args.shards, args.profile,
                         log=None if args.json else print)
    if not args.json:
        for k, v in (res.get("profile") or {}).items():
            print(f"  {k:<48} {v:>8.1f} us/request")
        print(f"curate {res['curate_rps']} req/s, plain {res['plain_rps']} req/s, ratios {res['ratios']} "
              f"(median {res['ratio_median']}); ideal {res['ideal_rps']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
