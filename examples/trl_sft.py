"""lowmem inside TRL's SFTTrainer: TRL's data handling (prompt-completion rows, completion-only loss) and loop;
lowmem's fused AdaLomo update and loss. A tiny Llama on the stdlib docstring task, CPU, a few seconds. Needs TRL
(pip install trl).

    python examples/trl_sft.py [--steps 40] [--out outputs/trl-sft]

Prints one JSON line last: {"loss_first": ..., "loss_last": ...}.
"""

import argparse
import json

from datasets import Dataset
from trl import SFTConfig

import lowmem
from lowmem.assets import stdlib_dataset
from lowmem.hf import sft_trainer_class


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="outputs/trl-sft")
    args = parser.parse_args()

    model = lowmem.load_model("lowmem:tiny-llama", device="cpu")
    tokenizer = lowmem.load_tokenizer("lowmem:tiny-llama")
    rows = [json.loads(line) for line in open(stdlib_dataset() / "docstrings.jsonl")][:512]
    data = Dataset.from_list([{"prompt": f"{row['input']}\n# summary: ", "completion": row["output"]} for row in rows])

    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-2,
                       lr_scheduler_type="cosine", max_grad_norm=0, max_length=256, logging_steps=1,
                       save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0)  # float32 on a CPU
    trainer = sft_trainer_class()(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                  update={"rule": "adalomo", "strategy": "fused"})
    trainer.train()
    trainer.save_model(f"{args.out}/final")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"loss_first": losses[0], "loss_last": losses[-1]}))


if __name__ == "__main__":
    main()
