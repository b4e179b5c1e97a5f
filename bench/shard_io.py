"""Per-sample CPU cost of writing and reading a WebDataset shard: curate's tar/.npy code beside the plain tools.

    .venv/bin/python bench/shard_io.py --json                    # 2,000 samples, 5 rounds
    .venv/bin/python bench/shard_io.py --samples 500 --rounds 3

A sample is what a scoring stage's sidecar plus its raw shard carry: a ~300-byte JSON record, a 100 KB
image (random bytes: the tar layer never decodes it) and two small fp16 arrays ([1, 512] and [2, 512]).

* **write**: encode both arrays and write the four members of every sample to a shard in a local store.
  curate: ``ShardWriter`` + ``npy_bytes``. plain: webdataset's ``TarWriter`` with the float mtime curate
  used before (``mtime=0.0``: tarfile then writes a pax header per member) + ``np.save`` into a BytesIO.
* **read**: read the shard back sample by sample and decode both arrays. curate: ``iter_members`` +
  ``npy_load`` on the shard it wrote. plain: webdataset's ``url_opener`` / ``tar_file_expander`` /
  ``group_by_keys`` (what ``iter_members`` was before) + ``np.load`` on the shard the plain writer wrote.
  ``read_old_format`` is curate's reader on that older, pax-header shard (what existing shards cost).
* **npy**: the array part alone (encode + decode both arrays of a sample), to separate it from tar.
* **write_json**: a score sidecar through ``ShardOutput.write_json`` (the JSON record + both arrays, the
  column files at the end). curate: the arrays passed as ndarrays (serialised once, the same arrays go
  to the column builder). plain: passed as ``np.save`` bytes, as callers did, which ``write_json``
  decodes again for the columns. Both go through today's ``ShardOutput``: the ratio is the hand-off.

Each round times every contender once, alternating which goes first; each figure is the median over
rounds of CPU time (``time.process_time``: the machine is shared, wall time is noisier) per sample, in
microseconds; ratios are plain / curate of the medians. Wall-clock medians are printed beside them.
"""

from __future__ import annotations

import os
import sys

# bench/ comes first on the import path when run as a script; the repository root must win (see select.py).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from libcurate.shards import ShardWriter, iter_members, npy_bytes, npy_load  # noqa: E402
from libcurate.stage import ShardOutput  # noqa: E402
from libcurate.storage import open_store  # noqa: E402


