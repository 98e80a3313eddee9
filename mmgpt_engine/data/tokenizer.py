"""Tokenizers: a byte-level default that needs no files, and any Hugging Face `tokenizers`
tokenizer.json. Both expose the same small interface:

    tok = load_tokenizer()                       # bytes 0..255 + <bos> 256, <eos> 257, <pad> 258
    tok = load_tokenizer("path/tokenizer.json")  # or a folder holding one (e.g. a saved checkpoint)
    tok = load_tokenizer("checkpoints/SmolLM2-135M")  # a Hugging Face folder: tokenizer.json + tokenizer_config.json
    tok = word_tokenizer(["a", "red", "circle"])  # one id per word (+ the special tokens and <unk>)
    ids = tok.encode("a red circle"); tok.decode(ids) == "a red circle"
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size; tok.save_pretrained(folder)
    tok.chat_template                            # a Hugging Face folder's Jinja chat template, or None

A Hugging Face folder's tokenizer_config.json names the special tokens (bos_token, eos_token,
pad_token: a string or an AddedToken mapping {"content": ...}) and may hold the chat template (or
chat_template.jinja beside it); tokens it does not name are found by their usual names.

Train a byte-level BPE on local text files (the `tokenizers` library does the work):

    python -m mmgpt_engine.data.tokenizer train --files a.txt b.txt --vocab-size 4096 --out tokenizer.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
# names under which common tokenizer.json files carry their special tokens, most specific first
_BOS_NAMES = ("<bos>", "<s>", "<|bos|>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|eos|>", "<|end_of_text|>", "[SEP]", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then bos, eos, pad. Decoding replaces invalid UTF-8."""

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
            parts, run = [], []
            for i in ids:
                if i in names:
                    parts.append(bytes(run).decode("utf-8", errors="replace") + names[i])
                    run = []
                else:
                    run.append(i)
            return "".join(parts) + bytes(run).decode("utf-8", errors="replace")
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CONFIG_NAME).write_text(json.dumps({"kind": self.kind}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with its bos/eos/pad ids: the tokens that
    `special_tokens` (tokenizer_config.json's bos_token, eos_token, pad_token) names, else found
    by their usual names (pad falls back to eos, as GPT-2's single <|endoftext|> serves all three)."""

    kind = "hf"

    def __init__(self, tokenizer, source: str = "<memory>", special_tokens: Optional[dict] = None,
                 chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.source = source
        named = {k: _token_content(v) for k, v in (special_tokens or {}).items()}
        self.bos_id = self._named("bos_token", named) if named.get("bos_token") else self._find("bos", _BOS_NAMES)
        self.eos_id = self._named("eos_token", named) if named.get("eos_token") else self._find("eos", _EOS_NAMES)
        if named.get("pad_token"):
            self.pad_id = self._named("pad_token", named)
        else:
            pad = [tokenizer.token_to_id(n) for n in _PAD_NAMES]
            self.pad_id = next((i for i in pad if i is not None), self.eos_id)
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path, config: Optional[dict] = None, chat_template: Optional[str] = None) -> "HFTokenizer":
        """tokenizer.json at `path`; `config`: its tokenizer_config.json, when there is one."""
        from tokenizers import Tokenizer

        config = config or {}
        template = config.get("chat_template", chat_template)
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default", next(iter(by_name.values()), None))
        special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(Tokenizer.from_file(str(path)), source=str(path), special_tokens=special, chat_template=template)

    def _named(self, key: str, named: dict) -> int:
        i = self.tokenizer.token_to_id(named[key])
        if i is None:
            raise ValueError(f"tokenizer: {CONFIG_NAME} names {key} {named[key]!r}, which {self.source} does not hold")
        return i

    def _find(self, what: str, names: Sequence[str]) -> int:
        for name in names:
            i = self.tokenizer.token_to_id(name)
            if i is not None:
                return i
        raise ValueError(f"tokenizer: expected a {what} special token (one of {list(names)}) in {self.source}, "
                         f"found none")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> Optional[int]:
        """The id of `token` in the vocabulary (added tokens included), or None."""
        return self.tokenizer.token_to_id(token)

    def add_special_token(self, token: str) -> int:
        """Make `token` a special token (matched whole before any splitting, skipped when decoding
        with skip_special_tokens) and return its id: its own when the vocabulary holds it, else
        the next free one (the llava-hf export adds "<image>" so)."""
        from tokenizers import AddedToken

        self.tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.token_to_id(token)

    def save_pretrained(self, directory) -> None:
        """tokenizer.json + a tokenizer_config.json that transformers reads too (special tokens, chat template)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(Path(directory) / TOKENIZER_NAME))
        config = {"kind": self.kind, "tokenizer_class": "PreTrainedTokenizerFast",
                  "bos_token": self.tokenizer.id_to_token(self.bos_id), "eos_token": self.tokenizer.id_to_token(self.eos_id),
                  "pad_token": self.tokenizer.id_to_token(self.pad_id)}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _token_content(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"tokenizer: expected a special token as a string or {{'content': ...}}, got {value!r}")
    return value


def word_tokenizer(words: Sequence[str], source: str = "words") -> HFTokenizer:
    """A word-level tokenizer over `words` (built in memory, no files): the special tokens, <unk>,
    then one id per word, in the order given. Text splits on whitespace; other words become <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL_TOKENS + ("<unk>",) + tuple(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocab: marks them skippable on decode
    return HFTokenizer(tok, source=source)


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's ids: its kind, vocabulary size and a hash of its definition.
    Two tokenizers with the same fingerprint map text to the same ids (checkpoints record it, so a
    run is not resumed with another tokenizer, which would train on meaningless ids)."""
    if isinstance(tokenizer, HFTokenizer):
        definition = tokenizer.tokenizer.to_str()
    else:
        definition = f"{tokenizer.kind}:{tokenizer.vocab_size}"
    return {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size),
            "sha256": hashlib.sha256(definition.encode()).hexdigest()[:16]}


def load_tokenizer(name_or_path: Optional[str | os.PathLike] = None):
    """None or "byte": the byte tokenizer. A tokenizer.json file, or a folder holding one or a
    tokenizer_config.json (what save_pretrained writes): that tokenizer. (`data.get_tokenizer`
    also knows the built-in datasets' word tokenizers by name.)"""
    if name_or_path is None or name_or_path == "byte":
        return ByteTokenizer()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected 'byte', a path or None, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.is_file():
        return HFTokenizer.from_file(path)
    if path.is_dir():
        if (path / TOKENIZER_NAME).is_file():
            config = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else {}
            template = (path / CHAT_TEMPLATE_NAME).read_text() if (path / CHAT_TEMPLATE_NAME).is_file() else None
            return HFTokenizer.from_file(path / TOKENIZER_NAME, config=config, chat_template=template)
        if (path / CONFIG_NAME).is_file():
            kind = json.loads((path / CONFIG_NAME).read_text()).get("kind")
            if kind == "byte":
                return ByteTokenizer()
            raise ValueError(f"name_or_path: {str(path / CONFIG_NAME)!r} names tokenizer kind {kind!r} "
                             f"but there is no {TOKENIZER_NAME} beside it")
        raise FileNotFoundError(f"name_or_path: expected {TOKENIZER_NAME} or {CONFIG_NAME} in folder {str(path)!r}")
    raise FileNotFoundError(f"name_or_path: expected a tokenizer.json file or a folder, got {str(path)!r} "
                            f"(no such file or folder)")


def train_bpe(files: Sequence[str], vocab_size: int, out: Optional[str] = None, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style: any text round-trips) with <bos>, <eos>, <pad>, trained on
    local text files. Returns an HFTokenizer; writes tokenizer.json to `out` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"files: expected existing text files, got {list(files)} (missing {missing})")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected >= {256 + len(SPECIAL_TOKENS)} (the byte alphabet and the special "
                         f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    return HFTokenizer(tok, source=str(out) if out else "<trained>")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgpt_engine.data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on local text files")
    train.add_argument("--files", nargs="+", required=True, help="text files to learn merges from")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. bytes and specials")
    train.add_argument("--out", required=True, help="where to write tokenizer.json")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge")
    args = parser.parse_args(argv)
    tok = train_bpe(args.files, args.vocab_size, args.out, args.min_frequency)
    print(f"wrote {args.out}: vocab_size {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
