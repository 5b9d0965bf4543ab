"""PERP on the tiny Llama (3.3M parameters, the CPython docs), on CPU: does retraining a tiny subset after pruning
recover most of what retraining everything recovers?

    python benchmarks/bench_perp.py [--dense-steps 600] [--steps 100] [--threads 2] [--out DIR]

1. Dense: recipes/tiny-llama-pydoc.yaml trained for ``--dense-steps`` (the demo runs 300).
2. Pruned: 50% unstructured and 2:4, by magnitude and by wanda (16 calibration batches of 8 × 256 tokens).
3. Retrained for ``--steps`` steps (same data, batch and schedule) with update.trainable norms, mask_lora (rank 16,
   alpha 32) and all (the mask held), each at its own learning rate (``LR``; PERP also tunes it per method).
Each retraining is one ``lowmem train`` run (prune → retrain → export); its first evaluation is the pruned model's.
Reported: held-out perplexity (the recipe's validation split, 10% of the rows), the share of the pruning loss
recovered ((loss_pruned − loss_retrained) / (loss_pruned − loss_dense), in log-perplexity), the trainable fraction,
the rule state, the process's peak RSS and the wall time. Rows go to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, base_row  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-llama-pydoc.yaml"
COMMON = ["data.val_fraction=0.1", "train.eval_every_n_steps=null", "train.eval_max_batches=null",
          "checkpoint.save_every_n_steps=null", "checkpoint.resume=never", "log.progress=false", "log.every_n_steps=10"]
PRUNINGS = [("magnitude", "unstructured"), ("magnitude", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4")]
SUBSETS = ["norms", "mask_lora", "all"]
LR = {"norms": 3e-3, "mask_lora": 1e-3, "all": 3e-4}


def run(out: Path, threads: int, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", str(RECIPE), *COMMON,
                           f"checkpoint.output_dir={out}", *overrides], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lowmem train {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "tokens_per_s" in r]
    return {"seconds": seconds, "first": evals[0], "last": evals[-1], "head": records[0],
            "state_bytes": max((r.get("state_bytes", 0) for r in steps), default=0),
            "peak_bytes": max(r["peak_mem_bytes"] for r in steps),
            "tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-perp-"))
    dense_dir = out / "dense"
    if not (dense_dir / "final").is_dir():
        dense = run(dense_dir, args.threads, f"train.max_steps={args.dense_steps}")
        (dense_dir / "bench.json").write_text(json.dumps(dense))
    dense = json.loads((dense_dir / "bench.json").read_text())
    dense_loss, dense_ppl = dense["last"]["val_loss"], dense["last"]["val_ppl"]
    print(f"dense ({args.dense_steps} steps): val ppl {dense_ppl:.2f} in {dense['seconds']:.0f} s", flush=True)
    rows, csv_rows = [], []
    for criterion, pattern in PRUNINGS:
        for subset in SUBSETS:
            name = f"{criterion}-{pattern.replace(':', 'of')}-{subset}"
            result = run(out / name, args.threads, f"model.path={dense_dir / 'final'}", f"prune.criterion={criterion}",
                         f"prune.pattern={pattern}", f"update.trainable={subset}", f"update.lr={LR[subset]}",
                         f"train.max_steps={args.steps}")
            pruned, final = result["first"], result["last"]
            recovered = (pruned["val_loss"] - final["val_loss"]) / max(pruned["val_loss"] - dense_loss, 1e-9)
            head = result["head"]
            row = {"criterion": criterion, "pattern": pattern, "subset": subset, "lr": LR[subset],
                   "sparsity": head.get("sparsity"), "trainable": head["trainable_params"] / head["total_params"],
                   "ppl_pruned": pruned["val_ppl"], "ppl_retrained": final["val_ppl"], "recovered": recovered,
                   "state_mib": result["state_bytes"] / 2**20, "peak_mib": result["peak_bytes"] / 2**20,
                   "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            csv_rows.append({**base_row("perp"), "threads": args.threads, "case": name, "provider": "lowmem", "mb": round(row["peak_mib"], 1),
                             "tokens_per_s": round(row["tokens_per_s"]),
                             "note": f"dense ppl {dense_ppl:.2f}; pruned {row['ppl_pruned']:.2f} -> retrained "
                                     f"{row['ppl_retrained']:.2f} ({100 * recovered:.0f}% recovered) in {args.steps} "
                                     f"steps, {100 * row['trainable']:.3f}% trainable, lr {LR[subset]:g}"})
    append_rows(csv_rows)
    print(f"\ndense: val ppl {dense_ppl:.2f} ({args.dense_steps} steps); retraining {args.steps} steps each\n")
    print("| pruning | retrained | trainable | val ppl pruned → retrained | recovered | rule state | peak RSS | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['criterion']} {r['pattern']} | {r['subset']} (lr {r['lr']:g}) | {100 * r['trainable']:.3f}% | "
              f"{r['ppl_pruned']:.2f} → {r['ppl_retrained']:.2f} | {100 * r['recovered']:.0f}% | "
              f"{r['state_mib']:.2f} MiB | {r['peak_mib']:.0f} MiB | {r['seconds']:.0f} s |")
    print(f"\nfolders: {out}")


if __name__ == "__main__":
    main()
