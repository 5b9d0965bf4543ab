"""lowmem inside HF Trainer: the Trainer's loop, data, scheduler, logging and checkpoints; lowmem's fused AdaLomo
update (no gradient is kept) and loss. A tiny Llama on the CPython docs, CPU, a few seconds.

    python examples/hf_trainer.py [--steps 40] [--out outputs/hf-trainer]

Prints one JSON line last: {"loss_first": ..., "loss_last": ...}.
"""

import argparse
import json

from transformers import TrainingArguments

import lowmem
from lowmem.assets import pydoc_texts
from lowmem.hf import LowmemTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="outputs/hf-trainer")
    args = parser.parse_args()

    model = lowmem.load_model("lowmem:tiny-llama", device="cpu")
    tokenizer = lowmem.load_tokenizer("lowmem:tiny-llama")
    encoded = tokenizer(pydoc_texts()[:64], truncation=True, max_length=128, padding="max_length")
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]

    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=3e-2, lr_scheduler_type="cosine", max_grad_norm=0, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = LowmemTrainer(model=model, args=training, train_dataset=rows, processing_class=tokenizer,
                            update={"rule": "adalomo", "strategy": "fused"})
    trainer.train()
    trainer.save_model(f"{args.out}/final")  # an HF folder: from_pretrained loads it
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"loss_first": losses[0], "loss_last": losses[-1]}))


if __name__ == "__main__":
    main()
