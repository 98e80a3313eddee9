"""Tokenizers: byte-level, trained BPE (via the command), the shapes word-level one, files."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgpt_engine.data import ByteTokenizer, get_tokenizer
from mmgpt_engine.data import tokenizer as tokenizer_module
from mmgpt_engine.data.shapes import ShapesCaptionDataset

TEXTS = ["a small red circle above a blue square", "", "  spaces  and\ttabs\n", "ünïcödé ✓ 猫 🐈", "x" * 300]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_special_tokens():
    tok = get_tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = [tok.bos_id] + tok.encode("hi") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos><pad>"
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut-off UTF-8 sequence decodes, replaced
    with pytest.raises(TypeError, match="text: expected a str"):
        tok.encode(b"bytes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    ds = ShapesCaptionDataset(size=400)
    corpus.write_text("\n".join(ds.scene(i)[1] for i in range(400)) + "\nünïcödé ✓\n")
    out = folder / "tokenizer.json"
    assert tokenizer_module.main(["train", "--files", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    return get_tokenizer(out)


def test_bpe_command_trains_a_usable_tokenizer(trained):
    assert trained.vocab_size <= 300 and trained.vocab_size > 259
    specials = {trained.bos_id, trained.eos_id, trained.pad_id}
    assert len(specials) == 3
    ids = trained.encode("a small red circle above a large blue square")
    assert len(ids) < len("a small red circle above a large blue square") / 2  # merges learned
    assert not specials & set(ids)


@pytest.mark.parametrize("text", TEXTS + ["never seen: Zebra #42 😀"])
def test_bpe_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_bpe_command_checks_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="files: expected existing text files"):
        tokenizer_module.main(["train", "--files", str(tmp_path / "none.txt"), "--vocab-size", "300",
                               "--out", str(tmp_path / "t.json")])
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="vocab_size: expected >= 259"):
        tokenizer_module.train_bpe([str(tmp_path / "a.txt")], 100)


def test_shapes_word_tokenizer_round_trips_captions():
    tok = get_tokenizer("shapes")
    ds = ShapesCaptionDataset(size=50)
    for i in range(50):
        caption = ds.scene(i)[1]
        ids = tok.encode(caption)
        assert len(ids) == len(caption.split())
        assert tok.decode(ids) == caption
    assert tok.decode(tok.encode("a red zebra")) == "a red <unk>"
    assert tok.decode([tok.bos_id] + tok.encode("a red") + [tok.eos_id, tok.pad_id]) == "a red"
    assert tok.vocab_size == 21


@pytest.mark.parametrize("name", ["byte", "shapes", "bpe"])
def test_save_pretrained_and_load_from_the_folder(tmp_path, name, trained):
    tok = trained if name == "bpe" else get_tokenizer(name)
    tok.save_pretrained(tmp_path)
    again = get_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                         tok.vocab_size)
    assert again.encode("a red square ✓") == tok.encode("a red square ✓")


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path: expected 'byte', 'shapes', a tokenizer.json"):
        get_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="name_or_path: expected tokenizer.json or"):
        get_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="name_or_path"):
        get_tokenizer(3)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"kind": "hf"}))
    with pytest.raises(ValueError, match="no tokenizer.json beside it"):
        get_tokenizer(tmp_path)


def test_tokenizer_json_without_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="tokenizer: expected a bos special token"):
        get_tokenizer(tmp_path / "t.json")


def hf_style_folder(folder, separate_template=False):
    """A Hugging Face text tower's tokenizer files: tokenizer.json (byte-level BPE, SmolLM2-style
    special tokens) + tokenizer_config.json naming them (bos as an AddedToken mapping, as
    transformers writes it), the chat template inside it or in chat_template.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>"]
    tok.train_from_iterator(["a red circle", "a blue square above a green triangle"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
              "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "__type": "AddedToken"},
              "eos_token": "<|im_end|>", "pad_token": "<empty_output>", "unk_token": "<|endoftext|>"}
    if separate_template:
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return template


@pytest.mark.parametrize("separate_template", [False, True], ids=["in-config", "jinja-file"])
def test_hf_folder_special_tokens_and_chat_template_as_transformers(tmp_path, separate_template):
    """tokenizer_config.json decides the special tokens (not the first usual name found: this
    vocabulary also holds <|endoftext|>), and the chat template comes along; ids as transformers'."""
    transformers = pytest.importorskip("transformers")
    template = hf_style_folder(tmp_path / "tower", separate_template)
    ours = get_tokenizer(tmp_path / "tower")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tower")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.bos_id != ours.tokenizer.token_to_id("<|endoftext|>")
    assert ours.chat_template == template == theirs.chat_template
    for text in ["a red circle", "a green square above a blue triangle", "ünïcödé"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    # saved by us, read back by us and by transformers the same way
    ours.save_pretrained(tmp_path / "saved")
    again, theirs_again = get_tokenizer(tmp_path / "saved"), transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (ours.bos_id, ours.eos_id, ours.pad_id,
                                                                               template)
    assert (theirs_again.bos_token_id, theirs_again.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_hf_folder_naming_a_token_it_does_not_hold_is_refused(tmp_path):
    hf_style_folder(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer: tokenizer_config.json names eos_token '</s>', which .* does not hold"):
        get_tokenizer(tmp_path)