def make_samples(n: int, image_bytes: int, seed: int = 0) -> list[tuple[str, bytes, bytes, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"{i:024x}"
        rec = {"key": key, "conversations": [{"from": "human", "value": "<image>\nWhat is shown? " * 4},
                                             {"from": "gpt", "value": "A photo of a thing on a table."}],
               "source": {"dataset": "bench", "id": str(i)}, "score": float(rng.random())}
        arrays = {"img_emb.npy": rng.standard_normal((1, 512)).astype(np.float16),
                  "txt_emb.npy": rng.standard_normal((2, 512)).astype(np.float16)}
        out.append((key, json.dumps(rec, sort_keys=True).encode(), rng.bytes(image_bytes), arrays))
    return out


def _np_save(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_curate(store, rel, samples) -> None:
    with ShardWriter(store, rel) as w:
        for key, js, img, arrays in samples:
            members = {"json": js, "jpg": img}
            for name, a in arrays.items():
                members[name] = npy_bytes(a)
            w.write(key, members)


def write_plain(store, rel, samples) -> None:
    import webdataset as wds

    with store.open_write(rel) as f:
        tw = wds.TarWriter(f, mtime=0.0, user="curate", group="curate", mode=0o644)
        for key, js, img, arrays in samples:
            obj = {"__key__": key, "json": js, "jpg": img}
            for name, a in arrays.items():
                obj[name] = _np_save(a)
            tw.write(obj)
        tw.close()


def read_curate(url) -> int:
    n = 0
    for m in iter_members(url):
        npy_load(m["img_emb.npy"])
        npy_load(m["txt_emb.npy"])
        n += 1
    return n


def _raise(e):
    raise e


def read_plain(url) -> int:
    import webdataset as wds

    ti = wds.tariterators
    n = 0
    streams = ti.url_opener([{"url": url}], handler=_raise)
    for m in ti.group_by_keys(ti.tar_file_expander(streams, handler=_raise), handler=_raise):
        np.load(io.BytesIO(m["img_emb.npy"]), allow_pickle=False)
        np.load(io.BytesIO(m["txt_emb.npy"]), allow_pickle=False)
        n += 1
    return n


def npy_curate(samples) -> None:
    for _, _, _, arrays in samples:
        for a in arrays.values():
            npy_load(npy_bytes(a))


def npy_plain(samples) -> None:
    for _, _, _, arrays in samples:
        for a in arrays.values():
            np.load(io.BytesIO(_np_save(a)), allow_pickle=False)


def sidecar(store, prefix, samples, as_bytes: bool) -> None:
    out = ShardOutput(store, prefix, "shard-000000")
    for key, js, _, arrays in samples:
        rec = json.loads(js)
        out.write_json(key, rec, {n: _np_save(a) for n, a in arrays.items()} if as_bytes else arrays)
    out.finish(n_in=len(samples))


def _timed(fn, *args) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    fn(*args)
    return time.process_time() - c, time.perf_counter() - t


def run(n: int, rounds: int, image_bytes: int) -> dict:
    samples = make_samples(n, image_bytes)
    with tempfile.TemporaryDirectory(prefix="curate-bench-shard-io-") as tmp:
        store = open_store(tmp)
        # warm-up (imports, page cache, npy header caches) and the correctness checks
        write_curate(store, "curate.tar", samples)
        write_plain(store, "plain.tar", samples)
        cu, pu = store.uri("curate.tar"), store.uri("plain.tar")
        assert read_curate(cu) == read_plain(pu) == read_curate(pu) == n
        a, b = list(iter_members(cu)), list(iter_members(pu))
        assert len(a) == len(b) and all({k: v for k, v in x.items() if k != "__url__"}
                                        == {k: v for k, v in y.items() if k != "__url__"} for x, y in zip(a, b)), \
            "the two shards hold different members"
        sizes = {"curate": os.path.getsize(cu), "plain": os.path.getsize(pu)}
        sidecar(store, "side/a", samples, False)
        sidecar(store, "side/b", samples, True)
        for rel in store.list("side/a"):
            if rel.startswith("_stats/"):
                continue  # holds the seconds taken
            assert store.read_bytes(f"side/a/{rel}") == store.read_bytes(f"side/b/{rel}"), rel
        del a, b
        jobs = {
            "write": (lambda: write_curate(store, "curate.tar", samples),
                      lambda: write_plain(store, "plain.tar", samples)),
            "read": (lambda: read_curate(cu), lambda: read_plain(pu)),
            "read_old_format": (lambda: read_curate(pu), lambda: read_plain(pu)),
            "npy": (lambda: npy_curate(samples), lambda: npy_plain(samples)),
            "write_json": (lambda: sidecar(store, "side/a", samples, False),
                           lambda: sidecar(store, "side/b", samples, True)),
        }
        cpu: dict[str, dict[str, list[float]]] = {k: {"curate": [], "plain": []} for k in jobs}
        wall: dict[str, dict[str, list[float]]] = {k: {"curate": [], "plain": []} for k in jobs}
        for r in range(rounds):
            for name, (fc, fp) in jobs.items():
                order = [("curate", fc), ("plain", fp)]
                if r % 2:
                    order.reverse()
                for who, fn in order:
                    c, w = _timed(fn)
                    cpu[name][who].append(c)
                    wall[name][who].append(w)
    res: dict = {"samples": n, "rounds": rounds, "image_bytes": image_bytes, "shard_bytes": sizes,
                 "shard_bytes_per_sample": {k: round(v / n, 1) for k, v in sizes.items()}}
    for name in jobs:
        med = {who: statistics.median(v) / n * 1e6 for who, v in cpu[name].items()}
        medw = {who: statistics.median(v) / n * 1e6 for who, v in wall[name].items()}
        res[name] = {"curate_cpu_us": round(med["curate"], 1), "plain_cpu_us": round(med["plain"], 1),
                     "ratio_cpu": round(med["plain"] / med["curate"], 2),
                     "curate_wall_us": round(medw["curate"], 1), "plain_wall_us": round(medw["plain"], 1),
                     "ratio_wall": round(medw["plain"] / medw["curate"], 2)}
    res["load_average"] = os.getloadavg()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image-bytes", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args()
    res = run(args.samples, args.rounds, args.image_bytes)
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return
    print(f"{res['samples']} samples, {res['rounds']} rounds, shard bytes per sample {res['shard_bytes_per_sample']}")
    for name in ("write", "read", "read_old_format", "npy", "write_json"):
        r = res[name]
        print(f"{name:16s} curate {r['curate_cpu_us']:8.1f} us  plain {r['plain_cpu_us']:8.1f} us  "
              f"x{r['ratio_cpu']:.2f} (cpu)   wall x{r['ratio_wall']:.2f}")


if __name__ == "__main__":
    main()
