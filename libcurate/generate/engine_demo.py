"""The data-engine demo: an OpenAI-compatible test server that answers every prompt curate sends, and the
region file the LRV recipe reads. ``make demo-engine`` uses it; ``tests/test_engine.py`` too.

:func:`engine_responder` recognises each built-in prompt (detailed caption, the four MMInstruct
instruction types, LRV positive and negative instructions, the judge_score templates, GAVIE) and answers
it in the format the stage parses, with content taken from the prompt (the description, the region
captions) and scores derived from a hash of the prompt, so the same prompt always gets the same answer.
One prompt in ``MALFORMED_EVERY`` (chosen by that hash) gets a malformed answer instead: a refused
caption, a multiple-choice item with three options, a yes/no item answered "maybe", an LRV block with an
unknown task, a judge reply without a score, a GAVIE reply without its accuracy section. Those show up in
``curate audit`` as quarantine reasons, item by item; nothing is dropped silently.

Commands::

    python -m libcurate.generate.engine_demo serve [--port 0] [--port-file F]   # serve until killed
    python -m libcurate.generate.engine_demo count --base-url URL               # chat requests so far
    python -m libcurate.generate.engine_demo regions --source demo-run/source   # regions.json for LRV

``GET /v1/_stats`` answers ``{"requests": <chat requests received>}`` (what ``count`` prints).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import urllib.request

from ..llm.testing import FakeOpenAIServer

MALFORMED_EVERY = 7

# Region captions of the demo photos (libcurate.demo.PHOTOS), Visual Genome style: [x, y, w, h] in pixels.
DEMO_REGIONS = {
    "astronaut": [("a smiling astronaut", [120, 40, 260, 420]), ("an orange spacesuit", [110, 180, 300, 330]),
                  ("a white helmet held in the hands", [250, 300, 150, 140]), ("an american flag", [0, 0, 180, 240])],
    "coffee": [("a white cup of coffee", [150, 120, 250, 200]), ("latte art on the coffee", [200, 140, 140, 80]),
               ("a saucer under the cup", [110, 250, 330, 110]), ("a wooden table", [0, 300, 600, 100])],
    "chelsea": [("a tabby cat", [60, 20, 330, 280]), ("green eyes of the cat", [140, 80, 120, 40]),
                ("orange and brown striped fur", [80, 150, 300, 150])],
    "rocket": [("a rocket on the launch pad", [180, 40, 90, 400]), ("a service tower", [280, 20, 120, 420]),
               ("a clear blue sky", [0, 0, 640, 200])],
    "camera": [("a man in a coat", [180, 60, 160, 380]), ("a camera on a tripod", [260, 100, 120, 300]),
               ("a grassy field", [0, 380, 512, 132])],
    "coins": [("rows of old coins", [20, 20, 340, 260]), ("a dark background", [0, 0, 384, 303])],
    "moon": [("the surface of the moon", [0, 0, 512, 512]), ("a large crater", [200, 180, 120, 110])],
    "page": [("a page of printed text", [10, 10, 480, 440]), ("a paragraph of text", [40, 60, 400, 120])],
    "hubble_deep_field": [("many distant galaxies", [0, 0, 512, 512]), ("a bright spiral galaxy", [300, 120, 60, 60])],
    "immunohistochemistry": [("stained tissue", [0, 0, 512, 512]), ("brown cells", [100, 80, 90, 70]),
                             ("blue cells", [300, 240, 110, 90])],
    "colorwheel": [("a circular colour wheel", [40, 40, 300, 300]), ("a gradient of hues", [60, 60, 260, 260])],
    "clock": [("a round wall clock", [60, 40, 300, 300]), ("black clock hands", [170, 120, 80, 90])],
    "brick": [("a brick wall", [0, 0, 512, 512]), ("mortar lines between bricks", [0, 100, 512, 20])],
    "gravel": [("grey gravel", [0, 0, 512, 512]), ("small stones", [200, 200, 60, 60])],
    "retina": [("a human retina", [20, 20, 400, 400]), ("blood vessels", [100, 100, 220, 200]),
               ("the optic disc", [240, 180, 60, 60])],
    "motorcycle": [("a parked motorcycle", [100, 120, 350, 260]), ("shelves with equipment", [0, 0, 640, 150])],
}
SUBJECTS = ("a scene", "a photograph", "an image", "a picture")


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _images(content) -> str:
    if isinstance(content, str):
        return ""
    return "".join(str(p.get("image_url", {}).get("url", ""))[-4096:] for p in content
                   if isinstance(p, dict) and p.get("type") == "image_url")


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _words(text: str, n: int) -> list[str]:
    return re.findall(r"[A-Za-z][A-Za-z'-]+", text)[:n]


def engine_responder(body: dict) -> str:
    """The reply to one chat request (see the module docstring)."""
    msgs = body.get("messages", [])
    system = " ".join(_text(m.get("content")) for m in msgs if m.get("role") == "system")
    user = _text(msgs[-1].get("content")) if msgs else ""
    h = _hash(system + "\n" + user + _images(msgs[-1].get("content") if msgs else ""))
    bad = h % MALFORMED_EVERY == 0
    if "You describe images for a dataset" in system:
        return _caption(h, bad)
    if "Relevancy:" in user and "Accuracy:" in user:
        return _gavie(user, h, bad)
    if "<Qk>" in user:
        return _mminstruct(user, h, bad)
    if "Task:" in user and "Answer:" in user:
        return _lrv_positive(user, h, bad)
    if "Reason:" in user and "Instruction:" in user:
        return _lrv_negative(user, h, bad)
    m = re.search(r"a number from ([\d.]+) to ([\d.]+)", user)
    if m:
        return _judge(user, float(m.group(1)), float(m.group(2)), h, bad)
    return "I have nothing to add."


def _caption(h: int, bad: bool) -> str:
    if bad:
        return "I'm sorry, I cannot describe this image."
    subject = SUBJECTS[h % len(SUBJECTS)]
    tone = ("warm", "cool", "soft", "bright", "muted")[(h >> 4) % 5]
    return (f"The image shows {subject} with one clear main subject in the centre of the frame, lit by "
            f"{tone} light. The background is simple and uncluttered, so the subject stands out. Colours are "
            f"natural and the details are sharp, with visible texture on the main surfaces. There is no "
            f"visible text or logo, and the composition is balanced from left to right. Variant {h % 997}.")


def _mminstruct(user: str, h: int, bad: bool) -> str:
    n = int((re.search(r"for k = 1 to (\d+)", user) or [0, 3])[1])
    desc = (re.search(r"Description: (.*)", user) or [None, "the image"])[1]
    w = _words(desc, 12) or ["image"]
    # the caption's own number (its "Variant N"), so each image gets its own questions, not the same ones
    ref = (re.findall(r"\d+", desc) or [str(_hash(desc) % 997)])[-1]
    topic = f"{' '.join(w[2:6]) or 'the subject'} (photo {ref})"
    out = []
    if "yes/no questions" in user:
        for k in range(1, n + 1):
            yes = k % 2 == 1
            ans = "maybe" if bad and k == n else ("Yes" if yes else "No")
            q = f"Is {topic} {'shown' if yes else 'absent'} in view number {k}?"
            out.append(f"<Q{k}> {q} </Q{k}> <C{k}> Yes, No </C{k}> <A{k}> {ans} </A{k}>")
    elif "multiple-choice" in user:
        for k in range(1, n + 1):
            opts = "A. light B. shadow C. water D. stone" if not (bad and k == 1) else "A. light B. shadow C. water"
            out.append(f"<Q{k}> Which word best fits {topic} (question {k})? </Q{k}> <C{k}> {opts} </C{k}> "
                       f"<A{k}> {'ABCD'[(h + k) % 4]} </A{k}>")
    elif "detailed, well-organised answer" in user:
        for k in range(1, n + 1):
            a = "" if bad and k == 1 else (f"<A{k}> The image presents {desc[:160].rstrip('.')}. It is framed "
                                           f"clearly, and point {k} concerns how {topic} is arranged. </A{k}>")
            out.append(f"<Q{k}> Describe aspect {k} of {topic} in detail. </Q{k}> {a}")
    else:
        for k in range(1, n + 1):
            a = " ".join(w * 3) if bad and k == 1 else w[k % len(w)]  # bad: too long for a short answer
            out.append(f"<Q{k}> What single word describes part {k} of {topic}? </Q{k}> <A{k}> {a} </A{k}>")
    return "\n".join(out)


def _regions(user: str) -> list[str]:
    block = user.split("Regions:", 1)[-1]
    caps = re.findall(r"^(.+?) X: \d+ Y: \d+ Width: \d+ Height: \d+", block, re.MULTILINE)
    return caps or ["the main object"]


def _lrv_positive(user: str, h: int, bad: bool) -> str:
    n = int((re.search(r"Write (\d+) varied instructions", user) or [0, 4])[1])
    tasks = (re.search(r"at most \d+ instructions per task: (.*?)\. Mix", user, re.DOTALL) or [0, "Image Captioning"])[1]
    tasks = [t.strip() for t in tasks.split(";") if t.strip()]
    caps = _regions(user)
    out = []
    for k in range(n):
        cap, task = caps[k % len(caps)], tasks[(h + k) % len(tasks)]
        if bad and k == 0:
            task = "Interpretive Dance"
        out.append(f"Instruction:\nWhat can you tell about {cap} (item {k + 1})?\nAnswer:\nThe image shows {cap}."
                   f"\nTask:\n{task}")
    return "\n\n".join(out)


def _lrv_negative(user: str, h: int, bad: bool) -> str:
    n = int((re.search(r"Write (\d+) misleading instructions", user) or [0, 3])[1])
    caps = _regions(user)
    out = []
    for k in range(n):
        cap = caps[k % len(caps)]
        reason = "" if bad and k == 0 else f"There is no purple dragon next to {cap}; the image only shows {cap}."
        out.append(f"Instruction:\nDescribe the purple dragon beside {cap} (item {k + 1}).\nReason:\n{reason}")
    return "\n\n".join(out)


def _gavie(user: str, h: int, bad: bool) -> str:
    n = len(re.findall(r"<answer\d+>", user)) or 1
    rel = "\n".join(f"score of answer{k}: {4 + (h >> (3 + k)) % 7}\nreason: follows the instruction"
                    for k in range(1, n + 1))
    acc = "\n".join(f"score of answer{k}: {3 + (h >> (7 + k)) % 8}\nreason: checked against the regions"
                    for k in range(1, n + 1))
    return f"Relevancy:\n{rel}\n" + ("" if bad else f"Accuracy:\n{acc}\n")


def _judge(user: str, lo: float, hi: float, h: int, bad: bool) -> str:
    if bad:
        return "I would rather not rate this example."
    score = lo + (h % 1001) / 1000 * (hi - lo)
    if '{"score"' in user or "JSON object" in user:
        return json.dumps({"score": round(score, 1), "explanation": "consistent and specific"})
    return f"{score:.1f}\nConsistent and specific."


class EngineServer(FakeOpenAIServer):
    """The test server with :func:`engine_responder` and ``GET /v1/_stats``."""

    def __init__(self, port: int = 0, **kw):
        super().__init__(responder=engine_responder, port=port, **kw)

    def make_app(self):
        from aiohttp import web

        app = super().make_app()

        async def stats(_request):
            return web.json_response({"requests": self.count})

        app.router.add_get("/v1/_stats", stats)
        return app


def request_count(base_url: str) -> int:
    """Chat requests an :class:`EngineServer` has received."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/_stats", timeout=10) as r:
        return int(json.load(r)["requests"])


