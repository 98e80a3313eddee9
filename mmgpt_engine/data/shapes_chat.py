"""The built-in shapes as LLaVA conversation data, for both training stages:

    stage 1   image -> caption ("<image>" then "a small red circle above a large blue square")
    stage 2   questions and answers about the picture (colour, shape, size, count, relation) in a
              few phrasings, 1-3 turns a sample, plus text-only samples (facts about the shapes and
              colours that need no picture)

    python -m mmgpt_engine.data.shapes_chat --out data/shapes_chat --stage 2 --samples 20000 --split train

writes `<out>/<split>-stage<N>.json` (LLaVA's format) and `<out>/images/<split>-<i>.png`; the
images are the same for both stages (sample i of a split is one scene). Every question has one
right answer: a reference to an object is made unique (by shape, else size and shape, else
colour and shape) or the question is not asked.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .shapes import COLORS, SHAPES, SIZES, SPLITS, draw_scene, scene_caption

_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_COUNTS = {1: "one", 2: "two"}
_SIDES = {"triangle": "three", "square": "four", "circle": "zero"}
_MIXES = [("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple")]
PHRASES = {
    "colour": ["What colour is the {ref}?", "Which colour does the {ref} have?", "Tell me the colour of the {ref}."],
    "shape": ["What shape is the {color} object?", "Which shape is {color}?"],
    "size": ["Is the {ref} small or large?", "How big is the {ref}?"],
    "count": ["How many shapes are there?", "How many objects can you see?"],
    "relation": ["Where is the {a} relative to the {b}?", "How is the {a} placed with respect to the {b}?"],
}


def _reference(obj: dict, objects: list[dict]) -> Optional[str]:
    """The shortest unique description of `obj` among `objects` (without "a"), or None."""
    others = [o for o in objects if o is not obj]
    for keys in (("shape",), ("size", "shape"), ("color", "shape"), ("size", "color", "shape")):
        if all(any(o[k] != obj[k] for k in keys) for o in others):
            return " ".join(obj[k] for k in keys)
    return None


def questions(scene: dict) -> list[tuple[str, str, str]]:
    """Every (kind, question template key, answer) the scene answers unambiguously; the question
    text is filled in by `ask`."""
    objects, out = scene["objects"], []
    for obj in objects:
        ref = _reference(obj, objects)
        if ref is not None:
            out.append(("colour", ref, obj["color"]))
            out.append(("size", ref, obj["size"]))
        if sum(o["color"] == obj["color"] for o in objects) == 1:
            out.append(("shape", obj["color"], obj["shape"]))
    out.append(("count", "", _COUNTS[len(objects)]))
    if scene["relation"] is not None:
        a, b = (_reference(o, objects) for o in objects)
        if a is not None and b is not None:
            out.append(("relation", f"{a}|{b}", scene["relation"]))
            out.append(("relation", f"{b}|{a}", _INVERSE[scene["relation"]]))
    return out


def ask(kind: str, key: str, rng: np.random.Generator) -> str:
    phrase = PHRASES[kind][int(rng.integers(len(PHRASES[kind])))]
    if kind == "relation":
        a, b = key.split("|")
        return phrase.format(a=a, b=b)
    return phrase.format(ref=key, color=key)


def text_only(rng: np.random.Generator) -> list[dict]:
    if rng.random() < 0.5:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return [{"from": "human", "value": f"How many corners does a {shape} have?"},
                {"from": "gpt", "value": _SIDES[shape]}]
    a, b, mix = _MIXES[int(rng.integers(len(_MIXES)))]
    return [{"from": "human", "value": f"Which colour do you get when you mix {a} and {b}?"},
            {"from": "gpt", "value": mix}]


def conversation(scene: dict, stage: int, rng: np.random.Generator) -> list[dict]:
    if stage == 1:
        return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": scene_caption(scene)}]
    pool = questions(scene)
    order = rng.permutation(len(pool))[: int(rng.integers(1, 4))]
    turns = []
    for j, q in enumerate(order):
        kind, key, answer = pool[int(q)]
        text = ask(kind, key, rng)
        turns += [{"from": "human", "value": f"<image>\n{text}" if j == 0 else text}, {"from": "gpt", "value": answer}]
    return turns


def write(out, stage: int, samples: int, split: str = "train", seed: int = 0, image_size: int = 32,
          text_only_fraction: float = 0.1) -> Path:
    """Write the split's records and images; returns the JSON file."""
    if stage not in (1, 2):
        raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        img, scene = draw_scene(rng, image_size)
        talk = np.random.default_rng([seed, SPLITS.index(split), i, stage])
        if stage == 2 and talk.random() < text_only_fraction:
            records.append({"id": f"{split}-{i}-text", "conversations": text_only(talk)})
            continue
        name = f"images/{split}-{i}.png"
        if not (out / name).is_file():
            img.save(out / name)
        records.append({"id": f"{split}-{i}", "image": name, "conversations": conversation(scene, stage, talk)})
    path = out / f"{split}-stage{stage}.json"
    path.write_text(json.dumps(records, indent=0) + "\n")
    return path


def all_texts() -> list[str]:
    """Every question, answer and text-only turn the records can hold (for a tokenizer's vocabulary)."""
    refs = [" ".join(parts) for parts in _all_refs()]
    texts = [p.format(ref=r, color=c) for kind in ("colour", "shape", "size", "count") for p in PHRASES[kind]
             for r in refs for c in COLORS]
    texts += [p.format(a=a, b=b) for p in PHRASES["relation"] for a in refs for b in refs]
    texts += [f"How many corners does a {s} have?" for s in SHAPES]
    texts += [f"Which colour do you get when you mix {a} and {b}?" for a, b, _ in _MIXES]
    texts += list(COLORS) + list(SHAPES) + list(SIZES) + list(_COUNTS.values()) + list(_SIDES.values())
    texts += list(_INVERSE) + [scene_caption({"objects": [{"size": z, "color": c, "shape": s}], "relation": None})
                               for z in SIZES for c in COLORS for s in SHAPES]
    return texts


def _all_refs():
    for s in SHAPES:
        yield (s,)
        for z in SIZES:
            yield (z, s)
            for c in COLORS:
                yield (z, c, s)
        for c in COLORS:
            yield (c, s)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgpt_engine.data.shapes_chat", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=32)
    args = p.parse_args(argv)
    path = write(args.out, args.stage, args.samples, args.split, args.seed, args.image_size)
    print(f"wrote {path} ({args.samples} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
