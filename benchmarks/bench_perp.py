"""PERP on the tiny Llama (3.3M parameters), on CPU: does retraining a tiny subset after pruning recover most of what
retraining everything recovers?

    python benchmarks/bench_perp.py [--dense-steps 800] [--steps 100] [--threads 2] [--out DIR]

Data: the Python standard library's top-level modules (``Lib/*.py`` of the running Python, one row per file, about
4.7 MB), 5% of the files held out. The pydoc corpus of the demo is too small for this: its 110k tokens are many
epochs of a dense run, so any further training raises the held-out perplexity and retraining measures overfitting.
Here the dense run and the retraining stay inside the first epoch.

1. Dense: lowmem:tiny-llama trained for ``--dense-steps`` steps of 8 × 256 tokens (AdamW, lr 3e-3, cosine; the
   demo's settings).
2. Pruned: 50% unstructured and 2:4, by magnitude and by wanda (16 calibration batches of 8 × 256 tokens).
3. Retrained for ``--steps`` steps (same data, batch and schedule) with update.trainable norms, mask_lora (rank 16,
   alpha 32) and all (the mask held). Each subset's learning rate is the best of three or four (``LRS``, by held-out
   perplexity) on magnitude 2:4, then used for every pruning (PERP also tunes it per method).
Each retraining is one ``lowmem train`` run (prune → retrain → export); its first evaluation is the pruned model's.
A control trains the dense model the same steps (all, no pruning): what more training alone gives.
Reported: held-out perplexity (16 batches of the validation split), the share of the pruning loss recovered
((loss_pruned − loss_retrained) / (loss_pruned − loss_dense), in log-perplexity), the trainable fraction, the rule
state, the process's peak RSS and the wall time. Rows go to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, base_row  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-llama-pydoc.yaml"
COMMON = ["data.val_fraction=0.05", "train.eval_every_n_steps=null", "train.eval_max_batches=16",
          "checkpoint.save_every_n_steps=null", "checkpoint.resume=never", "log.progress=false", "log.every_n_steps=10"]
PRUNINGS = [("magnitude", "2:4"), ("magnitude", "unstructured"), ("wanda", "unstructured"), ("wanda", "2:4")]
SUBSETS = ["norms", "mask_lora", "all"]
LRS = {"norms": [1e-3, 3e-3, 1e-2, 3e-2], "mask_lora": [3e-4, 1e-3, 3e-3, 1e-2], "all": [1e-4, 3e-4, 1e-3]}


def write_corpus(path: Path) -> Path:
    """One JSON row per top-level standard-library module of this Python, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(path, "w") as f:
        for source in sorted(stdlib.glob("*.py")):
            f.write(json.dumps({"text": source.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return path


DATA: list[str] = []  # data.path=<the corpus>, set by main


def run(out: Path, threads: int, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", str(RECIPE), *COMMON, *DATA,
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
    parser.add_argument("--dense-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-perp-"))
    out.mkdir(parents=True, exist_ok=True)
    DATA.append(f"data.path={write_corpus(out / 'stdlib.jsonl')}")
    dense_dir = out / "dense"
    if not (dense_dir / "bench.json").is_file():
        dense = run(dense_dir, args.threads, f"train.max_steps={args.dense_steps}")
        (dense_dir / "bench.json").write_text(json.dumps(dense))
    dense = json.loads((dense_dir / "bench.json").read_text())
    dense_loss, dense_ppl = dense["last"]["val_loss"], dense["last"]["val_ppl"]
    print(f"dense ({args.dense_steps} steps): val ppl {dense['first']['val_ppl']:.2f} -> {dense_ppl:.2f} in "
          f"{dense['seconds']:.0f} s", flush=True)

    def retrain(criterion: str, pattern: str, subset: str, lr: float) -> dict:
        name = f"{criterion}-{pattern.replace(':', 'of')}-{subset}-lr{lr:g}"
        saved = out / name / "bench.json"
        if not saved.is_file():
            pruning = [f"prune.criterion={criterion}", f"prune.pattern={pattern}"] if criterion != "none" else []
            result = run(out / name, args.threads, f"model.path={dense_dir / 'final'}", *pruning,
                         f"update.trainable={subset}", f"update.lr={lr}", f"train.max_steps={args.steps}")
            saved.write_text(json.dumps(result))
        result = json.loads(saved.read_text())
        pruned, final, head = result["first"], result["last"], result["head"]
        row = {"name": name, "criterion": criterion, "pattern": pattern, "subset": subset, "lr": lr,
               "sparsity": head.get("sparsity"), "trainable": head["trainable_params"] / head["total_params"],
               "ppl_pruned": pruned["val_ppl"], "ppl_retrained": final["val_ppl"],
               "recovered": (pruned["val_loss"] - final["val_loss"]) / max(abs(pruned["val_loss"] - dense_loss), 1e-9),
               "state_mib": result["state_bytes"] / 2**20, "peak_mib": result["peak_bytes"] / 2**20,
               "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"]}
        print(json.dumps(row), flush=True)
        return row

    best_lr, sweep = {}, []
    for subset in SUBSETS:
        tried = [retrain(*PRUNINGS[0], subset, lr) for lr in LRS[subset]]
        sweep += tried
        best_lr[subset] = min(tried, key=lambda r: r["ppl_retrained"])["lr"]
    rows = [next(r for r in sweep if r["subset"] == s and r["lr"] == best_lr[s]) for s in SUBSETS]
    rows += [retrain(c, p, s, best_lr[s]) for c, p in PRUNINGS[1:] for s in SUBSETS]
    # the control: the dense model trained the same steps, everything, no pruning (what more training alone gives)
    control = retrain("none", "unstructured", "all", best_lr["all"])
    append_rows([{**base_row("perp"), "threads": args.threads, "case": r["name"], "provider": "lowmem",
                  "mb": round(r["peak_mib"], 1), "tokens_per_s": round(r["tokens_per_s"]),
                  "note": f"dense ppl {dense_ppl:.2f}; pruned {r['ppl_pruned']:.2f} -> retrained {r['ppl_retrained']:.2f} "
                          f"({100 * r['recovered']:.0f}% recovered) in {args.steps} steps, "
                          f"{100 * r['trainable']:.3f}% trainable"} for r in sweep + rows[len(SUBSETS):] + [control]])
    print(f"\ndense: val ppl {dense_ppl:.2f} ({args.dense_steps} steps); retraining {args.steps} steps each; the dense "
          f"model trained {args.steps} more steps (all, lr {control['lr']:g}): {control['ppl_retrained']:.2f}\n")
    print("lr sweep on magnitude 2:4: " + "; ".join(f"{r['subset']} lr {r['lr']:g} -> {r['ppl_retrained']:.2f}"
                                                    for r in sweep))
    print("\n| pruning | retrained | trainable | val ppl pruned → retrained | recovered | rule state | peak RSS | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['criterion']} {r['pattern']} | {r['subset']} (lr {r['lr']:g}) | {100 * r['trainable']:.3f}% | "
              f"{r['ppl_pruned']:.2f} → {r['ppl_retrained']:.2f} | {100 * r['recovered']:.0f}% | "
              f"{r['state_mib']:.2f} MiB | {r['peak_mib']:.0f} MiB | {r['seconds']:.0f} s |")
    print(f"\nfolders: {out}")


if __name__ == "__main__":
    main()