def write_regions(source: str, out: str | None = None) -> str:
    """``regions.json`` (``record id -> [{caption, bbox}]``) for every record of the demo's ``data.json``
    whose photo has regions: how LRV's ``vg_annotation.json`` is keyed, by the id the sample carries."""
    with open(os.path.join(source, "data.json"), encoding="utf-8") as f:
        records = json.load(f)
    regions = {}
    for r in records:
        rid = str(r.get("id", ""))
        photo = next((p for p in sorted(DEMO_REGIONS, key=len, reverse=True) if rid.startswith(p + "-")), None)
        if photo:
            regions[rid] = [{"caption": c, "bbox": b} for c, b in DEMO_REGIONS[photo]]
    out = out or os.path.join(source, "regions.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(regions, f, indent=1, sort_keys=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m libcurate.generate.engine_demo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve on 127.0.0.1 until killed")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--port-file", help="write the port here once listening")
    c = sub.add_parser("count", help="print the chat requests the server has received")
    c.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", ""))
    r = sub.add_parser("regions", help="write regions.json for the demo source")
    r.add_argument("--source", required=True)
    args = p.parse_args(argv)
    if args.cmd == "count":
        if not args.base_url:
            p.error("--base-url or OPENAI_BASE_URL is required")
        print(request_count(args.base_url))
        return 0
    if args.cmd == "regions":
        print(write_regions(args.source))
        return 0
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # `kill`: stop cleanly
    srv = EngineServer(port=args.port).start()
    print(f"engine test server on {srv.base_url}", file=sys.stderr, flush=True)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(srv.port))
        os.replace(tmp, args.port_file)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
