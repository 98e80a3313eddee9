"""WebDataset shards and JSONL manifests written here, bad samples included: the good ones load,
the bad ones are skipped and counted, ranks and workers split the data; and build_dataset."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmgpt_engine.data import build_dataset, get_tokenizer, make_collate, write_shard
from mmgpt_engine.data.shards import WebDatasetCaptions, expand_shards
from mmgpt_engine.model import ModelConfig, MultimodalGPT


def picture(i: int, size=(20, 14), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).convert(mode)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """shard-000: 6 good samples; shard-001: 4 good (grayscale, RGBA, 1x1, json caption) + a
    corrupt image + a sample without caption + one without image. 10 good, 3 bad."""
    write_shard(tmp_path / "shard-000.tar", [(picture(i), f"caption {i}") for i in range(6)])
    with tarfile.open(tmp_path / "shard-001.tar", "w") as tar:
        add_member(tar, "g0.png", png(picture(10, mode="L")))
        add_member(tar, "g0.txt", b"caption 10")
        add_member(tar, "g1.png", png(picture(11, mode="RGBA")))
        add_member(tar, "g1.txt", b"caption 11")
        add_member(tar, "bad.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        add_member(tar, "bad.txt", b"corrupt image")
        add_member(tar, "g2.png", png(picture(12, size=(1, 1))))
        add_member(tar, "g2.txt", "caption 12 ✓".encode())
        add_member(tar, "nocap.png", png(picture(13)))
        add_member(tar, "noimg.txt", b"caption without image")
        add_member(tar, "g3.webp", png(picture(14)))  # a PNG under another image key: still decodes
        add_member(tar, "g3.json", json.dumps({"caption": "caption 14", "prompt": "Q:"}).encode())
    return tmp_path


def texts_of(samples):
    return sorted(s["text"] for s in samples)


GOOD = sorted([f"caption {i}" for i in (0, 1, 2, 3, 4, 5, 10, 11, 14)] + ["caption 12 ✓"])


def test_shards_load_and_bad_samples_are_counted(shards):
    ds = WebDatasetCaptions(str(shards / "shard-{000..001}.tar"), image_size=16, shuffle=False)
    samples = list(ds)
    assert texts_of(samples) == GOOD
    assert ds.skipped == 3 and sum(s["skipped"] for s in samples) == 3
    assert all(s["image"].shape == (3, 16, 16) for s in samples)
    prompted = next(s for s in samples if s["text"] == "caption 14")
    assert (prompted["labels"][:3] == -100).all() and prompted["labels"][3] == ord("c")
    again = list(WebDatasetCaptions(str(shards), image_size=16, shuffle=False))  # a folder works too
    assert texts_of(again) == GOOD


def test_counts_reach_the_batches_through_workers(shards):
    ds = build_dataset("webdataset", path=str(shards / "shard-*.tar"), image_size=16)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=make_collate())
    batches = list(loader)
    assert sorted(t for b in batches for t in b["text"]) == GOOD
    assert sum(b["n_skipped"] for b in batches) == 3


@pytest.mark.parametrize("n_shards, world", [(4, 2), (1, 3)])
def test_ranks_get_disjoint_shares(tmp_path, n_shards, world):
    for k in range(n_shards):
        write_shard(tmp_path / f"s-{k}.tar", [(picture(i), f"s{k} c{i}") for i in range(5)])
    seen = []
    for rank in range(world):
        ds = WebDatasetCaptions(str(tmp_path), image_size=8, rank=rank, world_size=world, seed=3)
        ds.set_epoch(1)
        seen.append(texts_of(list(ds)))
    everything = sorted(t for part in seen for t in part)
    assert everything == sorted(f"s{k} c{i}" for k in range(n_shards) for i in range(5))
    assert all(seen)  # nobody is starved, even with fewer shards than ranks


def test_missing_and_truncated_shards_are_counted_not_raised(shards, caplog):
    data = (shards / "shard-000.tar").read_bytes()
    (shards / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    urls = [str(shards / "shard-000.tar"), str(shards / "gone.tar"), str(shards / "cut.tar"),
            str(shards / "shard-001.tar")]
    ds = WebDatasetCaptions(urls, image_size=8, shuffle=False, rank=1, world_size=2)
    ds._rank_shards = lambda: (urls, False)  # this rank reads all four
    with caplog.at_level("WARNING", logger="mmgpt_engine.data"):
        samples = list(ds)
    assert len([s for s in samples if s["text"] in {f"caption {i}" for i in range(6)}]) >= 6
    assert ds.skipped >= 2 + 3  # the missing shard and the truncated one each at least once, 3 bad samples
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == ds.skipped  # every skip logged, naming rank and shard (and the key when there is one)
    assert any(line.startswith(f"data: rank 1: skipped data in shard {urls[1]}: FileNotFoundError") for line in lines)
    assert any(f"in shard {urls[2]}: truncated tar (" in line for line in lines)
    assert any(line.startswith(f"data: rank 1: skipped sample 'bad' in shard {urls[3]}: ") for line in lines)
    assert any(f"skipped sample 'nocap' in shard {urls[3]}: no caption" in line for line in lines)


def test_a_tar_cut_at_a_member_boundary_is_reported(shards, caplog):
    """Cut exactly after a member, a tar reads as a shorter shard without any error; the missing
    end-of-archive marker gives it away."""
    from mmgpt_engine.data.shards import tar_truncated

    data = (shards / "shard-000.tar").read_bytes()
    assert tar_truncated(str(shards / "shard-000.tar")) is None
    (shards / "cut.tar").write_bytes(data[:2048])                      # header + one member's data block(s)
    (shards / "odd.tar").write_bytes(data[:2000])
    assert tar_truncated(str(shards / "cut.tar")) == "no end-of-archive marker"
    assert tar_truncated(str(shards / "odd.tar")) == "2000 bytes is not a whole number of 512-byte blocks"
    ds = WebDatasetCaptions([str(shards / "cut.tar")], image_size=8, shuffle=False)
    with caplog.at_level("WARNING", logger="mmgpt_engine.data"):
        list(ds)
    assert ds.skipped >= 1
    assert any("cut.tar: truncated tar (no end-of-archive marker)" in r.getMessage() for r in caplog.records)


def test_shard_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: expected WebDataset .tar shards"):
        expand_shards(str(tmp_path))
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size"):
        WebDatasetCaptions(["a.tar"], rank=2, world_size=2)


def test_jsonl_manifest(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        picture(i).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    records = [
        {"image": "img/0.png", "text": "zero"},
        {"image": "img/missing.png", "text": "missing file"},
        {"image": "img/bad.png", "text": "corrupt"},
        "{not json",
        {"image": str(tmp_path / "img" / "1.png"), "text": "one", "prompt": "Q:"},
        {"image": "img/2.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "two"}]},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    ds = build_dataset("jsonl", path=str(tmp_path / "{split}.jsonl"), split="train", image_size=16)
    assert len(ds) == 6
    got = [ds[i] for i in range(6)]
    assert [s["text"] for s in got] == ["zero", "one", "one", "one", "one", "two"]
    assert [s["skipped"] for s in got] == [0, 3, 2, 1, 0, 0]
    tok = get_tokenizer()
    conv = got[5]
    prompt_len = 1 + len(tok.encode("What is it?"))
    assert (conv["labels"][:prompt_len] == -100).all() and tok.decode(conv["labels"][prompt_len:]) == "two"
    batch = make_collate()(got)
    assert batch["n_skipped"] == 6 and batch["images"].shape == (6, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="path: expected a JSONL manifest file"):
        build_dataset("jsonl", path=str(tmp_path / "val.jsonl"))


def test_build_dataset_checks_and_feeds_the_model():
    cfg = ModelConfig.from_preset("tiny", n_layer=1)
    with pytest.raises(ValueError, match=r"kind: expected one of \['shapes', 'webdataset', 'jsonl'\]"):
        build_dataset("coco")
    with pytest.raises(ValueError, match="path: expected the data's location"):
        build_dataset("webdataset")
    ds = build_dataset("shapes", split="val", image_size=cfg.image_size, in_channels=cfg.in_channels,
                       max_text_len=cfg.max_text_len, seed=1)
    assert len(ds) == 1000 and ds.max_text_len == cfg.max_text_len == 80
    for mode in ("pad", "pack"):
        batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=make_collate(mode=mode))))
        kwargs = {"cu_seqlens": batch["cu_seqlens"]} if mode == "pack" else {}
        out = MultimodalGPT(cfg)(batch["input_ids"], batch["images"], batch["labels"], **kwargs)
        assert torch.isfinite(out.loss)


def test_a_pretrained_towers_image_processor_prepares_every_kind(tmp_path):
    """With an image_processor (a pretrained tower's preprocessor_config.json), the datasets' images
    are its output, not the built-in [-1, 1] scaling."""
    from PIL import Image

    from mmgpt_engine.data.image_processor import ImageProcessor
    from mmgpt_engine.data.shapes import ShapesCaptionDataset

    processor = ImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True,
                               image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
    shapes = build_dataset("shapes", split="val", image_size=16, image_processor=processor)
    img, _ = ShapesCaptionDataset(split="val", image_size=16).scene(0)
    assert torch.equal(shapes[0]["image"], processor(img))
    assert not torch.equal(shapes[0]["image"], build_dataset("shapes", split="val", image_size=16)[0]["image"])
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "text": "green"}\n')
    jsonl = build_dataset("jsonl", path=str(tmp_path / "train.jsonl"), image_size=16, image_processor=processor)
    assert torch.equal(jsonl[0]["image"], processor(Image.open(tmp_path / "a.png")))
