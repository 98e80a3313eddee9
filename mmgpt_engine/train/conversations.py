"""Conversation training (`data.kind: llava`): the datasets sized for the model, and the start-up
audit that reports what the loss will see and stops a run whose samples mostly cannot train.

LLaVA masks a sample whose turns do not tokenise as the template says, or that ends with nothing
to score, silently ("tokenization mismatch"; the loss sits at 0). Here every such sample is
counted by reason with a few ids (data/conversation.py, SKIP_REASONS), reported before the first
step and logged to metrics.jsonl, and more than `data.max_unscorable_fraction` of the audited
samples stops the run before training, naming the reasons.
"""
from __future__ import annotations

from typing import Optional

from ..data.chat import ChatTemplate, resolve_template
from ..data.image_processor import image_processor_for
from ..data.llava import LlavaConversations
from .config import ConfigError, TrainConfig

PRETRAINED_VISION = ("clip", "siglip")


def chat_template(cfg: TrainConfig, tokenizer) -> ChatTemplate:
    try:
        return resolve_template(cfg.data.chat_template, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def image_transform(cfg: TrainConfig, model_config):
    """A pretrained tower's own preprocessing (its preprocessor_config.json, from model.vision_from
    or the --init_from folder), else None: the datasets' resize to the model's image size."""
    if model_config.vision_type not in PRETRAINED_VISION:
        return None
    for folder in (cfg.model.get("vision_from"), cfg.run.init_from):
        processor = image_processor_for(folder) if folder else None
        if processor is not None:
            return processor
    raise ConfigError(f"model: the {model_config.vision_type} vision tower's preprocessor_config.json was not found "
                      f"in model.vision_from {cfg.model.get('vision_from')!r} or run.init_from {cfg.run.init_from!r}")


def conversation_datasets(cfg: TrainConfig, model_config, tokenizer) -> tuple[LlavaConversations,
                                                                             Optional[LlavaConversations]]:
    """(train, held-out or None): LLaVA conversations rendered with the run's chat template, each
    truncated to the model's sequence with its image tokens counted at full width."""
    d = cfg.data
    template = chat_template(cfg, tokenizer)
    common = dict(tokenizer=tokenizer, template=template, image_folder=d.image_folder,
                  image_size=model_config.image_size, in_channels=model_config.in_channels,
                  max_text_len=model_config.max_seq_len,
                  image_tokens=model_config.n_image_tokens if model_config.vision_type != "none" else 0,
                  seed=cfg.run.seed, image_transform=image_transform(cfg, model_config))
    val_path = d.val_path or (d.path if "{split}" in d.path else None)
    try:
        train = LlavaConversations(d.path.replace("{split}", "train"), **common)
        val = LlavaConversations(val_path.replace("{split}", "val"), **common) if val_path else None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from e
    return train, val


def audit(dataset: LlavaConversations, cfg: TrainConfig) -> tuple[dict, list[str]]:
    """Render `data.audit_samples` samples: (the counts, the lines to print). ConfigError when the
    unscorable share is over data.max_unscorable_fraction."""
    report = dataset.audit(cfg.data.audit_samples)
    n, skipped = report["samples"], sum(report["skipped"].values())
    share = skipped / n if n else 0.0
    lines = [f"data: {n} of {len(dataset)} samples audited ({dataset.template.name} template): {report['usable']} "
             f"train, {report['scored_tokens']} scored tokens, {report['truncated']} truncated, {skipped} "
             f"unscorable ({100 * share:.1f}%)"]
    for reason, count in sorted(report["skipped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {count} (e.g. ids {', '.join(report['examples'].get(reason, []))})")
    for note, count in sorted(report["notes"].items()):
        lines.append(f"  {note}: {count} (counted, not skipped)")
    if share > cfg.data.max_unscorable_fraction:
        worst = max(report["skipped"], key=report["skipped"].get)
        raise ConfigError(
            f"data.max_unscorable_fraction: {100 * share:.1f}% of the {n} audited samples cannot train (expected at "
            f"most {100 * cfg.data.max_unscorable_fraction:.1f}%); most often {worst} (e.g. ids "
            f"{', '.join(report['examples'].get(worst, []))}). Check data.chat_template against the tokenizer "
            f"(retokenize_mismatch), the image folder (missing_image) and max_seq_len (image_truncated):\n"
            + "\n".join(lines))
    return report, lines


def template_for_export(tokenizer, template: ChatTemplate) -> None:
    """The run's chat template goes out with its tokenizer, so generation and the next stage
    render conversations the same way."""
    if hasattr(tokenizer, "chat_template"):
        tokenizer.chat_template = template.source
