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
