"""ImageProcessor.from_pretrained(folder) against transformers' own image processor for the same
preprocessor_config.json (AutoImageProcessor; without torchvision transformers 5 returns the PIL
backend, the one compared here), on PIL images of odd sizes and modes; LLaVA's pad mode."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt_engine.data import ImageProcessor

transformers = pytest.importorskip("transformers")

CLIP_HUB_STYLE = {  # openai/clip-vit-large-patch14-336's file, sizes shrunk: ints, and the old key
    "crop_size": 40, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 40}


def images():
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    rgba = np.concatenate([rgb(37, 53), rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=2)
    palette = Image.fromarray(rgb(31, 29)).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return {
        "grey": Image.fromarray(rng.integers(0, 256, (45, 67), dtype=np.uint8), mode="L"),
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "portrait": Image.fromarray(rgb(97, 41)),
        "panorama": Image.fromarray(rgb(23, 171)),
        "tiny": Image.fromarray(rgb(3, 5)),
        "palette-transparent": palette,
        "exact": Image.fromarray(rgb(40, 40)),
    }


def processor_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "clip-hub-style":
        (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_HUB_STYLE))
    elif kind == "clip":
        transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 40}).save_pretrained(folder)
    else:  # siglip: a square resize, no crop, bilinear here (its default is bicubic)
        transformers.SiglipImageProcessor(size={"height": 40, "width": 48}, resample=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["clip-hub-style", "clip", "siglip"])
def test_pixel_values_equal_transformers(tmp_path, kind):
    folder = processor_folder(tmp_path, kind)
    theirs = transformers.AutoImageProcessor.from_pretrained(folder)
    assert type(theirs).__name__.endswith("Pil")  # no torchvision here: the PIL backend
    ours = ImageProcessor.from_pretrained(folder)
    worst = 0.0
    for name, img in images().items():
        want = torch.as_tensor(np.asarray(theirs(img, return_tensors="np")["pixel_values"][0]))
        got = ours(img)
        assert got.dtype == torch.float32 and got.shape == want.shape, (name, got.shape, want.shape)
        assert got.shape[1:] == ours.output_size
        err = (got - want).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-4, (kind, name, err)
    print(f"{kind}: max |pixel_values - transformers| = {worst:.2e}")
    batch = ours(list(images().values()))
    assert batch.shape == (len(images()), 3, *ours.output_size)


def expand2square(img, mean):
    """LLaVA-1.5's pad mode, as its repository writes it: the image centred on a mean-colour square."""
    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def test_pad_mode_is_llava_expand2square_then_the_processor(tmp_path):
    folder = processor_folder(tmp_path, "clip-hub-style")
    theirs = transformers.AutoImageProcessor.from_pretrained(folder)
    ours = ImageProcessor.from_pretrained(folder, aspect_mode="pad")
    for name in ("portrait", "panorama", "grey", "rgba"):
        img = images()[name]
        rgb = img.convert("RGB") if img.mode == "L" else img
        if img.mode == "RGBA":
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, img).convert("RGB")
        want = torch.as_tensor(theirs(expand2square(rgb, CLIP_HUB_STYLE["image_mean"]),
                                      return_tensors="np")["pixel_values"][0])
        got = ours(img)
        assert (got - want).abs().max().item() < 1e-4, name
    # the whole panorama survives: its left and right edges are inside the padded square
    plain = ImageProcessor.from_pretrained(folder)
    pano = images()["panorama"]
    assert not torch.allclose(plain(pano), ours(pano))


def test_bad_folders_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder: expected preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "DetrImageProcessor"}))
    with pytest.raises(ValueError, match="describes a 'DetrImageProcessor'; supported image processors"):
        ImageProcessor.from_pretrained(tmp_path)
    folder = processor_folder(tmp_path, "clip")
    with pytest.raises(ValueError, match=r"aspect_mode: expected one of \['processor', 'pad'\], got 'squash'"):
        ImageProcessor.from_pretrained(folder, aspect_mode="squash")
    bad = dict(json.loads((folder / "preprocessor_config.json").read_text()), size={"longest": 3})
    (folder / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="expected size as an int"):
        ImageProcessor.from_pretrained(folder)


def test_preprocess_image_takes_the_towers_processor(tmp_path):
    """The datasets' one entry point: with a processor, its pixels; a size the model does not
    take is refused, naming both."""
    from mmgpt_engine.data.image import preprocess_image

    folder = processor_folder(tmp_path, "siglip")          # 40 x 48 outputs
    proc = ImageProcessor.from_pretrained(folder)
    img = images()["portrait"]
    with pytest.raises(ValueError, match=r"processor: expected images of shape \(3, 40, 40\) .* got \(3, 40, 48\)"):
        preprocess_image(img, 40, 3, processor=proc)
    square = ImageProcessor(size={"height": 40, "width": 40}, resample=2)
    assert torch.equal(preprocess_image(img, 40, 3, processor=square), square(img))
    assert not torch.equal(preprocess_image(img, 40, 3), square(img))  # the default is another pipeline
