"""Does int8 × AdaLomo train as well as AdaLomo on float weights? (issue 22, until the quality benchmark exists)

    python benchmarks/bench_int8_quality.py [--seeds 0,1,2] [--steps 300] [--threads 2]

Runs the shipped CPU recipe ``tiny-llama-pydoc-adalomo`` (tiny Llama, CPython docs, fused AdaLomo, lr 3e-2, cosine)
through ``lowmem.trainer.train`` as ``lowmem train`` does, once per seed and variant:
    float32 AdaLomo            the recipe as shipped
    int8 AdaLomo               + model.weight_format=int8 (the fused native int8 update)
    int8 AdaLomo + head        + model.int8.include_head=true (the output head int8 too, loss chunked by 128)
    AdamW (standard)           update.strategy=standard update.rule=adamw update.lr=1e-3 (the reference optimizer)
Each seed changes the model's initialization and the data order. Prints the validation loss at the end (the recipe's
own held-out split) per run, the mean ± sd per variant and int8's ratio to float32 AdaLomo; appends rows to
benchmarks/results.csv. Finished runs (their metrics.jsonl) are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import append_rows, base_row

VARIANTS = {
    "float32 AdaLomo": [],
    "int8 AdaLomo": ["model.weight_format=int8"],
    # the head as int8 too, through the chunked loss's sliced int8 head as the 8B recipes would run it
    "int8 AdaLomo + head": ["model.weight_format=int8", "model.int8.include_head=true", "memory.loss_chunk_tokens=128"],
    "AdamW (standard)": ["update.strategy=standard", "update.rule=adamw", "update.lr=1e-3", "update.clip_grad_norm=1.0"],
}


def last_val_loss(output_dir: Path) -> float | None:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r and r.get("step", 0) > 0]
    return losses[-1] if losses else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench-int8-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lowmem.config import load_config
    from lowmem.trainer import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama-pydoc-adalomo.yaml"
    results: dict[str, list[float]] = {}
    for name, overrides in VARIANTS.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            output_dir = Path(args.out) / f"{name.split()[0].lower()}-{'-'.join(o.split('=')[1] for o in overrides)}-s{seed}"
            loss = last_val_loss(output_dir)
            if loss is None:
                config = load_config(recipe, [*overrides, f"train.seed={seed}", f"train.max_steps={args.steps}",
                                              f"checkpoint.output_dir={output_dir}", "checkpoint.save_every_n_steps=null"])
                train(config)
                loss = last_val_loss(output_dir)
            results.setdefault(name, []).append(loss)
            print(f"{name:<22} seed {seed}: val loss {loss:.4f}", flush=True)
    reference = statistics.mean(results["float32 AdaLomo"])
    rows = []
    print(f"\n{'variant':<22} {'val loss mean':>14} {'sd':>7} {'/ float32 AdaLomo':>18}")
    for name, losses in results.items():
        mean, sd = statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"{name:<22} {mean:14.4f} {sd:7.4f} {mean / reference:18.4f}")
        rows.append({**base_row("int8_quality"), "case": f"tiny-llama-pydoc {args.steps} steps, seeds {args.seeds}",
                     "provider": name, "note": f"val_loss {mean:.4f} ± {sd:.4f}"})
    append_rows(rows)


if __name__ == "__main__":
    main()
