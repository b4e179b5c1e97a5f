"""Build the demo dataset: real photos (scikit-image's sample images, mostly public domain / CC0) with
LLaVA-style instructions, plus planted defects that a curation run must catch.

    python -m libcurate.demo --out demo-run/source [--copies 6]

Writes ``data.json`` (LLaVA format) and ``images/``. Planted defects, each listed in ``planted.json``:
exact duplicates (same image and text), near duplicates (re-encoded, slightly resized image, same text),
a corrupt (truncated) JPEG, a zero-byte image, a missing image, an empty answer, roles out of order, and
image-text mismatches (a photo paired with another photo's description).
"""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
from PIL import Image

# name -> (what a careful annotator would write, a question about it)
PHOTOS = {
    "astronaut": ("A smiling astronaut in an orange launch-and-entry suit holds a helmet in front of an American "
                  "flag.", "Who is shown in this photo and what are they wearing?"),
    "coffee": ("A white cup of coffee with latte art sits on a saucer with a spoon, on a wooden table.",
               "What drink is in the cup?"),
    "chelsea": ("A tabby cat with green eyes looks sideways; its striped fur is orange and brown.",
                "What animal is this and what colour are its eyes?"),
    "rocket": ("A rocket stands on the launch pad next to its service tower under a clear sky.",
               "What is standing on the launch pad?"),
    "camera": ("A black-and-white photo of a man in a coat operating a camera on a tripod in a field.",
               "What is the man doing?"),
    "coins": ("Many old coins of similar size are laid out in rows on a dark background.",
              "How are the coins arranged?"),
    "moon": ("A grayscale close-up of the Moon's surface covered with craters.",
             "What surface is shown?"),
    "page": ("A scanned page of printed text with a few paragraphs, lit unevenly.",
             "What kind of document is this?"),
    "hubble_deep_field": ("A deep-space telescope image full of distant galaxies of many shapes and colours.",
                          "What do the small bright objects in this image represent?"),
    "immunohistochemistry": ("A microscope image of stained tissue with brown and blue cells.",
                             "What kind of image is this?"),
    "colorwheel": ("A circular colour wheel showing a smooth gradient of hues around its edge.",
                   "What does this chart show?"),
    "clock": ("A wall clock with a round face and black hands, photographed at an angle.",
              "What object is shown?"),
    "brick": ("A close-up of a brick wall with mortar lines between the bricks.",
              "What texture is shown?"),
    "gravel": ("A top-down view of grey gravel made of many small stones.",
               "What is on the ground?"),
    "retina": ("A fundus photograph of a human retina showing blood vessels and the optic disc.",
               "What part of the body is imaged?"),
    # not skimage's `cat`: that is the `chelsea` photo again (dedup groups the two, rightly)
    "motorcycle": ("A motorcycle parked indoors in front of shelves and equipment.",
                   "What vehicle is shown?"),
}
VARIANT_OPS = ("full", "crop_left", "crop_right", "crop_center", "flip", "small")
# The held-out evaluation set (eval.json, for the trainers of recipes/self_filter.yaml and
# instructiongpt4.yaml): other crops of the same photos than any training sample, and questions with short
# answers (exact-match accuracy), plus one detailed description each (token loss on long answers).
EVAL_OPS = ("crop_top", "crop_bottom")
SHORT_QA = {
    "astronaut": ("What is the person's job?", "Astronaut."), "coffee": ("What drink is shown?", "Coffee."),
    "chelsea": ("What animal is this?", "A cat."), "rocket": ("What vehicle is this?", "A rocket."),
    "camera": ("What is the man using?", "A camera."), "coins": ("What objects are shown?", "Coins."),
    "moon": ("What is shown?", "The Moon."), "page": ("What is on the page?", "Text."),
    "hubble_deep_field": ("What is in the image?", "Galaxies."),
    "immunohistochemistry": ("What is under the microscope?", "Tissue."),
    "colorwheel": ("What does the chart show?", "Colours."), "clock": ("What object is this?", "A clock."),
    "brick": ("What is the wall made of?", "Bricks."), "gravel": ("What covers the ground?", "Gravel."),
    "retina": ("What organ is imaged?", "The eye."), "motorcycle": ("What vehicle is this?", "A motorcycle."),
}


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def _variant(img: Image.Image, op: str) -> Image.Image:
    w, h = img.size
    if op == "crop_left":
        img = img.crop((0, 0, int(w * 0.7), h))
    elif op == "crop_right":
        img = img.crop((int(w * 0.3), 0, w, h))
    elif op == "crop_center":
        img = img.crop((int(w * 0.15), int(h * 0.15), int(w * 0.85), int(h * 0.85)))
    elif op == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif op == "small":
        img = img.resize((max(32, w // 3), max(32, h // 3)))
    elif op == "crop_top":
        img = img.crop((int(w * 0.1), 0, int(w * 0.9), int(h * 0.75)))
    elif op == "crop_bottom":
        img = img.crop((int(w * 0.1), int(h * 0.25), int(w * 0.9), h))
    img = img.copy()
    img.thumbnail((256, 256))
    return img


def _jpeg(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _record(rid: str, image: str, question: str, answer: str, before: bool = True) -> dict:
    human = f"<image>\n{question}" if before else f"{question}\n<image>"
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": human},
                                                         {"from": "gpt", "value": answer}]}


def build(out: str, copies: int = len(VARIANT_OPS)) -> dict:
    """Write the demo dataset under ``out``; returns the planted-defect manifest."""
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    records: list[dict] = []
    planted: dict[str, list[str]] = {}

    def add(kind: str, rec: dict) -> None:
        records.append(rec)
        planted.setdefault(kind, []).append(rec["id"])

    def save(fname: str, data: bytes) -> str:
        with open(os.path.join(img_dir, fname), "wb") as f:
            f.write(data)
        return f"images/{fname}"

    names = list(PHOTOS)
    for n, name in enumerate(names):
        base = _photo(name)
        desc, question = PHOTOS[name]
        for v, op in enumerate(VARIANT_OPS[:copies]):
            path = save(f"{name}_{op}.jpg", _jpeg(_variant(base, op)))
            prompt = "Describe this image in detail." if v % 2 == 0 else question
            records.append(_record(f"{name}-{op}", path, prompt, desc, before=(v % 3 != 2)))
        # multi-turn sample
        records.append({"id": f"{name}-chat", "image": f"images/{name}_full.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": desc},
            {"from": "human", "value": "Is there any text visible?"},
            {"from": "gpt", "value": "Yes, there is printed text." if name == "page" else "No, there is no text."}]})
        # image-text mismatch: this photo with the next photo's description
        other = names[(n + 1) % len(names)]
        add("mismatch", _record(f"{name}-mismatch", f"images/{name}_{VARIANT_OPS[min(copies, 4) - 1]}.jpg",
                                "Describe this image in detail.", PHOTOS[other][0]))

    # exact duplicates: byte-identical image (another file) and identical text
    for name in names[:3]:
        data = open(os.path.join(img_dir, f"{name}_full.jpg"), "rb").read()
        path = save(f"{name}_copy.jpg", data)
        add("exact_duplicate", _record(f"{name}-dup", path, "Describe this image in detail.", PHOTOS[name][0]))
    # near duplicates: re-encoded at another quality and 2% smaller, same text
    for name in names[3:6]:
        img = Image.open(os.path.join(img_dir, f"{name}_full.jpg")).convert("RGB")
        img = img.resize((int(img.width * 0.98), int(img.height * 0.98)))
        path = save(f"{name}_near.jpg", _jpeg(img, quality=70))
        add("near_duplicate", _record(f"{name}-near", path, "Describe this image in detail.", PHOTOS[name][0]))
    # broken inputs that ingest must quarantine
    full = open(os.path.join(img_dir, "coffee_full.jpg"), "rb").read()
    add("corrupt_image", _record("corrupt-jpeg", save("corrupt.jpg", full[: len(full) // 3]),
                                 "What is shown?", "A cup of coffee."))
    add("empty_image", _record("zero-bytes", save("empty.jpg", b""), "What is shown?", "Nothing."))
    add("missing_image", _record("missing", "images/does_not_exist.jpg", "What is shown?", "A photo."))
    add("empty_answer", _record("empty-answer", "images/rocket_full.jpg", "What is shown?", ""))
    bad = _record("roles-swapped", "images/moon_full.jpg", "What is shown?", "The Moon.")
    bad["conversations"].reverse()
    add("roles_out_of_order", bad)

    with open(os.path.join(out, "data.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out, "planted.json"), "w", encoding="utf-8") as f:
        json.dump(planted, f, indent=1)
    build_eval(out)
    return planted


def build_eval(out: str) -> list[dict]:
    """Write ``eval.json`` + ``eval_images/``: a held-out set disjoint from ``data.json`` (other crops,
    other questions), for the trainer contract's ``{eval}``. Returns the records."""
    os.makedirs(os.path.join(out, "eval_images"), exist_ok=True)
    records = []
    for name, (desc, _question) in PHOTOS.items():
        base = _photo(name)
        q, a = SHORT_QA[name]
        for i, op in enumerate(EVAL_OPS):
            path = f"eval_images/{name}_{op}.jpg"
            with open(os.path.join(out, path), "wb") as f:
                f.write(_jpeg(_variant(base, op)))
            records.append(_record(f"eval-{name}-{op}", path, q, a) if i == 0 else
                           _record(f"eval-{name}-{op}", path, "Describe this image in detail.", desc))
    with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m libcurate.demo")
    p.add_argument("--out", default="demo-run/source")
    p.add_argument("--copies", type=int, default=len(VARIANT_OPS), help="variants per photo (1-6)")
    args = p.parse_args(argv)
    planted = build(args.out, args.copies)
    n = len(json.load(open(os.path.join(args.out, "data.json"))))
    print(f"demo dataset: {n} records in {args.out} (planted: "
          + ", ".join(f"{k}={len(v)}" for k, v in planted.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
