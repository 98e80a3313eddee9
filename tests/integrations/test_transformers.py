"""apply_kernels on tiny random Hugging Face models built here (no downloads): each family with and
without our kernels, forward and backward. float32: logits, loss and every parameter's gradient
within 1e-4 of the stock model's; bfloat16: each within 2x the stock model's own error against
the float64 stock model (tests/helpers.assert_close_to_truth). Then the masks (padding left and
right, packed sequences, custom 4-d masks), what is refused, and undo."""
import copy
import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmgpt_engine.integrations.transformers import (
    SUPPORTED_FAMILIES,
    AttentionRefused,
    apply_kernels,
)
from mmgpt_engine.integrations.transformers.attention import layout_from_dense
from tests.helpers import DEVICE, assert_close_to_truth, kernel_backends, max_err

BACKENDS = ["torch"] + kernel_backends()
# the mask logic and the refusals do not depend on the backend: they run on the fast one, while
# the parity tests and the packed / generation paths run the kernels too
LOGIC = ["torch"]
VOCAB = 120
IMAGE_TOKEN = VOCAB - 1


def _llama_like(config_cls, **extra):
    return config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False, **extra)


def _clip_vision():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=16)


def _siglip_vision():
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16)


def _padded_ids(rows=2, length=9, left=True):
    ids = torch.randint(0, VOCAB - 1, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return ids, mask


def _lm_inputs(left=True):
    ids, mask = _padded_ids(left=left)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _two_tower_inputs():
    ids, mask = _padded_ids(length=7, left=False)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32), return_loss=True)


def _llava_inputs():
    ids, mask = _padded_ids(length=10, left=False)
    # 4 image features per 32x32 image: CLIP's 4 patches without its class token ("default"), or
    # SigLIP's 4 patches ("full": SigLIP has no class token)
    ids[:, 1:5] = IMAGE_TOKEN
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32),
                labels=ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100))


