"""curate beside its peers, on the same shards, the same weights and the same machine at the same time.

Contenders (each round runs every contender once, A B C A B C ..., each in a fresh process; the figure
of a contender is its samples / seconds of the timed region; ratios are taken per round, then the
median over rounds is reported):

* ``curate``: the ``score_clip`` stage with its default settings (only ``model`` set), which writes
  one sidecar shard per raw shard (per-sample JSON scores + fp16 image and text embeddings), a column
  file and stats/done markers.
* ``plain``: the loop a user would write: open_clip + PIL (``preprocess``) + webdataset + a torch
  ``DataLoader`` (2 workers = the cores, batch 64), torch's default threads, image + text forward,
  cosine per sample; it keeps keys, scores and fp16 embeddings and writes them as ``.npy`` at the end.
* ``clip_retrieval``: ``clip_retrieval.clip_inference`` 2.45.0 (webdataset input, batch 64, 2
  preprocessing workers, image + text embeddings; it writes fp16 ``img_emb``/``text_emb`` ``.npy`` and a
  parquet of keys and captions), installed by this script into its own virtual environment
  ``build/peers-venv`` (its own open_clip 2.x, webdataset 0.2, numpy 1.x; torch/torchvision are the
  project's pinned 2.14.1/0.29.1, seen through a ``.pth`` file, not a second 6 GB copy). If the
  install fails the contender is skipped and the reason is printed.
* ``bare`` (ViT-B-32 only): open_clip's ``encode_image`` + ``encode_text`` on ready (normalised)
  tensors, batch 64, torch's default threads, as many images as the shards hold (``--vitb-samples``
  rounded down to whole batches): the ceiling of a loop that calls open_clip's forward.
* ``bare_curate_forward`` (ViT-B-32 only): the same with curate's own forward of the same model (uint8
  in with the normalisation folded into the patch conv, the text tower cut at the batch's last
  end-of-text token): the ceiling of curate's pipeline; ``vitb32_end_to_end_over_curate_forward`` is
  the share of it the stage keeps end to end.

Untimed, for every contender: interpreter start, imports, model build and loading of the weights
(clip-retrieval's own warm-up forward happens at its model load, which is done before the clock
starts by calling its cached loader with the same arguments it uses). Timed: everything from the first
shard read to the last output written (curate's timed region includes its start-up measurement of the
thread/worker split).

The weights: the random-initialised model of curate's test config (``test-tiny-clip``, or
``test-random-vit-b-32`` = open_clip ViT-B-32) is saved once as a state dict; the plain loop and
clip-retrieval build the open_clip architecture (the tiny one registered with ``add_model_config``) and
load it; curate's seeded test model is the same tensors (checked: the saved state dict is compared with
curate's model, and the embeddings of the first samples written by each contender are compared).

The shards: real photos (scikit-image), random crops resized to 256-640 px, JPEG q90, with a ``txt``
member for the peers (bench/score_clip.py's ``make_shards``).

    .venv/bin/python bench/peers.py --json
    .venv/bin/python bench/peers.py --configs tiny --tiny-samples 1000 --rounds 3

``--json`` prints one JSON object at the end with the keys ``clip_tiny_vs_plain``,
``clip_tiny_vs_clip_retrieval``, ``clip_vitb32_vs_plain``, ``clip_vitb32_vs_clip_retrieval``,
``vitb32_end_to_end_over_bare``, ``judge_vs_plain`` (from bench/llm_judge.py's ``run_judge_pair``),
``tiny_ceiling``, ``clip_tiny_decode_deviation`` / ``clip_vitb32_decode_deviation`` (the fast decoders'
score deviation against open_clip's exact preprocessing on the benchmark's photos) and per-config
details (every round's rates).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
# would shadow the standard library's `select` (imported by subprocess): put the repository root there.
_sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_VENV = os.path.join(ROOT, "build", "peers-venv")
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
CONFIGS = {"tiny": "test-tiny-clip", "vitb32": "test-random-vit-b-32"}
OPEN_CLIP_ARCH = {"tiny": "curate-tiny-clip", "vitb32": "ViT-B-32"}
BATCH = 64
PEER_WORKERS = 2


# -- setup (untimed) ------------------------------------------------------------------------------
def ensure_peers_venv(log) -> tuple[str | None, str]:
    """The python of build/peers-venv with clip-retrieval installed, or (None, why not)."""
    py = os.path.join(PEERS_VENV, "bin", "python")
    marker = os.path.join(PEERS_VENV, ".clip-retrieval-installed")
    if os.path.exists(marker):
        return py, "installed"
    try:
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        base = getattr(sys, "_base_executable", None) or sys.executable
        log(f"installing {CLIP_RETRIEVAL} into {PEERS_VENV} (once)")
        subprocess.run([base, "-m", "venv", PEERS_VENV], check=True, capture_output=True)
        vsite = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(vsite, "curate_pinned_torch.pth"), "w") as f:
            f.write(site + "\n")  # the project's pinned torch/torchvision, seen after the venv's own
        cons = os.path.join(PEERS_VENV, "constraints.txt")
        with open(cons, "w") as f:
            f.write("torch==2.14.1\ntorchvision==0.29.1\n")
        # setuptools < 81: clip-anytorch (a clip-retrieval dependency) imports pkg_resources
        r = subprocess.run([py, "-m", "pip", "install", "-q", CLIP_RETRIEVAL, "setuptools<81", "-c", cons],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode:
            return None, f"pip install {CLIP_RETRIEVAL} failed: {r.stderr.strip()[-500:]}"
        r = subprocess.run([py, "-c", "from clip_retrieval.clip_inference.main import main"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            return None, f"clip_retrieval does not import: {r.stderr.strip()[-500:]}"
        open(marker, "w").close()
        return py, "installed now"
    except Exception as e:  # no network, no venv module...: skip the contender with the reason
        return None, f"{type(e).__name__}: {e}"


def prepare(config: str, samples: int, per_shard: int, workdir: str) -> dict:
    """Shards, the saved weights and (tiny) the open_clip config; returns the paths."""
    import torch

    from bench.score_clip import make_shards
    from libcurate.models.clip import TINY_CLIP_CFG, load_clip
    from libcurate.storage import open_store

    store = open_store(workdir)
    shards = make_shards(store, samples, per_shard)
    bundle = load_clip(CONFIGS[config])
    weights = os.path.join(workdir, "weights.pt")
    torch.save(bundle.model.state_dict(), weights)
    cfg_dir = os.path.join(workdir, "open_clip_cfg")
    os.makedirs(cfg_dir, exist_ok=True)
    if config == "tiny":
        with open(os.path.join(cfg_dir, f"{OPEN_CLIP_ARCH[config]}.json"), "w") as f:
            json.dump(TINY_CLIP_CFG, f)
    n = len(shards)
    braced = os.path.join(workdir, "raw", "shard-{%06d..%06d}.tar" % (0, n - 1) if n > 1 else shards[0])
    return {"config": config, "root": workdir, "shards": shards, "braced": braced,
            "urls": [os.path.join(workdir, "raw", s) for s in shards], "weights": weights,
            "cfg_dir": cfg_dir, "arch": OPEN_CLIP_ARCH[config], "samples": samples}


# -- contenders (each runs in its own process: `peers.py --contender NAME --spec FILE`) -------------
def contender_curate(spec: dict, out: str) -> dict:
    from libcurate.models.clip import load_clip
    from libcurate.scoring.clip import ClipConfig, ClipStage
    from libcurate.stage import StageContext
    from libcurate.storage import open_store

    name = CONFIGS[spec["config"]]
    # model build: untimed, as for the others (the stage's own call, argument for argument: load_clip's
    # cache keys on the arguments as given)
    load_clip(name, None, "cpu")
    store = open_store(spec["root"])
    stage = ClipStage(ClipConfig.from_dict({"model": name}))  # curate's defaults
    ctx = StageContext(store=store, prefix=os.path.relpath(out, spec["root"]), workers=1)
    t0 = time.perf_counter()
    stats = stage.process_shards(ctx, spec["shards"])
    dt = time.perf_counter() - t0
    return {"samples": sum(s["out"] for s in stats), "seconds": dt, "split": stage.split.as_dict()}


def contender_plain(spec: dict, out: str) -> dict:
    import numpy as np
    import open_clip
    import torch
    import webdataset as wds

    open_clip.add_model_config(spec["cfg_dir"])
    model, _, preprocess = open_clip.create_model_and_transforms(spec["arch"], pretrained=spec["weights"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec["arch"])
    t0 = time.perf_counter()
    ds = (wds.WebDataset(spec["urls"], shardshuffle=False).decode("pil")
          .to_tuple("__key__", "img0.jpg", "txt")
          .map_tuple(lambda k: k, preprocess, lambda t: tokenizer([t])[0])
          .batched(BATCH))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=PEER_WORKERS)
    keys, scores, img_embs, txt_embs = [], [], [], []
    with torch.no_grad():
        for k, images, tokens in loader:
            img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
            keys += list(k)
            scores.append((img * txt).sum(-1).numpy())
            img_embs.append(img.half().numpy())
            txt_embs.append(txt.half().numpy())
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "keys.npy"), np.array(keys))
    np.save(os.path.join(out, "scores.npy"), np.concatenate(scores))
    np.save(os.path.join(out, "img_emb.npy"), np.concatenate(img_embs))
    np.save(os.path.join(out, "txt_emb.npy"), np.concatenate(txt_embs))
    return {"samples": len(keys), "seconds": time.perf_counter() - t0}


CLIP_RETRIEVAL_DRIVER = r'''
import json, os, sys, time
spec, out = json.loads(sys.argv[1]), sys.argv[2]
import open_clip
open_clip.add_model_config(spec["cfg_dir"])
from all_clip import load_clip
from clip_retrieval.clip_inference import main as cr_main
from clip_retrieval.clip_inference.main import main
# The clock stops when the outputs are written: clip_inference then calls LoggerReader.end(), which
# joins its stats-reader process (it polls the stats folder: ~10-20 s of fixed wind-down that writes
# nothing the user asked for). Record the moment end() is entered.
_end = cr_main.LoggerReader.end
stopped = []
def _timed_end(self):
    stopped.append(time.perf_counter())
    return _end(self)
cr_main.LoggerReader.end = _timed_end
model = "open_clip:" + spec["arch"] + "/" + spec["weights"]
# clip_inference's worker and mapper call this cached loader with exactly these arguments: load (and
# warm up) here, before the clock starts
load_clip(clip_model=model, use_jit=False, warmup_batch_size=spec["batch"], clip_cache_path=None)
t0 = time.perf_counter()
main(input_dataset=spec["braced"], output_folder=out, input_format="webdataset", batch_size=spec["batch"],
     num_prepro_workers=spec["workers"], enable_text=True, enable_image=True, wds_image_key="img0.jpg",
     wds_caption_key="txt", clip_model=model, use_jit=False)
dt = stopped[0] - t0
import numpy as np
n = sum(np.load(os.path.join(out, "img_emb", f)).shape[0] for f in os.listdir(os.path.join(out, "img_emb")))
print("\nPEERS_RESULT " + json.dumps({"samples": n, "seconds": dt}))
'''


def contender_bare(spec: dict, out: str, curate_forward: bool = False) -> dict:
    """open_clip's ``encode_image`` + ``encode_text`` on ready tensors (``curate_forward``: curate's own
    forward of the same model: folded normalisation on uint8, text tower cut at the last end token)."""
    import torch

    from libcurate.models.clip import load_clip, short_text_encoder, uint8_image_encoder

    bundle = load_clip(CONFIGS[spec["config"]])
    h, w = bundle.image_size
    x = torch.randint(0, 256, (BATCH, 3, h, w), dtype=torch.uint8)
    t = bundle.tokenizer(["A photo of a cat, variant 1. It was cropped and resized."] * BATCH)
    if curate_forward:
        enc_img, enc_txt = uint8_image_encoder(bundle), short_text_encoder(bundle)
    else:
        mean = torch.tensor(bundle.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(bundle.std).view(1, 3, 1, 1) * 255
        x = (x.float() - mean) / std
        enc_img, enc_txt = bundle.model.encode_image, bundle.model.encode_text
    n_batches = max(1, spec["samples"] // BATCH)
    with torch.inference_mode():
        enc_img(x[:2]), enc_txt(t[:2])  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_batches):
            enc_img(x), enc_txt(t)
    return {"samples": n_batches * BATCH, "seconds": time.perf_counter() - t0}


CONTENDERS = {"curate": contender_curate, "plain": contender_plain, "bare": contender_bare,
              "bare_curate_forward": lambda spec, out: contender_bare(spec, out, curate_forward=True)}


def run_contender(name: str, spec: dict, out: str, peers_py: str | None) -> dict:
    """One contender in a fresh process; its result dict (samples, seconds, sps)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if name == "clip_retrieval":
        payload = dict(spec, batch=BATCH, workers=PEER_WORKERS)
        cmd = [peers_py, "-c", CLIP_RETRIEVAL_DRIVER, json.dumps(payload), out]
        env["PYTHONPATH"] = ""
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--spec", json.dumps(spec),
               "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PEERS_RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"{name} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    res = json.loads(line[len("PEERS_RESULT "):])
    res["sps"] = res["samples"] / res["seconds"]
    return res


