"""CLIP and SigLIP vision towers from Hugging Face folders in our ViT blocks: `model.vision.features`
equals transformers' `hidden_states[vision_feature_layer]` (the selected tokens) in float32, on the
torch and triton backends; the connectors; counts; a bit-exact save / load round trip.

Vision folders are saved both as transformers 5 saves a CLIPVisionModel / SiglipVisionModel (no
key prefix) and inside the dual encoder (CLIPModel / SiglipModel, keys under "vision_model.", as
openai/clip-vit-large-patch14-336 and google/siglip-base-patch16-224 on the Hub)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmgpt_engine.model import MultimodalGPT
from mmgpt_engine.model.connectors import pixel_shuffle
from mmgpt_engine.ops import available_backends
from tests.helpers import count_dense_attention
from tests.model.tiny_hf import save_processor, save_text, save_vision

transformers = pytest.importorskip("transformers")

BACKENDS = ["torch"] + (["triton"] if "triton" in available_backends("cpu") else [])
TOL = 1e-4


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2")
    save_text(folder, "smollm2")
    return folder


def hf_hidden_states(tower, pixels):
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual", [False, True], ids=["vision-model", "dual-encoder"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_features_equal_hidden_states_minus_two(tmp_path, text_folder, family, dual, backend):
    """LLaVA's default: hidden_states[-2], CLIP's class token dropped."""
    hf = save_vision(tmp_path, family, dual=dual)
    model = MultimodalGPT.from_pretrained_towers(text_folder, tmp_path, backend=backend)
    c = model.config
    assert (c.vision_type, c.vision_feature_layer, c.vision_layers, c.vision_layers_used) == (family, -2, 3, 2)
    assert len(model.vision.tower.blocks) == 2  # the last layer never runs, so it is not built
    pixels = torch.randn(2, 3, 32, 32)
    want = hf_hidden_states(hf, pixels).hidden_states[-2]
    want = want[:, 1:] if family == "clip" else want
    with torch.no_grad():
        got = model.vision.features(pixels)
    err = (got - want).abs().max().item()
    print(f"{family} {'dual' if dual else 'vision'} {backend}: max |features - hidden_states[-2]| = {err:.2e} "
          f"(features up to {want.abs().max().item():.2f})")
    assert got.shape == (2, 16, 64) and err < TOL


@pytest.mark.parametrize("layer, select", [(-1, "patch"), (0, "patch"), (1, "full"), (-4, "full"), (3, "patch")])
def test_clip_feature_layers_and_select(tmp_path, text_folder, layer, select):
    hf = save_vision(tmp_path, "clip")
    model = MultimodalGPT.from_pretrained_towers(text_folder, tmp_path, vision_feature_layer=layer,
                                                 vision_feature_select=select, backend="torch")
    pixels = torch.randn(2, 3, 32, 32)
    want = hf_hidden_states(hf, pixels).hidden_states[layer]
    want = want if select == "full" else want[:, 1:]
    with torch.no_grad():
        got = model.vision.features(pixels)
    assert got.shape == want.shape and (got - want).abs().max().item() < TOL
    assert model.n_image_tokens == (17 if select == "full" else 16)
    assert model.vision(pixels).shape == (2, model.n_image_tokens, model.config.n_embd)


def test_siglip_post_norm_gives_last_hidden_state(tmp_path, text_folder):
    """nanoVLM's choice: the last layer through SigLIP's post-layernorm = transformers' last_hidden_state."""
    hf = save_vision(tmp_path, "siglip")
    model = MultimodalGPT.from_pretrained_towers(text_folder, tmp_path, vision_feature_layer=-1, vision_post_norm=True,
                                                 backend="torch")
    pixels = torch.randn(3, 3, 32, 32)
    want = hf_hidden_states(hf, pixels).last_hidden_state
    with torch.no_grad():
        got = model.vision.features(pixels)
    assert (got - want).abs().max().item() < TOL
    assert not torch.allclose(got, hf_hidden_states(hf, pixels).hidden_states[-1], atol=1e-2)


@pytest.mark.parametrize("connector, tokens", [("mlp2x_gelu", 16), ("linear", 16), ("pixel_shuffle", 4)])
def test_connectors_counts_and_flops(tmp_path, text_folder, connector, tokens, monkeypatch):
    """Image tokens per connector; num_params and flops_per_token count the text tower, the vision
    layers that run and the connector (FLOPs against torch's counter on the dense reference
    attention, which skips bias adds and norms, so within 3% as tests/model/test_config.py)."""
    count_dense_attention(monkeypatch)
    save_vision(tmp_path, "clip")
    model = MultimodalGPT.from_pretrained_towers(text_folder, tmp_path, connector=connector, backend="torch")
    c = model.config
    assert model.n_image_tokens == tokens
    assert model.num_params() == c.num_params()
    assert sum(p.numel() for p in model.vision.parameters()) == sum(
        n for k, n in c.param_counts().items() if k.startswith("vision"))
    ids = torch.randint(0, c.vocab_size, (2, 11))
    pixels = torch.randn(2, 3, 32, 32)
    out = model(ids, pixels, labels=ids)
    assert out.logits.shape == (2, 11, c.vocab_size) and torch.isfinite(out.loss)
    pixels.requires_grad_(True)  # the formula counts the patch convolution's input gradient too
    with FlopCounterMode(display=False) as counter:
        model(ids, pixels, labels=ids).loss.backward()
    expected = c.flops_per_token(11) * 11 * 2
    assert abs(counter.get_total_flops() - expected) / expected < 0.03, (counter.get_total_flops(), expected)


def test_pixel_shuffle_groups_neighbouring_tokens():
    grid = torch.arange(16.0).reshape(1, 16, 1)        # a 4 x 4 grid, token value = its index
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="x: expected a square grid"):
        pixel_shuffle(torch.zeros(1, 17, 2), 2)


def test_towers_model_saves_and_loads_bit_exactly(tmp_path, text_folder):
    save_vision(tmp_path / "siglip", "siglip")
    save_processor(tmp_path / "siglip", "siglip", size={"height": 32, "width": 32})
    model = MultimodalGPT.from_pretrained_towers(text_folder, tmp_path / "siglip", connector="pixel_shuffle",
                                                 backend="torch")
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "preprocessor_config.json").is_file()
    loaded = MultimodalGPT.from_pretrained(tmp_path / "export", backend="torch")
    assert loaded.config == model.config and loaded.image_processor_config == model.image_processor_config
    assert loaded.image_processor_config["size"] == {"height": 32, "width": 32}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, pixels = torch.randint(0, 97, (2, 7)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels).logits, model(ids, pixels).logits)


def test_text_only_model_refuses_images(text_folder):
    model = MultimodalGPT.from_pretrained_towers(text_folder, backend="torch")
    assert model.n_image_tokens == 0
    with pytest.raises(ValueError, match="images: this model has no vision encoder"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 32, 32))