# family -> (build the model, its inputs, the outputs compared (name -> tensor, at unpadded positions))
FAMILIES = {
    "llama": (lambda: LlamaForCausalLM(_llama_like(LlamaConfig)), _lm_inputs),
    "mistral": (lambda: MistralForCausalLM(_llama_like(MistralConfig)), lambda: _lm_inputs(left=False)),
    "qwen2": (lambda: Qwen2ForCausalLM(_llama_like(Qwen2Config)), _lm_inputs),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                                use_cache=False)), _lm_inputs),
    "clip": (lambda: CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16, eos_token_id=VOCAB - 2),
        vision_config=_clip_vision().to_dict(), projection_dim=16)), _two_tower_inputs),
    "clip_vision": (lambda: CLIPVisionModel(_clip_vision()), lambda: dict(pixel_values=torch.randn(2, 3, 32, 32))),
    "siglip": (lambda: SiglipModel(SiglipConfig(
        text_config=SiglipTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16).to_dict(),
        vision_config=_siglip_vision().to_dict())), _two_tower_inputs),
    "siglip_vision": (lambda: SiglipVisionModel(_siglip_vision()), lambda: dict(pixel_values=torch.randn(2, 3, 32, 32))),
    "llava": (lambda: LlavaForConditionalGeneration(LlavaConfig(
        vision_config=_clip_vision(), text_config=_llama_like(LlamaConfig), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default")), _llava_inputs),
    "llava_siglip_qwen2": (lambda: LlavaForConditionalGeneration(LlavaConfig(
        vision_config=_siglip_vision(), text_config=_llama_like(Qwen2Config), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full")), _llava_inputs),
}


def _outputs(out, inputs):
    """The compared outputs (at every position, padding included: a padded query sees what the
    mask lets it see, as in the stock model) and the scalar that is backpropagated."""
    found = {}
    for name in ("logits", "logits_per_image", "last_hidden_state", "pooler_output"):
        if getattr(out, name, None) is not None:
            found[name] = getattr(out, name)
    if getattr(out, "loss", None) is not None:
        found["loss"] = out.loss
        scalar = out.loss
    else:
        g = torch.Generator().manual_seed(1)
        scalar = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)).sum()
                     for t in found.values())
    return found, scalar


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    inputs = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    floats = {k: (v.to(model.dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    found, scalar = _outputs(model(**floats), inputs)
    scalar.backward()
    grads = {f"d {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in found.items()}, grads


def _build(family, dtype):
    model = FAMILIES[family][0]().to(DEVICE).eval()  # eval: no dropout, in the stock model either
    return model.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_matches_the_stock_model(family, backend):
    stock = _build(family, torch.float32)
    ours = copy.deepcopy(stock)
    patch = apply_kernels(ours, backend=backend)
    assert patch.attention and patch.norms
    inputs = FAMILIES[family][1]()
    want, want_g = _run(stock, inputs)
    got, got_g = _run(ours, inputs)
    assert set(got_g) == set(want_g) and got_g  # the same parameters get gradients
    for name in list(want) + list(want_g):
        a, b = (got | got_g)[name], (want | want_g)[name]
        err = max_err(a, b)
        assert err <= 1e-4, f"{family} {name}: max abs diff {err:.2e} from the stock model"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "clip", "llava"])  # RMSNorm+GQA, LayerNorm, two towers, both
def test_bfloat16_error_within_twice_the_stock_models(family, backend):
    stock = _build(family, torch.float32)
    truth_model = copy.deepcopy(stock).double()
    stock = stock.bfloat16()
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    inputs = FAMILIES[family][1]()
    truth, truth_g = _run(truth_model, inputs)
    want, want_g = _run(stock, inputs)
    got, got_g = _run(ours, inputs)
    for name in list(truth) + list(truth_g):
        floor = None
        if name == "loss":
            # one scalar, a mean over tokens: its error is a single random draw, ours or the stock
            # model's about as often the larger one, so it is allowed the logits' own error too
            # (any loss error beyond that, like a wrong shift or mask, is far larger)
            key = "logits" if "logits" in truth else "logits_per_image"
            logits_err = max_err(want[key], truth[key])
            floor = logits_err / max(1.0, truth["loss"].abs().item())
        assert_close_to_truth(f"{family} {name}", (got | got_g)[name], (truth | truth_g)[name],
                              (want | want_g)[name], floor=floor)


# ---------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_packed_by_position_ids_attend_within_themselves(backend):
    """transformers detects packing from position_ids resets (no attention_mask, no cache) and
    masks across sequences; ours packs them into cu_seqlens. Both equal each sequence run alone."""
    stock = _build("llama", torch.float32)
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    ids = torch.randint(0, VOCAB, (1, 9), device=DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]], device=DEVICE)
    got = ours(input_ids=ids, position_ids=position_ids).logits
    want = stock(input_ids=ids, position_ids=position_ids).logits
    assert max_err(got, want) <= 1e-4
    for start, end in ((0, 4), (4, 7), (7, 9)):  # each sequence alone
        alone = stock(input_ids=ids[:, start:end]).logits
        assert max_err(got[:, start:end], alone) <= 1e-4


@pytest.mark.parametrize("backend", LOGIC)
def test_a_padding_hole_in_the_middle_is_exact_too(backend):
    stock = _build("qwen2", torch.float32)
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    ids = torch.randint(0, VOCAB, (2, 8), device=DEVICE)
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[0, 3:5] = 0
    got = ours(input_ids=ids, attention_mask=mask).logits
    want = stock(input_ids=ids, attention_mask=mask).logits
    assert max_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", LOGIC)
def test_a_custom_4d_mask_is_decomposed_or_refused(backend):
    """A 4-d boolean mask given by the caller reaches the attention as it is: a block-causal one
    runs exactly; one with an additive bias is refused."""
    stock = _build("llama", torch.float32)
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    ids = torch.randint(0, VOCAB, (1, 6), device=DEVICE)
    i = torch.arange(6, device=DEVICE)
    seq = torch.tensor([0, 0, 0, 1, 1, 1], device=DEVICE)
    block_causal = ((seq.view(-1, 1) == seq.view(1, -1)) & (i.view(1, -1) <= i.view(-1, 1))).view(1, 1, 6, 6)
    got = ours(input_ids=ids, attention_mask=block_causal).logits
    want = stock(input_ids=ids, attention_mask=block_causal).logits
    assert max_err(got, want) <= 1e-4
    bias = torch.where(block_causal, torch.tensor(0.5, device=DEVICE), torch.tensor(float("-inf"), device=DEVICE))
    with pytest.raises(AttentionRefused, match=r"^attention_mask: an additive mask with values other than 0 and -inf"):
        ours(input_ids=ids, attention_mask=bias)


def test_layouts_of_dense_masks():
    """The decomposition itself: block-causal and block-bidirectional masks into cu_seqlens,
    padding dropped, a sliding window found; an interleaving or an overlay refused."""
    i = torch.arange(7)
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    same = seq.view(-1, 1) == seq.view(1, -1)
    causal = same & (i.view(1, -1) <= i.view(-1, 1))
    layout = layout_from_dense(causal.unsqueeze(0))
    assert layout.causal and layout.cu_seqlens.tolist() == [0, 2, 5, 7] and layout.max_seqlen == 3
    layout = layout_from_dense(same.unsqueeze(0))
    assert not layout.causal and layout.cu_seqlens.tolist() == [0, 2, 5, 7]
    keep_queries = torch.ones(1, 7, dtype=torch.bool)
    keep_queries[0, 5:] = False  # the last sequence is padding: dropped, not attended to
    padded = causal & keep_queries.view(1, -1)
    layout = layout_from_dense(padded.unsqueeze(0), keep_queries)
    assert layout.q_tokens.tolist() == [0, 1, 2, 3, 4] and layout.cu_seqlens.tolist() == [0, 2, 5]
    full = torch.ones(1, 7, 7, dtype=torch.bool).tril()
    assert layout_from_dense(full).q_tokens is None  # plain causal: no unpadding at all
    interleaved = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    with pytest.raises(AttentionRefused, match="within contiguous sequences"):
        layout_from_dense((interleaved.view(-1, 1) == interleaved.view(1, -1)).unsqueeze(0))
    window = full & (i.view(1, -1) > i.view(-1, 1) - 3)
    layout = layout_from_dense(window)
    assert layout.causal and layout.window == 3 and layout.q_tokens is None
    overlay = full.clone()
    overlay[0, 1, 2] = True  # one bidirectional pair inside causal text (an image overlay)
    with pytest.raises(AttentionRefused, match="overlay"):
        layout_from_dense(overlay)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sliding_window_shorter_than_the_sequence(backend):
    """Mistral with a window of 3 over 8 tokens: padded (the mask is decomposed into a windowed
    causal layout) and packed by position_ids; and greedy decoding past the window."""
    stock = MistralForCausalLM(_llama_like(MistralConfig, sliding_window=3)).to(DEVICE).eval()
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    ids, mask = _padded_ids(length=8, left=False)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]] * 2, device=DEVICE)
    for kwargs in (dict(attention_mask=mask), dict(position_ids=packed)):
        got, want = ours(input_ids=ids, **kwargs).logits, stock(input_ids=ids, **kwargs).logits
        assert max_err(got, want) <= 1e-4, kwargs
    generate = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    prompt = ids[:, :5]
    assert torch.equal(ours.generate(prompt, attention_mask=torch.ones_like(prompt), **generate),
                       stock.generate(prompt, attention_mask=torch.ones_like(prompt), **generate))