# -- checks: same weights, same answers -------------------------------------------------------------
def agreement(spec: dict, outs: dict, peers_py: str | None) -> dict:
    """Max |difference| of the fp16 image embeddings of curate and each peer, matched by key."""
    import numpy as np

    from libcurate.shards import iter_members, npy_load

    cur = {}
    for s in spec["shards"]:
        for m in iter_members(os.path.join(outs["curate"], s)):
            cur[m["__key__"]] = npy_load(m["img_emb.npy"])[0].astype(np.float32)
    res = {}
    if "plain" in outs:
        keys = np.load(os.path.join(outs["plain"], "keys.npy"))
        emb = np.load(os.path.join(outs["plain"], "img_emb.npy")).astype(np.float32)
        res["plain_max_abs_diff"] = float(max(np.abs(cur[k] - e).max() for k, e in zip(keys, emb)))
    if "clip_retrieval" in outs:
        d = outs["clip_retrieval"]
        metas = sorted(os.listdir(os.path.join(d, "metadata")))
        embs = sorted(os.listdir(os.path.join(d, "img_emb")))
        diffs = []
        for mf, ef in zip(metas, embs):
            # the parquet is read in clip-retrieval's environment (pandas is not a dependency of curate);
            # pyarrow there aborted once in five runs (SIGABRT): retried, then reported, never fatal
            for _ in range(3):
                r = subprocess.run(
                    [peers_py, "-c", "import json, sys, pandas; print(json.dumps("
                     "pandas.read_parquet(sys.argv[1])['image_path'].tolist()))", os.path.join(d, "metadata", mf)],
                    capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
                if r.returncode == 0:
                    break
            else:
                res["clip_retrieval_check_failed"] = f"reading {mf}: rc {r.returncode} {r.stderr.strip()[-300:]}"
                return res
            keys = json.loads(r.stdout)
            emb = np.load(os.path.join(d, "img_emb", ef)).astype(np.float32)
            diffs += [np.abs(cur[k] - e).max() for k, e in zip(keys, emb)]
        res["clip_retrieval_max_abs_diff"] = float(max(diffs)) if diffs else None
    return res


def same_weights(spec: dict) -> bool:
    import torch

    from libcurate.models.clip import load_clip

    saved = torch.load(spec["weights"], weights_only=True)
    live = load_clip(CONFIGS[spec["config"]]).model.state_dict()
    return saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)


