"""Tiny Hugging Face towers for the built-in vision-language demo (`make train-vlm`), made here
instead of downloaded: a Llama-family language model (SmolLM2's shape, scaled down) with a
word-level tokenizer over the built-in conversations and a ChatML template, and a CLIP vision
tower with its image processor. The weights are random (transformers' own initialisation); the
folders have the layout of real ones, so the run goes through the same loaders, tokenizer and
processor paths as a real LLaVA recipe does.

    python -m mmgpt_engine.train.demo_towers --out runs/vlm/towers    # writes text/ and vision/
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional, Sequence

from ..data.chat import NAMED_TEMPLATES
from ..data.shapes_chat import all_texts

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<image>"]
ROLE_WORDS = ["system", "user", "assistant"]


def build_tokenizer(out: Path):
    """A word-level tokenizer (words and punctuation) over every text the demo data holds, with
    ChatML's special tokens and `<image>`, saved with transformers (tokenizer.json and
    tokenizer_config.json with the chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in all_texts() for w in re.findall(r"\w+|[^\w\s]", t)} | set(ROLE_WORDS))
    vocab = {t: i for i, t in enumerate(SPECIALS + ["<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = NAMED_TEMPLATES["chatml"]
    hf.save_pretrained(out)
    return hf


def build(out, image_size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Write `out`/text and `out`/vision; returns both folders."""
    import torch
    import transformers

    out = Path(out)
    text_dir, vision_dir = out / "text", out / "vision"
    torch.manual_seed(seed)
    tok = build_tokenizer(text_dir)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=128, rope_theta=1e5, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    lm.save_pretrained(text_dir)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2, image_size=image_size,
        patch_size=8))
    clip.save_pretrained(vision_dir)
    transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size}).save_pretrained(vision_dir)
    return text_dir, vision_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgpt_engine.train.demo_towers", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for text/ and vision/")
    p.add_argument("--image_size", type=int, default=32)
    args = p.parse_args(argv)
    text_dir, vision_dir = build(args.out, args.image_size)
    print(f"wrote {text_dir} (language model + tokenizer) and {vision_dir} (vision tower + image processor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
