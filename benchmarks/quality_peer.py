"""A peer optimizer in the plain loop (backward, clip, step) on a lowmem recipe's model, data, order, schedule and
evaluation: what ``lowmem train RECIPE OVERRIDES`` runs, with the update swapped for the peer's. Used by
bench_quality.py for the peers that run on a CPU; writes ``metrics.jsonl`` with the trainer's fields and
``final/`` (an HF folder) in ``checkpoint.output_dir``.

    python benchmarks/quality_peer.py PEER RECIPE [a.b=value ...]      PEER: bnb-adamw8bit
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def bnb_adamw8bit(params, update):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=update.lr, betas=(update.beta1, update.beta2), eps=update.eps,
                               weight_decay=update.weight_decay)


PEERS = {"bnb-adamw8bit": bnb_adamw8bit}


def main(peer: str, recipe: str, overrides: list[str]) -> None:
    from lowmem import checkpoint as ckpt
    from lowmem.config import load_config
    from lowmem.data import BatchStream, build_datasets, eval_batches
    from lowmem.activations.loss import count_label_tokens, evaluate, loss_sum
    from lowmem.metrics import MetricsLog, peak_memory_record
    from lowmem.model import load_model, load_tokenizer
    from lowmem.schedule import learning_rate

    config = load_config(recipe, overrides)
    train = config.train
    torch.manual_seed(train.seed)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(config.model.path)
    model = load_model(config.model.path, config.model.dtype, device, config.model.gradient_checkpointing, None,
                       train.seed)
    data = build_datasets(config.data, tokenizer, train.seed)
    stream = BatchStream(data.train, train.batch_size, train.seed, tokenizer.pad_token_id)
    optimizer = PEERS[peer]([p for p in model.parameters() if p.requires_grad], config.update)
    output_dir = Path(config.checkpoint.output_dir)
    metrics = MetricsLog(output_dir / "metrics.jsonl")

    def validate() -> dict:
        return evaluate(model, eval_batches(data.val, train.batch_size, tokenizer.pad_token_id, train.eval_max_batches),
                        device)

    metrics.write({"step": 0, **validate()})
    steps, tokens, start = train.max_steps, 0, time.perf_counter()
    for step in range(steps):
        lr = learning_rate(step, config.update.lr, steps, train.warmup_ratio, train.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [stream.next() for _ in range(train.gradient_accumulation_steps)]
        label_tokens = sum(count_label_tokens(b) for b in batches)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss = loss_sum(model, batch) / max(label_tokens, 1)
            loss.backward()
            step_loss += loss.item()
        if config.update.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.update.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        evaluate_now = (train.eval_every_n_steps and done % train.eval_every_n_steps == 0) or done == steps
        if done % config.log.every_n_steps == 0 or evaluate_now:
            record = {"step": done, "loss": step_loss, "lr": lr,
                      "tokens_per_s": tokens / (time.perf_counter() - start), **peak_memory_record(device)}
            if evaluate_now:
                record.update(validate())
            metrics.write(record)
            tokens, start = 0, time.perf_counter()
    ckpt.export_final(output_dir, model, tokenizer)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in PEERS:
        raise SystemExit(f"usage: quality_peer.py PEER RECIPE [a.b=value ...]  (PEER: {', '.join(PEERS)})")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