def tiny_ceiling(spec: dict, n: int = 200) -> dict:
    """The decode physics of the tiny config: one core's loader work per image (tar read, JPEG decode,
    open_clip's resize/crop, tokenise, exactly as score_clip's loader does it) and the model's
    forward per image at one thread; with every core busy the best possible rate is
    ``cores / (loader + model)``."""
    import torch

    from libcurate.models.clip import load_clip
    from libcurate.scoring.clip import ClipConfig, available_cores
    from libcurate.scoring.clip_loader import SampleBatches
    from libcurate.shards import iter_samples
    from libcurate.storage import open_store

    bundle = load_clip(CONFIGS[spec["config"]])
    parts = {"tokenizer": bundle.tokenizer, "context_length": bundle.context_length,
             "image_size": bundle.image_size, "pil_transform": bundle.pil_transform()}
    store = open_store(spec["root"])
    data = SampleBatches(store, "raw", spec["shards"], ClipConfig(), parts)
    images, tokens = [], []
    t0 = time.perf_counter()
    for s in iter_samples(store, f"raw/{spec['shards'][0]}", with_images=True):
        _, ims, toks = data._prepare(spec["shards"][0], s)
        images += ims
        tokens += toks
        if len(images) >= n:
            break
    loader_s = (time.perf_counter() - t0) / len(images)
    from libcurate.models.clip import uint8_image_encoder

    enc = uint8_image_encoder(bundle)
    x, t = torch.stack(images[:BATCH]), torch.cat(tokens[:BATCH])
    torch.set_num_threads(1)
    with torch.inference_mode():
        enc(x), bundle.model.encode_text(t)
        t0 = time.perf_counter()
        for _ in range(5):
            enc(x), bundle.model.encode_text(t)
    model_s = (time.perf_counter() - t0) / (5 * len(x))
    cores = available_cores()
    return {"loader_ms": round(loader_s * 1e3, 3), "model_ms_1t": round(model_s * 1e3, 3), "cores": cores,
            "ceiling_sps": round(cores / (loader_s + model_s), 1)}


