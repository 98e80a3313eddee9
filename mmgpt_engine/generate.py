"""Caption an image with a trained model.

    python -m mmgpt_engine.generate --checkpoint runs/tiny --image cat.png [--prompt TEXT]
        [--max_new_tokens N] [--temperature T] [--top_k K] [--seed S] [--backend B] [--device D]

--checkpoint is a folder written by `MultimodalGPT.save_pretrained` (model.safetensors +
config.json + the tokenizer's files) or a training output folder holding such folders (the newest
is used). Greedy by default (temperature 0); prints one caption per image.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import ops
from .data import get_tokenizer, preprocess_image, trim_at_eos
from .model.gpt import MultimodalGPT
from .model.hub import CONFIG_NAME, find_pretrained_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmgpt_engine.generate", description="Caption images with a trained model.")
    p.add_argument("--checkpoint", required=True, help="save_pretrained folder, or a training output folder")
    p.add_argument("--image", required=True, nargs="+", help="image file(s) to caption")
    p.add_argument("--prompt", default=None, help="text the caption continues from (as in training)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: what fits in max_seq_len")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--backend", default=None, choices=list(ops.BACKENDS), help="ops backend (default: auto)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence at every step")
    return p


def caption_images(model, tokenizer, images: torch.Tensor, prompt: Optional[str] = None,
                   max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
                   use_cache: bool = True, generator: Optional[torch.Generator] = None) -> list[str]:
    """Captions for a batch of preprocessed images (N, C, S, S), decoded up to eos."""
    device = next(model.parameters()).device
    prefix = [tokenizer.bos_id] + (tokenizer.encode(prompt) if prompt else [])
    ids = torch.tensor([prefix] * images.shape[0], dtype=torch.long, device=device)
    if max_new_tokens is None:
        max_new_tokens = model.config.max_seq_len - model.config.n_image_tokens - len(prefix)
    out = model.generate(ids, images.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, eos_token_id=tokenizer.eos_id, use_cache=use_cache, generator=generator)
    return [tokenizer.decode(trim_at_eos(row, tokenizer.eos_id)).strip() for row in out[:, len(prefix):].tolist()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = find_pretrained_dir(args.checkpoint)
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer:
        print(f"note: no tokenizer files in {folder} ({CONFIG_NAME} only); using the byte tokenizer", file=sys.stderr)
    tokenizer = get_tokenizer(folder if has_tokenizer else None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MultimodalGPT.from_pretrained(folder, backend=args.backend).to(device).eval()
    c = model.config
    images = torch.stack([preprocess_image(path, c.image_size, c.in_channels) for path in args.image])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    captions = caption_images(model, tokenizer, images, args.prompt, args.max_new_tokens, args.temperature,
                              args.top_k, use_cache=not args.no_cache, generator=generator)
    for path, caption in zip(args.image, captions):
        print(f"{path}: {caption}" if len(args.image) > 1 else caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
