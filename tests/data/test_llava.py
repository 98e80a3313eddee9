"""LLaVA conversation files: JSON arrays, JSONL and mixture YAMLs read lazily; every bad sample
skipped and counted by reason with its id, never a crash; the built-in shapes conversations."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine.data.chat import ChatTemplate
from mmgpt_engine.data.conversation import IMAGE_TOKEN_ID
from mmgpt_engine.data.llava import LlavaConversations, RecordFile, load_sources
from mmgpt_engine.data.shapes import draw_scene
from mmgpt_engine.data.shapes_chat import all_texts, questions, write
from mmgpt_engine.ops import IGNORE_INDEX
from tests.data.test_chat import SPECIAL, TOK


def _turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def records(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "img" / "red.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    return [
        {"id": "ok-1", "image": "img/red.png", "conversations": _turns("<image>\nwhat colour is it?", "red")},
        {"id": "no-marker", "image": "img/red.png", "conversations": _turns("what colour is it?", "red")},
        {"id": "text-only", "conversations": _turns("what colour is it?", "blue")},
        {"id": "missing", "image": "img/none.png", "conversations": _turns("<image>", "red")},
        {"id": "broken", "image": "img/broken.png", "conversations": _turns("<image>", "red")},
        {"id": "robot", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "red"}]},
        {"id": "asks-last", "conversations": _turns("a", "red") + [{"from": "human", "value": "and now?"}]},
        {"id": "stray-marker", "conversations": _turns("<image> what", "red")},
        {"id": "two-markers", "image": "img/red.png", "conversations": _turns("<image><image>", "red")},
        {"id": "ünïcode-ok", "conversations": _turns("what colour is it? ✓", "red")},
    ]


def _dataset(path, tmp_path, **kw):
    return LlavaConversations(path, TOK, ChatTemplate.named("chatml"), image_folder=tmp_path, image_size=16, **kw)


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_records_load_lazily_and_bad_ones_are_counted(records, tmp_path, layout):
    path = tmp_path / f"data.{layout}"
    if layout == "json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    ds = _dataset(path, tmp_path)
    assert len(ds) == len(records) and json.loads(ds.sources[0][0].raw(9))["id"] == "ünïcode-ok"
    report = ds.audit()
    assert report["usable"] == 4 and report["notes"] == {"image_marker_added": 1}
    assert report["skipped"] == {"missing_image": 1, "undecodable_image": 1, "unknown_role": 1, "ends_with_user": 1,
                                 "image_marker_without_image": 1, "more_markers_than_images": 1}
    assert report["examples"]["missing_image"] == ["missing"] and report["examples"]["unknown_role"] == ["robot"]
    got = [ds[i] for i in range(len(ds))]     # never raises: a bad record gives the next usable one
    assert [g["id"] for g in got[:4]] == ["ok-1", "no-marker", "text-only", "ünïcode-ok"]
    assert got[3]["skipped"] == 6 and sum(ds.skipped.values()) >= 6
    first = got[0]
    assert first["image"].shape == (3, 16, 16) and "image" not in got[2]
    assert (first["input_ids"] == IMAGE_TOKEN_ID).sum() == 1 and (got[2]["input_ids"] == IMAGE_TOKEN_ID).sum() == 0
    scored = first["labels"][first["labels"] != IGNORE_INDEX].tolist()
    assert TOK.decode(scored, skip_special_tokens=False) == "red <|im_end|>"
    assert report["scored_tokens"] == 4 * 2


def test_mixture_yaml_takes_what_each_strategy_says(records, tmp_path):
    for name, n in (("a", 10), ("b", 6)):
        (tmp_path / f"{name}.json").write_text(json.dumps([dict(records[2], id=f"{name}{i}") for i in range(n)]))
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: first:30%\n"
                                       "  - json_path: b.json\n    sampling_strategy: end:2\n"
                                       "  - json_path: a.json\n    sampling_strategy: random:3\n")
    ds = _dataset(tmp_path / "mix.yaml", tmp_path)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids[:5] == ["a0", "a1", "a2", "b4", "b5"] and len(ids) == 8 and len(set(ids[5:])) == 3
    assert ids[5:] == [ds[i]["id"] for i in range(5, 8)]  # the random draw is seeded
    (tmp_path / "bad.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: some:3\n")
    with pytest.raises(ValueError, match=r"sampling_strategy: expected all, first:N, end:N or random:N"):
        load_sources(tmp_path / "bad.yaml")
    (tmp_path / "broken.json").write_text('[{"id": 1}, {"id": ')
    with pytest.raises(ValueError, match="is not a valid JSON array"):
        RecordFile(tmp_path / "broken.json")


def test_workers_get_the_spans_without_a_rescan(records, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    ds = _dataset(path, tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    assert [s["id"] for s, _ in zip(loader, range(2))] == ["ok-1", "no-marker"]


def test_shapes_conversations_answer_what_the_picture_shows(tmp_path):
    path = write(tmp_path, stage=2, samples=40, split="val", seed=3)
    recs = json.loads(path.read_text())
    assert sum("image" not in r for r in recs) >= 1 and sum("image" in r for r in recs) >= 30
    for r in recs:
        if "image" not in r:
            continue
        i = int(r["id"].split("-")[1])
        _, scene = draw_scene(np.random.default_rng([3, 1, i]), 32)
        answers = {a for _, _, a in questions(scene)}
        assert all(t["value"] in answers for t in r["conversations"][1::2]), r
        assert r["conversations"][0]["value"].startswith("<image>\n")
    stage1 = json.loads(write(tmp_path, stage=1, samples=5, split="val", seed=3).read_text())
    assert [r["conversations"][0]["value"] for r in stage1] == ["<image>"] * 5
    known = set(" ".join(all_texts()).replace("?", " ").replace(".", " ").split())
    for r in recs:
        for t in r["conversations"]:
            assert set(t["value"].replace("<image>", "").replace("?", " ").replace(".", " ").split()) <= known


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_conversations_with_and_without_images_share_a_batch(records, tmp_path, mode):
    from mmgpt_engine.data import make_collate

    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    ds = _dataset(path, tmp_path)
    samples = [ds[2], ds[0], ds[1]]               # text-only, image, image
    batch = make_collate(TOK, mode=mode)(samples)
    assert batch["images"].shape == (2, 3, 16, 16) and batch["image_sample"].tolist() == [1, 2]
    assert torch.equal(batch["images"][0], samples[1]["image"])
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2
    rows = batch["input_ids"] if mode == "pad" else [batch["input_ids"][0]]
    assert [int((r == IMAGE_TOKEN_ID).sum()) for r in rows] == ([0, 1, 1] if mode == "pad" else [2])