def deviation_on_shards(spec: dict, n: int) -> dict:
    """:func:`libcurate.scoring.clip_decode.decode_deviation` of the fast decoders on the first ``n``
    photos of the benchmark's shards (untimed, after the rounds)."""
    from libcurate.models.clip import load_clip
    from libcurate.scoring.clip_decode import decode_deviation
    from libcurate.shards import iter_samples
    from libcurate.storage import open_store

    store = open_store(spec["root"])
    images = []
    for shard in spec["shards"]:
        for s in iter_samples(store, f"raw/{shard}", with_images=True):
            images.append(s.images[0].data)
            if len(images) >= n:
                return decode_deviation(load_clip(CONFIGS[spec["config"]]), images)
    return decode_deviation(load_clip(CONFIGS[spec["config"]]), images)


# -- the rounds ---------------------------------------------------------------------------------------
def run_config(config: str, samples: int, per_shard: int, rounds: int, peers_py: str | None, log) -> dict:
    order = ["curate", "plain"] + (["clip_retrieval"] if peers_py else []) + \
        (["bare", "bare_curate_forward"] if config == "vitb32" else [])
    with tempfile.TemporaryDirectory(prefix=f"peers-{config}-") as tmp:
        spec = prepare(config, samples, per_shard, tmp)
        assert same_weights(spec), "the saved state dict differs from curate's model"
        rows = {name: [] for name in order}
        check = {}
        for r in range(rounds):
            for name in order:
                out = os.path.join(tmp, "out", f"{name}-{r}")
                res = run_contender(name, spec, out, peers_py)
                if res["samples"] != samples and not name.startswith("bare"):
                    raise RuntimeError(f"{name} round {r}: {res['samples']} samples of {samples}")
                rows[name].append(res)
                log(f"{config} round {r} {name}: {res['sps']:.2f} samples/s ({res['seconds']:.1f} s)"
                    + (f" split {res['split']}" if "split" in res else ""))
            if r == 0:
                check = agreement(spec, {n: os.path.join(tmp, "out", f"{n}-0") for n in order if not n.startswith("bare")},
                                  peers_py)
                log(f"{config} agreement of image embeddings with curate's: {check}")
        ceiling = tiny_ceiling(spec) if config == "tiny" else None
        deviation = deviation_on_shards(spec, 64 if config == "tiny" else 24)
        log(f"{config} decode deviation against open_clip's exact preprocessing: {deviation}")
    out = {"model": CONFIGS[config], "samples": samples, "rounds": rounds, "batch": BATCH,
           "sps": {n: [round(x["sps"], 2) for x in v] for n, v in rows.items()},
           "median_sps": {n: round(statistics.median(x["sps"] for x in v), 2) for n, v in rows.items()},
           "curate_split": [x["split"] for x in rows["curate"]], "agreement": check,
           "decode_deviation": deviation}
    for other in order[1:]:
        ratios = [a["sps"] / b["sps"] for a, b in zip(rows["curate"], rows[other])]
        out[f"vs_{other}"] = [round(x, 3) for x in ratios]
        out[f"vs_{other}_median"] = round(statistics.median(ratios), 3)
    if ceiling:
        ceiling["curate_over_ceiling"] = round(out["median_sps"]["curate"] / ceiling["ceiling_sps"], 3)
        out["ceiling"] = ceiling
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,vitb32")
    ap.add_argument("--tiny-samples", type=int, default=1000)
    ap.add_argument("--vitb-samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vitb-rounds", type=int, default=3)
    ap.add_argument("--judge-requests", type=int, default=2000, help="0 = leave the judge out")
    ap.add_argument("--judge-rounds", type=int, default=3)
    ap.add_argument("--no-clip-retrieval", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.contender:  # a child process: one contender, one round
        res = CONTENDERS[a.contender](json.loads(a.spec), a.out)
        print("PEERS_RESULT " + json.dumps(res))
        return 0

    def log(msg):
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    peers_py, why = (None, "--no-clip-retrieval") if a.no_clip_retrieval else ensure_peers_venv(log)
    if peers_py is None:
        log(f"clip-retrieval skipped: {why}")
    res: dict = {"cores": None, "load_avg_start": round(os.getloadavg()[0], 2)}
    from libcurate.scoring.clip import available_cores

    res["cores"] = available_cores()
    if peers_py is None:
        res["clip_retrieval_skipped"] = why
    for config in a.configs.split(","):
        samples = a.tiny_samples if config == "tiny" else a.vitb_samples
        per_shard = 250 if config == "tiny" else max(1, samples // 2)
        rounds = a.rounds if config == "tiny" else a.vitb_rounds
        d = run_config(config, samples, per_shard, rounds, peers_py, log)
        res[config] = d
        key = "clip_tiny" if config == "tiny" else "clip_vitb32"
        res[f"{key}_vs_plain"] = d["vs_plain_median"]
        if "vs_clip_retrieval_median" in d:
            res[f"{key}_vs_clip_retrieval"] = d["vs_clip_retrieval_median"]
        if config == "vitb32":
            res["vitb32_end_to_end_over_bare"] = d["vs_bare_median"]
            res["vitb32_end_to_end_over_curate_forward"] = d["vs_bare_curate_forward_median"]
        if config == "tiny":
            res["tiny_ceiling"] = d["ceiling"]
        res[f"{key}_decode_deviation"] = d["decode_deviation"]
    if a.judge_requests:
        try:
            from bench.llm_judge import run_judge_pair
        except ImportError as e:
            res["judge_skipped"] = f"bench/llm_judge.py has no run_judge_pair: {e}"
        else:
            j = run_judge_pair(n_requests=a.judge_requests, rounds=a.judge_rounds, log=log)
            res["judge"] = j
            res["judge_vs_plain"] = j["ratio_median"]
    res["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
