"""Chat formatting: conversations rendered with a jinja2 chat template (a text tower's own, or a
named one) and cut into segments that say which characters the loss scores.

    template = ChatTemplate.named("chatml")                  # or ChatTemplate(tokenizer_chat_template)
    text = template.render(messages, special_tokens, add_generation_prompt=True)   # a prompt to complete
    pieces = template.segments(messages, special_tokens)     # [(text, scored), ...], joined == render()

Templates are rendered the way transformers renders them (a sandboxed jinja2 environment with
trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that does not escape HTML; the
special tokens as `bos_token`, `eos_token`, ... variables), so a tower's own template gives the
same string here as `tokenizer.apply_chat_template(messages, tokenize=False)`.

What is scored: for each assistant turn i, the text between the prompt that asks for it
(messages[:i] with add_generation_prompt=True) and the rendering that includes it (messages[:i+1]),
without trailing whitespace: the reply and its end-of-turn token(s), never the header that
introduces the reply. A template whose renderings are not prefixes of each other (one that
rewrites earlier turns, say) cannot be segmented this way and is refused with the turn named.

Named templates:
    plain     stage-1 alignment (LLaVA's `plain`): the user turn contributes only its `<image>`,
              the reply follows directly, then eos
    llava_v1  LLaVA-1.5's Vicuna v1 format: "SYSTEM USER: ... ASSISTANT: ...</s>USER: ..."
    chatml    "<|im_start|>role\\ncontent<|im_end|>\\n" (Qwen2, SmolLM2 and others)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")

NAMED_TEMPLATES = {
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% elif message['role'] == 'user' and '<image>' in message['content'] %}<image>{% endif %}"
        "{% endfor %}"
    ),
    "llava_v1": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}" + LLAVA_SYSTEM + "{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %} USER: {{ message['content'] }}"
        "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


class ChatTemplateError(ValueError):
    """A template that cannot render or segment a conversation; the message names the turn."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    source: str                    # the jinja2 text
    name: str = "custom"

    @classmethod
    def named(cls, name: str) -> "ChatTemplate":
        if name not in NAMED_TEMPLATES:
            raise ValueError(f"chat template: expected one of {sorted(NAMED_TEMPLATES)} or a tokenizer's own "
                             f"template ('tokenizer'), got {name!r}")
        return cls(NAMED_TEMPLATES[name], name)

    @classmethod
    def from_folder(cls, folder) -> Optional["ChatTemplate"]:
        """A tokenizer folder's own template: `chat_template.jinja` (what transformers 5 writes) or
        the `chat_template` entry of tokenizer_config.json; None when it has neither."""
        folder = Path(folder)
        if (folder / "chat_template.jinja").is_file():
            return cls((folder / "chat_template.jinja").read_text(), f"{folder.name}/chat_template.jinja")
        config = folder / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text()).get("chat_template")
            if isinstance(template, list):  # named variants: the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                return cls(template, f"{folder.name}/tokenizer_config.json")
        return None

    def render(self, messages: Sequence[dict], special_tokens: Optional[dict] = None,
               add_generation_prompt: bool = False) -> str:
        check_messages(messages)
        try:
            return _compile(self.source).render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt,
                                                **(special_tokens or {}))
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from e

    def segments(self, messages: Sequence[dict], special_tokens: Optional[dict] = None) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, scored) pieces in order (see the module docstring)."""
        full = self.render(messages, special_tokens)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], special_tokens, add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1], special_tokens)
            if not upto.startswith(prompt) or not full.startswith(upto):
                raise ChatTemplateError(f"chat template {self.name}: the rendering of turns 0..{i} does not extend "
                                        f"the prompt for turn {i} (the template rewrites earlier turns), so the "
                                        f"reply's tokens cannot be told apart")
            reply = upto[len(prompt):]
            spans.append((len(prompt), len(prompt) + len(reply.rstrip())))
        pieces, at = [], 0
        for lo, hi in spans:
            if lo > at:
                pieces.append((full[at:lo], False))
            if hi > lo:
                pieces.append((full[lo:hi], True))
            at = max(at, hi)
        if at < len(full):
            pieces.append((full[at:], False))
        return pieces


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}")


def resolve_template(name: Optional[str], tokenizer=None) -> ChatTemplate:
    """`name` a named template; "tokenizer" (or None) the tokenizer's own: `tokenizer` a loaded
    tokenizer with a `chat_template`, or a tokenizer folder."""
    if name not in (None, "tokenizer"):
        return ChatTemplate.named(name)
    if isinstance(tokenizer, (str, Path)):
        own = ChatTemplate.from_folder(tokenizer)
        where = f"in {str(tokenizer)!r}"
    else:
        source = getattr(tokenizer, "chat_template", None)
        own = ChatTemplate(source, f"{getattr(tokenizer, 'source', 'tokenizer')}") if source else None
        where = f"in the tokenizer {tokenizer!r}" if tokenizer is not None else "(no tokenizer)"
    if own is None:
        raise ValueError(f"data.chat_template: the tokenizer's own template was asked for, but there is none {where} "
                         f"(no chat_template.jinja or tokenizer_config.json chat_template); name one of "
                         f"{sorted(NAMED_TEMPLATES)}")
    return own
