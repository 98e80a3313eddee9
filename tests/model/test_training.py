"""The tiny model learns on the built-in data in 100 single-process steps (torch backend): the loss
falls by a clear margin, and the held-out loss depends on the image (it is worse with the images
shuffled across the batch), so the model reads the picture, not only the caption grammar."""
import torch
from torch.utils.data import DataLoader

from mmgpt_engine.data import build_dataset, get_tokenizer, make_collate
from mmgpt_engine.model import ModelConfig, MultimodalGPT


def test_loss_falls_and_uses_the_image():  # one torch thread: tests/model/conftest.py
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    tok = get_tokenizer("shapes")
    model = MultimodalGPT(cfg, backend="torch")
    sizes = dict(image_size=cfg.image_size, in_channels=cfg.in_channels, max_text_len=cfg.max_text_len)
    train = build_dataset("shapes", split="train", tokenizer=tok, seed=0, **sizes)
    collate = make_collate(tok)
    loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    val = collate([build_dataset("shapes", split="val", tokenizer=tok, **sizes)[i] for i in range(64)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step, batch in zip(range(100), loader):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        loss = model(batch["input_ids"], batch["images"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 4.0 and last < 0.25 * first, (first, last)

    model.eval()
    with torch.no_grad():
        right = model(val["input_ids"], val["images"], val["labels"]).loss.item()
        wrong = model(val["input_ids"], val["images"].roll(1, dims=0), val["labels"]).loss.item()
    assert right < wrong - 0.05, (right, wrong)