@pytest.mark.parametrize("backend", BACKENDS[-1:])
def test_greedy_generation_matches_also_on_a_left_padded_batch(backend):
    """Decoding steps are 1 query against the cached keys: with padding, the keys are unpadded
    with their own offsets (cu_seqlens_k)."""
    stock = LlamaForCausalLM(_llama_like(LlamaConfig)).to(DEVICE).eval()
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    ids = torch.randint(1, VOCAB, (2, 5), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    for attention_mask in (torch.ones_like(ids), mask):
        want = stock.generate(ids, attention_mask=attention_mask, **kwargs)
        got = ours.generate(ids, attention_mask=attention_mask, **kwargs)
        assert torch.equal(got.sequences, want.sequences)
        for x, y in zip(got.scores, want.scores):
            assert max_err(x, y) <= 1e-4


@pytest.mark.parametrize("backend", LOGIC)
def test_attention_dropout_in_training_is_refused(backend):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=16,
                                       attn_pdrop=0.1)).to(DEVICE)
    apply_kernels(model, backend=backend)
    model.train()
    with pytest.raises(AttentionRefused, match=r"^GPT2Attention: attention dropout 0.1 is not in ops.flash_attention"):
        model(input_ids=torch.randint(0, VOCAB, (1, 5), device=DEVICE))
    model.eval()
    model(input_ids=torch.randint(0, VOCAB, (1, 5), device=DEVICE))


@pytest.mark.parametrize("backend", LOGIC)
def test_loss_with_num_items_in_batch_matches(backend):
    """The Trainer's gradient-accumulation path: sum / num_items_in_batch."""
    stock = _build("llama", torch.float32)
    ours = copy.deepcopy(stock)
    apply_kernels(ours, backend=backend)
    inputs = _lm_inputs()
    want = stock(**inputs, num_items_in_batch=torch.tensor(7)).loss
    got = ours(**inputs, num_items_in_batch=torch.tensor(7)).loss
    assert abs(got.item() - want.item()) <= 1e-5


