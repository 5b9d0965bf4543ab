"""Causal-LM loss as a sum over label tokens, so the loop can normalize by the label tokens of a whole
optimizer step: accumulating micro-batches then equals one large batch exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowmem.data import IGNORE


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted: label positions 1.. (position 0 has no preceding context) not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the label tokens of ``batch`` (float32 scalar)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``batches``."""
    was_training = model.training
    model.eval()
    total, tokens = None, 0
    for batch in batches:
        tokens += count_label_tokens(batch)  # on the host batch
        batch = {k: v.to(device) for k, v in batch.items()}
        summed = loss_sum(model, batch)
        total = summed if total is None else total + summed  # summed on the device, read once at the end
    model.train(was_training)
    if tokens == 0 or total is None:
        return {}
    loss = float(total) / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
