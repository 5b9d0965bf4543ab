"""Per-rank memory and step time of a run in 1 and 2 processes (FSDP2, gloo, CPU), same global batch.

The ~106M-parameter Llama of the other CPU benchmarks (vocab 32000; the tiny-llama tokenizer's ids are below 4096),
pydoc text in blocks of 256 tokens, global micro-batch 4 (1 process × 4, 2 processes × 2), 6 steps, float32, no
validation. Each case runs ``lowmem train`` (``--nproc 2``
for two processes; the two share this machine's cores, one thread each) and reads rank 0's ``metrics.jsonl``:
weights and rule state it holds (its shards), its gradient and saved-activation peaks, the process's peak RSS, and
the median global tokens/s of steps 2-6.

    python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, base_row, llama_100m  # noqa: E402

CASES = {"standard + adamw": ["update.strategy=standard", "update.rule=adamw", "update.lr=1e-4"],
         "fused + adalomo": ["update.strategy=fused", "update.rule=adalomo", "update.lr=1e-3"]}


def write_model(folder: Path) -> Path:
    from lowmem.model import load_tokenizer

    model = llama_100m()
    model.save_pretrained(folder)
    load_tokenizer("lowmem:tiny-llama").save_pretrained(folder)
    return folder


def run(model: Path, out: Path, nproc: int, extra: list[str], steps: int) -> list[dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / "recipe.yaml"
    recipe.write_text(f"model: {{path: {model}, dtype: float32}}\n"
                      "data: {path: 'lowmem:pydoc', max_seq_len: 256, val_fraction: 0}\n"
                      f"train: {{batch_size: {4 // nproc}, max_steps: {steps}, device: cpu, seed: 0}}\n"
                      "update: {clip_grad_norm: 1.0}\n"
                      f"checkpoint: {{output_dir: {out}}}\nlog: {{progress: false}}\n")
    command = [sys.executable, "-m", "lowmem", "train", str(recipe), *extra]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "model")
        print(f"{'case':<18} {'procs':>5} {'weights MiB':>11} {'state MiB':>9} {'grads MiB':>9} {'activ. MiB':>10} "
              f"{'peak RSS MiB':>12} {'tokens/s':>8}")
        for name, extra in CASES.items():
            for nproc in (1, 2):
                records = run(model, Path(tmp) / f"{name.replace(' + ', '-')}-{nproc}" / "out", nproc, extra,
                              args.steps)
                steps = [r for r in records if "loss" in r]
                row = {"weights": records[0]["weight_bytes"], "state": steps[-1]["state_bytes"],
                       "grads": max(r["grad_bytes_peak"] for r in steps),
                       "activations": max(r["activation_bytes"] for r in steps),
                       "rss": max(r["peak_mem_bytes"] for r in steps),
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:])}
                mib = {k: v / 2**20 for k, v in row.items() if k != "tokens_per_s"}
                print(f"{name:<18} {nproc:>5} {mib['weights']:11.1f} {mib['state']:9.1f} {mib['grads']:9.1f} "
                      f"{mib['activations']:10.1f} {mib['rss']:12.0f} {row['tokens_per_s']:8.0f}")
                rows.append({**base_row("distributed_per_rank"), "case": f"{name}, 4x256 global, {nproc} proc",
                             "provider": f"nproc={nproc}", "mb": round(mib["rss"], 1),
                             "tokens_per_s": round(row["tokens_per_s"], 1),
                             "note": "rank 0: weights {:.1f} MiB, state {:.1f} MiB, grads {:.1f} MiB, activations "
                                     "{:.1f} MiB".format(mib["weights"], mib["state"], mib["grads"],
                                                         mib["activations"])})
    append_rows(rows)


if __name__ == "__main__":
    main()
