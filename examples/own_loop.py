"""lowmem inside your own training loop: fused AdaLomo (the update runs inside backward, no gradient is kept) on a
tiny Llama, with your data, your batching and your schedule. CPU, a few seconds.

    python examples/own_loop.py [--steps 40] [--out outputs/own-loop]

Prints one JSON line last: {"loss_first": ..., "loss_last": ...}.
"""

import argparse
import json

import torch

import lowmem
from lowmem.assets import pydoc_texts  # any list of strings will do


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="outputs/own-loop")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = lowmem.load_model("lowmem:tiny-llama", dtype="float32")
    tokenizer = lowmem.load_tokenizer("lowmem:tiny-llama")
    update = lowmem.Update(model, rule="adalomo", strategy="fused", lr=3e-2, clip_grad_norm=None)

    texts = pydoc_texts()[:64]
    encoded = tokenizer(texts, truncation=True, max_length=128, padding="max_length", return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)  # padding is not trained on

    losses = []
    for step in range(args.steps):
        rows = torch.randint(0, len(texts), (8,))
        batch = {"input_ids": encoded["input_ids"][rows], "attention_mask": encoded["attention_mask"][rows],
                 "labels": labels[rows]}
        update.set_lr(3e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / args.steps))).item())  # cosine
        loss = lowmem.lm_loss(model, batch)  # mean over label tokens; chunked for large vocabularies
        update.backward(loss)  # fused: each weight is updated as its gradient completes
        update.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    lowmem.save_pretrained(model, args.out, tokenizer)  # an HF folder: from_pretrained loads it
    print(json.dumps({"loss_first": losses[0], "loss_last": losses[-1]}))


if __name__ == "__main__":
    main()
