"""Conversations as model inputs: LLaVA records -> messages -> (input_ids, labels) through a chat
template, with the loss on the assistant's replies only.

    messages, n_images, notes = llava_messages(record)                  # raises SkipSample
    enc = encode_conversation(tok, template, messages, n_images=1, image_tokens=576, max_len=2048)
    enc.input_ids, enc.labels                                            # IMAGE_TOKEN_ID where the image goes

The image: `<image>` in the text marks where the image's tokens stand; input_ids carries one
IMAGE_TOKEN_ID there (labels IGNORE_INDEX), which the model widens to its image tokens. A
sample with an image but no `<image>` gets one at the start of its first user turn, as LLaVA
does (counted: `notes`); `<image>` without an image, or more of them than images, is skipped.

Each rendered piece is tokenised on its own (so the labels follow the template's turns exactly)
and the pieces between images must tokenise to the same ids as the whole text between them
does: otherwise the model would train on ids it never sees at inference (where a prompt is
tokenised whole), and the sample is skipped as `retokenize_mismatch` (LLaVA masks such samples
silently, "tokenization mismatch"). Truncation to `max_len` (image tokens counted at their full
width) shortens the text from the end; it never cuts through the image: a sample whose image
would not fit is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..ops import IGNORE_INDEX
from ..tokens import IMAGE_TOKEN_ID
from .chat import IMAGE_MARKER, ChatTemplate

_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipSample(ValueError):
    """A sample that cannot train; `reason` is one of the counted reasons (see SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


SKIP_REASONS = ("unreadable_record", "unknown_role", "ends_with_user", "image_marker_without_image",
                "more_markers_than_images", "missing_image", "undecodable_image", "image_truncated",
                "retokenize_mismatch", "no_scored_tokens")


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    scored: int                      # labels that are not IGNORE_INDEX
    truncated: bool = False          # text was cut to fit max_len
    notes: list[str] = field(default_factory=list)


def llava_messages(record: dict, has_image: Optional[bool] = None) -> tuple[list[dict], int, list[str]]:
    """(messages, number of images, notes) from a LLaVA record {"id", "image"?, "conversations":
    [{"from": "human"|"gpt"|..., "value": str}]}; has_image overrides whether the record has one."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise SkipSample("unreadable_record", "expected a non-empty 'conversations' list")
    n_images = int(bool(record.get("image"))) if has_image is None else int(has_image)
    messages, notes = [], []
    for i, turn in enumerate(turns):
        role = _ROLE_NAMES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise SkipSample("unknown_role", f"turn {i} is from {turn.get('from') if isinstance(turn, dict) else turn!r}")
        if not isinstance(turn.get("value"), str):
            raise SkipSample("unreadable_record", f"turn {i} has no text 'value'")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise SkipSample("ends_with_user", "the last turn is not the assistant's, so nothing would be scored after it")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers and not n_images:
        raise SkipSample("image_marker_without_image", f"{markers} {IMAGE_MARKER} in a sample without an image")
    if markers > n_images:
        raise SkipSample("more_markers_than_images", f"{markers} {IMAGE_MARKER} for {n_images} image(s)")
    if n_images and not markers:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise SkipSample("unreadable_record", "an image but no user turn to place it in")
        first["content"] = f"{IMAGE_MARKER}\n{first['content']}"
        notes.append("image_marker_added")
    return messages, n_images, notes


def special_tokens_of(tokenizer) -> dict:
    """The template variables for the tokenizer's special tokens (bos_token, eos_token, pad_token),
    each checked to encode to its own single id: a template's end-of-turn token must be one token,
    or the model could never emit it."""
    known = getattr(tokenizer, "special_tokens_map", None)
    if isinstance(known, dict) and known:
        out = {k: v for k, v in known.items() if isinstance(v, str)}
    else:
        inner = getattr(tokenizer, "tokenizer", None)  # a `tokenizers.Tokenizer`
        if inner is None or not hasattr(inner, "id_to_token"):
            raise ValueError(f"tokenizer: expected a tokenizer with named special tokens (a tokenizer.json) for chat "
                             f"templates, got {tokenizer!r}")
        out = {f"{n}_token": inner.id_to_token(getattr(tokenizer, f"{n}_id")) for n in ("bos", "eos", "pad")}
    for name, text in out.items():
        if len(tokenizer.encode(text)) != 1:
            raise ValueError(f"tokenizer: its {name} {text!r} does not encode to one id (got "
                             f"{tokenizer.encode(text)}), so a chat template cannot use it")
    return out


def encode_conversation(tokenizer, template: ChatTemplate, messages: Sequence[dict], *, n_images: int = 0,
                        image_tokens: int = 0, max_len: Optional[int] = None,
                        special_tokens: Optional[dict] = None) -> EncodedConversation:
    """Token ids and labels of a conversation (see the module docstring); raises SkipSample."""
    special = special_tokens_of(tokenizer) if special_tokens is None else special_tokens
    pieces = template.segments(messages, special)
    ids, labels = [], []
    run_text, run_ids = "", []             # the text since the last image, and its pieces' ids

    def close_run():
        if run_text and tokenizer.encode(run_text) != run_ids:
            raise SkipSample("retokenize_mismatch", f"{template.name}: the turns tokenised one by one give other ids "
                                                    f"than the whole text {run_text[:60]!r}...")

    markers = 0
    for text, scored in pieces:
        parts = text.split(IMAGE_MARKER)
        for j, part in enumerate(parts):
            if j:  # an image marker stood before this part
                close_run()
                run_text, run_ids = "", []
                ids.append(IMAGE_TOKEN_ID)
                labels.append(IGNORE_INDEX)
                markers += 1
            if part:
                part_ids = tokenizer.encode(part)
                ids += part_ids
                labels += part_ids if scored else [IGNORE_INDEX] * len(part_ids)
                run_text += part
                run_ids += part_ids
    close_run()
    if markers != n_images:
        reason = "more_markers_than_images" if markers > n_images else "image_marker_without_image"
        raise SkipSample(reason, f"the rendered conversation holds {markers} {IMAGE_MARKER} for {n_images} image(s)")
    truncated = False
    if max_len is not None:
        width = len(ids) + markers * (image_tokens - 1)
        if width > max_len:
            if markers:
                image_end = ids.index(IMAGE_TOKEN_ID) + image_tokens
                if image_end > max_len:
                    raise SkipSample("image_truncated", f"the image's {image_tokens} tokens end at position "
                                                        f"{image_end}, past max_len {max_len}")
            keep = len(ids) - (width - max_len)
            ids, labels, truncated = ids[:keep], labels[:keep], True
    scored = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # the model never scores position 0
    if scored == 0:
        raise SkipSample("no_scored_tokens", "no assistant token left to score" + (" after truncation" if truncated else ""))
    return EncodedConversation(ids, labels, scored, truncated)


def encode_prompt(tokenizer, template: ChatTemplate, messages: Sequence[dict], *,
                  special_tokens: Optional[dict] = None) -> list[int]:
    """The ids that ask for the next assistant reply: `messages` rendered with the generation
    prompt, one IMAGE_TOKEN_ID per `<image>`, the text between images tokenised whole (as a
    conversation's pieces must also tokenise, see encode_conversation)."""
    special = special_tokens_of(tokenizer) if special_tokens is None else special_tokens
    text = template.render(messages, special, add_generation_prompt=True)
    ids = []
    for j, part in enumerate(text.split(IMAGE_MARKER)):
        if j:
            ids.append(IMAGE_TOKEN_ID)
        if part:
            ids += tokenizer.encode(part)
    return ids


def stop_ids(tokenizer) -> list[int]:
    """Ids that end a generated reply: eos first, then the end-of-turn tokens chat templates use."""
    ids = [tokenizer.eos_id]
    inner = getattr(tokenizer, "tokenizer", None)
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        i = inner.token_to_id(name) if inner is not None and hasattr(inner, "token_to_id") else None
        if i is not None and i not in ids:
            ids.append(i)
    return ids