# ------------------------------------------------------------------------------ patching and undo
def test_undo_restores_the_stock_model_and_weights_are_never_touched(tmp_path):
    stock = _build("llava", torch.float32)
    model = copy.deepcopy(stock)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    with apply_kernels(model, backend=BACKENDS[-1]) as patch:
        assert patch.active and model.config._attn_implementation == "mmgpt"
        assert model.config.text_config._attn_implementation == "mmgpt"
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert "mmgpt" not in json.dumps(saved)  # the implementation is not written into the export
    assert not patch.active
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])
    assert model.config._attn_implementation == stock.config._attn_implementation
    assert model.config.vision_config._attn_implementation == stock.config.vision_config._attn_implementation
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "_loss_function" not in model.__dict__
    inputs = _llava_inputs()
    want, want_g = _run(stock, inputs)
    got, got_g = _run(model, inputs)
    for name in list(want) + list(want_g):
        assert torch.equal((got | got_g)[name], (want | want_g)[name]), name  # bitwise: the stock code again
    patch.undo()  # a second undo changes nothing
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, before[k][1])


def test_a_model_is_not_patched_twice():
    model = _build("llava", torch.float32)
    patch = apply_kernels(model)
    with pytest.raises(ValueError, match=r"^model: already patched by apply_kernels \(it\)"):
        apply_kernels(model)
    patch.undo()
    tower_patch = apply_kernels(model.model.vision_tower)  # a sub-model alone first
    with pytest.raises(ValueError, match=r"^model: already patched by apply_kernels \(its submodule model.vision_tower\)"):
        apply_kernels(model)
    tower_patch.undo()
    apply_kernels(model).undo()


def test_an_unknown_family_names_itself_and_what_is_supported():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match=r"^model: apply_kernels knows the families \['llama', .*'llava'\], got "
                                         r"model_type 'gemma' \(GemmaForCausalLM's config\)"):
        apply_kernels(model)
    assert "llava" in SUPPORTED_FAMILIES and not any("forward" in m.__dict__ for m in model.modules())


def test_a_llava_with_an_unknown_language_model_is_refused_naming_it():
    from transformers import GemmaConfig

    config = LlavaConfig(vision_config=_clip_vision(), image_token_id=IMAGE_TOKEN,
                         text_config=GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16))
    with pytest.raises(ValueError, match=r"got model_type 'gemma' \(LlavaForConditionalGeneration's config.text_config\)"):
        apply_kernels(LlavaForConditionalGeneration(config))


def test_each_part_can_be_left_stock():
    model = _build("llama", torch.float32)
    patch = apply_kernels(model, attention=False, cross_entropy=False)
    assert not patch.attention and patch.norms and not patch.loss
    assert model.config._attn_implementation != "mmgpt" and "_loss_function" not in model.__dict__
    assert any("forward" in m.__dict__ for m in model.modules())  # the norms, patched
    patch.undo()
    patch = apply_kernels(model, norm=False)
    assert patch.attention and not patch.norms and patch.loss
    assert model.config._attn_implementation == "mmgpt" and "_loss_function" in model.__dict__
    assert not any("forward" in m.__dict__ for m in model.modules())  # the norms stay stock
    patch.undo()


def test_vision_models_have_no_loss_to_patch_and_say_what_stays_stock():
    patch = apply_kernels(_build("siglip_vision", torch.float32))
    assert not patch.loss
    assert any("no language-model head" in u for u in patch.untouched)
    assert any("MultiheadAttention" in u for u in patch.untouched)  # SigLIP's pooling head


def test_a_head_dim_the_kernels_do_not_take_is_refused_up_front():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=528, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"^model: model.layers.0.self_attn \(LlamaAttention\) has head dim 264"):
        apply_kernels(model)
    assert model.config._attn_implementation != "mmgpt"  # nothing was left half patched


def test_a_custom_loss_function_is_not_replaced_silently():
    model = _build("llama", torch.float32)
    model.loss_function = lambda *a, **k: torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"^model: its loss_function is .* not transformers' ForCausalLMLoss"):
        apply_kernels(model)
    assert apply_kernels(model, cross_entropy=False).loss is False


@pytest.mark.parametrize("call,exc,message", [
    (lambda m: apply_kernels(torch.nn.Linear(2, 2)), TypeError, r"^model: expected a transformers PreTrainedModel, got Linear"),
    (lambda m: apply_kernels(m, backend="fastest"), ValueError, r"^backend: expected one of \['torch', 'triton', 'cuda'\]"),
    (lambda m: apply_kernels(m, backend=1), TypeError, r"^backend: expected a str"),
    (lambda m: apply_kernels(m, norm="yes"), TypeError, r"^norm: expected a bool, got str"),
    (lambda m: apply_kernels(m, backend="cuda") if DEVICE == "cpu" else pytest.skip("CPU check"), ValueError,
     r"^backend: 'cuda' cannot run this model's tensors"),
], ids=["not a model", "backend name", "backend type", "flag type", "backend unavailable"])
def test_bad_arguments_name_themselves(call, exc, message):
    model = _build("llama", torch.float32)
    with pytest.raises(exc, match=message):
        call(model)
