"""The held-out measurements' pieces that need no process group: per-attribute caption accuracy
and the caption grid."""
import torch

from mmgpt_engine.data.shapes import ShapesCaptionDataset, parse_caption, scene_caption
from mmgpt_engine.train.evaluation import attribute_hits
from mmgpt_engine.train.metrics import plot_caption_grid


def test_captions_parse_back_to_their_scene():
    scene = {"objects": [{"size": "small", "color": "red", "shape": "circle"},
                         {"size": "large", "color": "blue", "shape": "square"}], "relation": "left of"}
    assert parse_caption(scene_caption(scene)) == {"size": ["small", "large"], "color": ["red", "blue"],
                                                   "shape": ["circle", "square"], "relation": ["left of"]}
    assert parse_caption("a red circle") is None


def test_attribute_hits_count_each_slot():
    ref = "a small red circle left of a large blue square"
    assert attribute_hits(ref, ref) == {"size": (2, 2), "color": (2, 2), "shape": (2, 2), "relation": (1, 1)}
    got = attribute_hits(ref, "a small blue circle right of a large blue triangle")
    assert got == {"size": (2, 2), "color": (1, 2), "shape": (1, 2), "relation": (0, 1)}
    assert attribute_hits(ref, "a small red")["color"] == (0, 2)       # outside the grammar: nothing right
    assert attribute_hits("a large green triangle", "a large green triangle above a small red square") == {
        "size": (1, 1), "color": (1, 1), "shape": (1, 1), "relation": (0, 0)}


def test_the_caption_grid_is_a_png(tmp_path):
    ds = ShapesCaptionDataset(split="val", size=5)
    examples = [(ds[i]["image"], ds[i]["text"], ds[i]["text"] if i % 2 else "a large red square") for i in range(5)]
    path = plot_caption_grid(examples, tmp_path / "captions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert plot_caption_grid([], tmp_path / "none.png") is None
