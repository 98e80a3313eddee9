"""Export a trained model to another library's format.

    python -m mmgpt_engine.export --checkpoint runs/llava/export --format llava-hf --out llava-tiny-hf
        [--chat_template NAME] [--dtype float32|bfloat16|float16] [--overwrite]

--checkpoint is a folder written by `MultimodalGPT.save_pretrained` with its tokenizer (or a training
output folder holding such folders: the newest is used).

llava-hf: a folder that transformers loads with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` (a LlavaProcessor):
  config.json, model.safetensors   the model; what maps to what and what is refused: model/hf_export.py
  tokenizer.json,                  the checkpoint's tokenizer with "<image>" as a special token (added
  tokenizer_config.json            when it has none: the vocabulary then grows by one row), its chat
                                   template (or --chat_template's, a named one: plain, llava_v1, chatml)
  chat_template.jinja              the same template, for the processor (when there is one)
  preprocessor_config.json         the vision tower's image processor, which the checkpoint kept
  processor_config.json            LlavaProcessor's patch_size, vision_feature_select_strategy and
                                   num_additional_image_tokens: it widens one "<image>" into the
                                   model's image_seq_length tokens
  generation_config.json           bos / pad, and eos = the tokenizer's eos and the end-of-turn
                                   tokens it holds (data.conversation.stop_ids: <|im_end|>, ...)

Everything is written into a temporary folder beside --out and renamed into place when whole, so a
refused or failed export leaves nothing at --out (and an existing --out is replaced only with
--overwrite, once the new folder is complete).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data.chat import NAMED_TEMPLATES, ChatTemplate
from .data.conversation import stop_ids
from .data.image_processor import PREPROCESSOR_NAME, ImageProcessor
from .data.tokenizer import HFTokenizer, load_tokenizer
from .model.config import ModelConfig
from .model.hf_export import check_llava_exportable, write_llava
from .model.hub import CONFIG_NAME, WEIGHTS_NAME, find_pretrained_dir

FORMATS = ("llava-hf",)
IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of the checkpoint's floating-point tensors (read from the safetensors header)."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _tokenizer_of(folder: Path) -> HFTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"checkpoint: the llava-hf export needs the model's Hugging Face tokenizer (tokenizer.json, "
                         f"saved by save_pretrained(folder, tokenizer)) in {str(folder)!r}, found none")
    tokenizer = load_tokenizer(folder)
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"checkpoint: expected a Hugging Face tokenizer in {str(folder)!r}, got {tokenizer!r}")
    return tokenizer


def _processor_config(folder: Path, config: ModelConfig) -> dict:
    path = folder / PREPROCESSOR_NAME
    if not path.is_file():
        raise ValueError(f"checkpoint: the llava-hf export needs the vision tower's {PREPROCESSOR_NAME} in "
                         f"{str(folder)!r} (from_pretrained_towers keeps it; our own preprocess_image has no "
                         f"transformers equivalent), found none")
    size = ImageProcessor.from_pretrained(path).output_size
    if size != (config.image_size, config.image_size):
        raise ValueError(f"checkpoint: {str(path)!r} makes images of {size[0]} x {size[1]}, the model takes "
                         f"{config.image_size} x {config.image_size}")
    return json.loads(path.read_text())


def _write_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and removed after."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        if not overwrite:
            raise FileExistsError(f"out: {str(out)!r} exists; pass --overwrite (overwrite=True) to replace it")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export_llava_hf(checkpoint, out, *, chat_template: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    overwrite: bool = False) -> dict:
    """Write the llava-hf folder `out` (module docstring); returns a summary of what was written.
    chat_template: a named template to write instead of the tokenizer's own; dtype: of the weights
    (default: the checkpoint's)."""
    from .model.gpt import MultimodalGPT

    folder, out = find_pretrained_dir(checkpoint), Path(out)
    config = ModelConfig.from_json(folder / CONFIG_NAME)
    check_llava_exportable(config)                 # before any weight is read
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {str(out)!r} exists; pass --overwrite (overwrite=True) to replace it")
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    tokenizer = _tokenizer_of(folder)
    processor = _processor_config(folder, config)
    if chat_template is not None:
        tokenizer.chat_template = ChatTemplate.named(chat_template).source
    template = ChatTemplate(tokenizer.chat_template) if tokenizer.chat_template else None
    added = tokenizer.token_id(IMAGE_TOKEN) is None
    image_token_id = tokenizer.add_special_token(IMAGE_TOKEN)
    dtype = dtype or stored_dtype(folder)

    model = MultimodalGPT.from_pretrained(folder, backend="torch").eval()
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    eos = stop_ids(tokenizer)  # eos + end-of-turn tokens
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_llava(model, tmp, image_token_id, dtype=dtype, token_ids=ids)
        hf = json.loads((tmp / CONFIG_NAME).read_text())
        tokenizer.save_pretrained(tmp)
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template.source)
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(processor, indent=2) + "\n")
        (tmp / "processor_config.json").write_text(json.dumps({
            "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": config.patch_size,
            "vision_feature_select_strategy": hf["vision_feature_select_strategy"],
            # CLIP's class token is among the tokens the processor counts; "default" then drops it
            "num_additional_image_tokens": 1 if config.vision_type == "clip" else 0}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
            "eos_token_id": eos if len(eos) > 1 else eos[0]}, indent=2) + "\n")
        _write_folder(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "text": hf["text_config"]["model_type"], "vision": hf["vision_config"]["model_type"],
            "image_token_id": image_token_id, "image_token_added": added, "vocab_size": hf["text_config"]["vocab_size"],
            "image_seq_length": hf["image_seq_length"], "dtype": hf["dtype"], "chat_template": template is not None,
            "eos_token_id": eos}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmgpt_engine.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="save_pretrained folder (with its tokenizer), or a training "
                                                       "output folder")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="llava-hf: transformers' LlavaForConditionalGeneration")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--chat_template", default=None, choices=sorted(NAMED_TEMPLATES),
                   help="write this named template (default: the tokenizer's own, if any)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export_llava_hf(args.checkpoint, args.out, chat_template=args.chat_template,
                                  dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # a refusal: its message says it all
        print(f"error: {e}", file=sys.stderr)
        return 2
    added = " (added: the vocabulary grew by one zero row)" if summary["image_token_added"] else ""
    print(f"wrote {summary['out']}: LlavaForConditionalGeneration, {summary['text']} + {summary['vision']}, "
          f"{summary['dtype']}, {IMAGE_TOKEN} id {summary['image_token_id']}{added} widened to "
          f"{summary['image_seq_length']} tokens by the processor"
          + ("" if summary["chat_template"] else "; no chat template (pass --chat_template to write one)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
