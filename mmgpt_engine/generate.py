"""Caption an image, or answer a question about it, with a trained model.

    python -m mmgpt_engine.generate --checkpoint runs/tiny --image cat.png [--prompt TEXT]
        [--chat_template NAME|none] [--max_new_tokens N] [--temperature T] [--top_k K] [--seed S]
        [--backend B] [--device D]

--checkpoint is a folder written by `MultimodalGPT.save_pretrained` (model.safetensors +
config.json + the tokenizer's files) or a training output folder holding such folders (the newest
is used). Greedy by default (temperature 0); prints one line per image.

Chat, when the folder's tokenizer has a chat template (or --chat_template names one): --prompt is
the user's turn. [{"role": "user", "content": "<image>\\n" + prompt}] is rendered with the
generation prompt (no --prompt: the image alone), the image's tokens stand where `<image>` does,
and the reply runs until the tokenizer's eos or an end-of-turn token (<|im_end|>, ...: see
data.conversation.stop_ids). Captioning, without a template (or with --chat_template none):
[bos] + prompt, continued up to eos, as the caption training does.

Images go through the folder's preprocessor_config.json (a pretrained tower's own processing,
kept by save_pretrained) when it has one, else `preprocess_image` (resize, crop, [-1, 1]).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import ops
from .data import get_tokenizer, image_processor_for, preprocess_image, trim_at_eos
from .data.chat import IMAGE_MARKER, NAMED_TEMPLATES, ChatTemplate, resolve_template
from .data.conversation import encode_prompt, stop_ids
from .model.generation import fused_length
from .model.gpt import MultimodalGPT
from .model.hub import CONFIG_NAME, find_pretrained_dir
from .tokens import IMAGE_TOKEN_ID


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmgpt_engine.generate",
                                description="Caption images, or answer a question about them, with a trained model.")
    p.add_argument("--checkpoint", required=True, help="save_pretrained folder, or a training output folder")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--prompt", default=None, help="chat: the user's question; captions: the text the caption "
                                                  "continues from (as in training)")
    p.add_argument("--chat_template", default=None, choices=sorted(NAMED_TEMPLATES) + ["none"],
                   help="default: the tokenizer's own template (chat), captions when it has none; "
                        "'none': captions")
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


def chat_prompt_ids(tokenizer, template: ChatTemplate, prompt: Optional[str]) -> list[int]:
    """The ids of one user turn holding the image and `prompt`, ready for the assistant's reply."""
    content = f"{IMAGE_MARKER}\n{prompt}" if prompt else IMAGE_MARKER
    ids = encode_prompt(tokenizer, template, [{"role": "user", "content": content}])
    if ids.count(IMAGE_TOKEN_ID) != 1:  # a template that drops or repeats the user's content
        raise ValueError(f"chat_template: {template.name} renders the user turn with {ids.count(IMAGE_TOKEN_ID)} "
                         f"{IMAGE_MARKER} markers, expected 1")
    return ids


def chat_replies(model, tokenizer, template: ChatTemplate, images: torch.Tensor, prompt: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None) -> list[str]:
    """The assistant's reply to `prompt` about each of the images (N, C, S, S): generation stops at
    eos or an end-of-turn token, the reply is decoded up to it."""
    device = next(model.parameters()).device
    prefix = chat_prompt_ids(tokenizer, template, prompt)
    ids = torch.tensor([prefix] * images.shape[0], dtype=torch.long, device=device)
    stops = stop_ids(tokenizer)
    images = images.to(device)
    if max_new_tokens is None:
        max_new_tokens = model.config.max_seq_len - fused_length(model, ids, images)
    out = model.generate(ids, images, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, eos_token_id=stops, use_cache=use_cache, generator=generator)
    return [tokenizer.decode(trim_at_eos(row, stops)).strip() for row in out[:, len(prefix):].tolist()]


def chat_template_of(tokenizer, name: Optional[str]) -> Optional[ChatTemplate]:
    """The template chat mode uses: `name` a named one, "none" none, None the tokenizer's own (if any)."""
    if name == "none" or (name is None and not getattr(tokenizer, "chat_template", None)):
        return None
    return resolve_template(name, tokenizer)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = find_pretrained_dir(args.checkpoint)
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer:
        print(f"note: no tokenizer files in {folder} ({CONFIG_NAME} only); using the byte tokenizer", file=sys.stderr)
    tokenizer = get_tokenizer(folder if has_tokenizer else None)
    template = chat_template_of(tokenizer, args.chat_template)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MultimodalGPT.from_pretrained(folder, backend=args.backend).to(device).eval()
    c = model.config
    processor = image_processor_for(folder)
    images = torch.stack([preprocess_image(path, c.image_size, c.in_channels, processor=processor)
                          for path in args.image])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   use_cache=not args.no_cache, generator=generator)
    if template is None:
        texts = caption_images(model, tokenizer, images, args.prompt, **options)
    else:
        texts = chat_replies(model, tokenizer, template, images, args.prompt, **options)
    for path, text in zip(args.image, texts):
        print(f"{path}: {text}" if len(args.image) > 1 else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
