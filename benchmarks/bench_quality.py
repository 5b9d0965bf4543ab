"""Does lowmem fine-tune as well as AdamW? Every method lowmem ships, on a real fine-tuning task, against AdamW.

    python benchmarks/bench_quality.py            # all methods, lr sweep, 3 seeds: about an hour on 2 cores
    python benchmarks/bench_quality.py --quick    # AdamW and fused AdaLomo, one seed, no sweep: a few minutes

Base model: ``lowmem:stdlib-llama`` (3.3M parameters, pretrained here on the Python standard library's modules by
lowmem's trainer; built once on first use, about 7 minutes, cached under ``$LOWMEM_HOME``). Task: the recipe
``stdlib-llama-docstrings`` (a function's code → the first paragraph of its docstring, alpaca rows, prompts masked),
split by module: the learning rate is chosen on ``lowmem:stdlib-docstrings-val``, the loss reported on
``lowmem:stdlib-docstrings-test``; neither split's modules were in the pretraining corpus. Forgetting: the loss on
the held-out modules' source (``lowmem:stdlib-heldout``, 16 batches of 8 × 256 tokens) after fine-tuning minus the
base model's.

Each method is the recipe with overrides, run by ``lowmem train`` in its own process (peers: ``quality_peer.py``,
the same data, order, schedule and evaluation with the peer's optimizer in the plain loop). Same data order, steps,
batch and schedule (cosine, 5% warmup) for all; weight decay 0. Each method's lr is the best final validation loss
of its sweep (``METHODS``: 3 values around its usual setting, a 4th beyond the end when the best is at an end) at
seed 0; then seeds 1 and 2 at that lr (a seed sets the data order and the methods' randomness). The test and
forgetting losses of the chosen runs come from ``lowmem eval`` on their exported ``final/`` folders.

Finished runs (a ``final/`` folder) and evaluations (``eval-*.json``) are reused: rerunning resumes. Prints the
markdown table README quotes; writes it to OUT/table.md, the validation-loss curves to a PNG (matplotlib), and
(not with --quick) rows to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, base_row  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "stdlib-llama-docstrings.yaml"
PEER_LOOP = Path(__file__).resolve().parent / "quality_peer.py"
ADAMW_LRS = (3e-4, 1e-3, 3e-3)
SGD_LRS = (3e-2, 1e-1, 3e-1)
FACTORED_LRS = (3e-3, 1e-2, 3e-2)  # adafactor and adalomo: steps relative to each weight's RMS
LION_LRS = (3e-5, 1e-4, 3e-4)
STANDARD_ADAMW = ["update.strategy=standard", "update.rule=adamw", "update.clip_grad_norm=1.0"]


@dataclass
class Method:
    name: str
    overrides: list[str]
    lrs: tuple[float, ...]
    peer: str | None = None  # run by quality_peer.py instead of lowmem train


METHODS = [
    Method("AdamW", STANDARD_ADAMW, ADAMW_LRS),
    Method("LOMO (fused sgd)", ["update.strategy=fused", "update.rule=sgd", "update.clip_grad_norm=1.0"], SGD_LRS),
    Method("AdaLomo (fused)", ["update.strategy=fused", "update.rule=adalomo", "update.clip_grad_norm=null"],
           FACTORED_LRS),
    Method("Adafactor", ["update.strategy=standard", "update.rule=adafactor", "update.clip_grad_norm=null"],
           FACTORED_LRS),
    Method("Lion", ["update.strategy=standard", "update.rule=lion", "update.clip_grad_norm=1.0"], LION_LRS),
    Method("lion8bit (fused)", ["update.strategy=fused", "update.rule=lion8bit", "update.clip_grad_norm=1.0"],
           LION_LRS),
    Method("QFT (int8 + fused lion8bit)", ["model.weight_format=int8", "update.strategy=fused",
                                           "update.rule=lion8bit", "update.clip_grad_norm=1.0"], LION_LRS),
    Method("int8 + AdaLomo (fused)", ["model.weight_format=int8", "update.strategy=fused", "update.rule=adalomo",
                                      "update.clip_grad_norm=null"], FACTORED_LRS),
    Method("HiFT + AdamW", ["update.strategy=hift", "update.rule=adamw", "update.clip_grad_norm=1.0",
                            "memory.offload_states=true"], ADAMW_LRS),
    Method("HiFT + Adafactor", ["update.strategy=hift", "update.rule=adafactor", "update.clip_grad_norm=null",
                                "memory.offload_states=true"], FACTORED_LRS),
    # the task's sequences are at most 256 tokens: blocks of 32, layers 1-2 of 4 sparse, 40% of their blocks kept
    Method("AdamW + token elimination", [*STANDARD_ADAMW, "tokens.eliminate=true", "tokens.keep_ratio=0.4",
                                         "tokens.block_size=32", "tokens.dense_layers=1"], ADAMW_LRS),
    Method("PERP (wanda 2:4, mask_lora)", [*STANDARD_ADAMW, "prune.criterion=wanda", "prune.pattern=2:4",
                                           "update.trainable=mask_lora"], ADAMW_LRS),
    Method("bitsandbytes AdamW8bit", ["update.clip_grad_norm=1.0"], ADAMW_LRS, peer="bnb-adamw8bit"),
]
QUICK = ["AdamW", "AdaLomo (fused)"]
# Peers that do not run on a CPU, said in the table rather than dropped silently
NOT_ON_CPU = {"lomo-optim AdaLomo": "allocates its state with .cuda(); runs only on a GPU"}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def summarize(out: Path) -> dict:
    """What a finished run's metrics.jsonl says: the validation curve, throughput and peak memory."""
    failed = out / "failed.txt"
    if failed.exists():
        return {"failed": failed.read_text(), "val_loss": math.inf}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    steps = [r for r in records if "tokens_per_s" in r]
    return {"curve": curve, "val_loss": curve[-1][1], "start_val_loss": curve[0][1],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "peak_bytes": max(r["peak_mem_bytes"] for r in steps), "final": str(out / "final"),
            "seconds": json.loads((out / "bench.json").read_text())["seconds"]}


def run(args, method: Method, lr: float, seed: int) -> dict:
    out = args.out / slug(method.name) / f"lr{lr:g}-s{seed}"
    if not ((out / "final").is_dir() or (out / "failed.txt").exists()):
        shutil.rmtree(out, ignore_errors=True)
        overrides = [*method.overrides, f"model.path={args.base}", f"update.lr={lr}", f"train.seed={seed}",
                     f"train.max_steps={args.steps}", f"train.eval_every_n_steps={args.eval_every}",
                     f"checkpoint.output_dir={out}", "checkpoint.save_every_n_steps=null", "checkpoint.resume=never",
                     "log.progress=false", "update.weight_decay=0"]
        head = ([sys.executable, str(PEER_LOOP), method.peer] if method.peer
                else [sys.executable, "-m", "lowmem.cli", "train"])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        done = subprocess.run([*head, str(RECIPE), *overrides], env=env, capture_output=True, text=True)
        out.mkdir(parents=True, exist_ok=True)
        if done.returncode:
            # a diverged run is a result (this lr is too high); anything else is a bug, shown here and in the table
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if "loss is" not in last:
                print(done.stderr[-3000:], file=sys.stderr)
            (out / "failed.txt").write_text(last)
        (out / "bench.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    result = {"method": method.name, "lr": lr, "seed": seed, **summarize(out)}
    status = result.get("failed") or f"val loss {result['val_loss']:.4f}, {result['seconds']:.0f} s"
    print(f"{method.name:<30} lr {lr:<7g} seed {seed}: {status}", flush=True)
    return result


def sweep(args, method: Method) -> tuple[float, list[dict]]:
    """The lr of the lowest final validation loss at seed 0, with the sweep's runs."""
    lrs = list(method.lrs[1:2] if args.quick else method.lrs)
    tried = [run(args, method, lr, 0) for lr in lrs]
    best = min(tried, key=lambda r: r["val_loss"])
    if not args.quick and len(lrs) == 3 and best["lr"] in (lrs[0], lrs[-1]):  # at an end: one step beyond it
        factor = lrs[1] / lrs[0]
        beyond = lrs[0] / factor if best["lr"] == lrs[0] else lrs[-1] * factor
        tried.append(run(args, method, float(f"{beyond:.3g}"), 0))
        best = min(tried, key=lambda r: r["val_loss"])
    return best["lr"], tried


def evaluate(args, folders: list[str], name: str, data: list[str]) -> dict[str, float]:
    """``lowmem eval`` loss of each folder on a dataset, cached in OUT/eval-NAME.json."""
    cache = args.out / f"eval-{name}.json"
    losses = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [f for f in dict.fromkeys(folders) if f not in losses]
    if todo:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run([sys.executable, "-m", "lowmem.cli", "eval", *todo, *data, "--batch-size", "8"],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"lowmem eval on {name} failed:\n{done.stderr[-3000:]}")
        for line in done.stdout.splitlines():
            row = json.loads(line)
            losses[row["model"]] = row["loss"]
        cache.write_text(json.dumps(losses, indent=1))
    return losses


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, row in enumerate(rows):
        curves = [r["curve"] for r in row["runs"]]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[j][1] for c in curves) for j in range(len(steps))]
        ax.plot(steps, mean, label=f"{row['method']} (lr {row['lr']:g})", color=colors[i % len(colors)],
                linestyle="-" if i < 7 else "--", linewidth=2.2 if row["method"] == "AdamW" else 1.3)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="AdamW and fused AdaLomo, one seed, no lr sweep")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", default="lowmem:stdlib-llama", help="the base model (an HF folder or lowmem:NAME)")
    parser.add_argument("--methods", default=None, help="comma-separated method names, or all (default: all; --quick: "
                                                         f"{', '.join(QUICK)}); AdamW, the reference, always runs")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-quality")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: benchmarks/quality_val_loss.png; "
                                                                 "--quick: OUT/quality_val_loss.png)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = range(1 if args.quick else args.seeds)
    if args.base.startswith("lowmem:"):  # built here once (pretraining), not inside the first run's process
        from lowmem import assets

        args.base = assets.resolve(args.base)
    names = args.methods or (",".join(QUICK) if args.quick else "all")
    chosen = METHODS if names == "all" else [m for m in METHODS if m.name in {"AdamW", *names.split(",")}]
    rows, sweeps = [], []
    for method in chosen:
        lr, tried = sweep(args, method)
        sweeps += tried
        runs = [next(r for r in tried if r["lr"] == lr), *(run(args, method, lr, seed) for seed in seeds if seed)]
        rows.append({"method": method.name, "lr": lr, "runs": runs})

    finals = [r["final"] for row in rows for r in row["runs"] if "final" in r]
    test = evaluate(args, [args.base, *finals], "test",
                    ["--data", "lowmem:stdlib-docstrings-test", "--format", "alpaca", "--max-seq-len", "256"])
    heldout = evaluate(args, [args.base, *finals], "heldout",
                       ["--data", "lowmem:stdlib-heldout", "--format", "text", "--max-seq-len", "256",
                        "--max-batches", "16"])
    pretrain = Path(args.base) / "pretrain_metrics.jsonl"
    base_note = ""
    if pretrain.exists():
        evals = [json.loads(line) for line in pretrain.read_text().splitlines() if "val_loss" in line]
        base_note = (f"base model: held-out corpus loss {evals[0]['val_loss']:.3f} → {evals[-1]['val_loss']:.3f} "
                     f"(perplexity {evals[-1]['val_ppl']:.1f}) in {evals[-1]['step']} pretraining steps; ")

    reference = None
    lines = ["| method | lr | test loss (mean ± sd) | / AdamW | within 2% | forgetting | peak RSS | tokens/s |",
             "|---|---|---|---|---|---|---|---|",
             f"| base model, not fine-tuned | – | {test[args.base]:.4f} | – | – | – | – | – |"]
    csv_rows = []
    for row in rows:
        good = [r for r in row["runs"] if "final" in r]
        if len(good) < len(row["runs"]):
            why = next(r["failed"] for r in row["runs"] if "failed" in r)
            lines.append(f"| {row['method']} | {row['lr']:g} | {len(row['runs']) - len(good)} of {len(row['runs'])} "
                         f"seeds failed ({why}) | | ✗ | | | |")
            continue
        loss, sd = mean_sd([test[r["final"]] for r in good])
        reference = reference or loss  # AdamW comes first
        forgetting = statistics.mean(heldout[r["final"]] - heldout[args.base] for r in good)
        peak = statistics.mean(r["peak_bytes"] for r in good) / 2**20
        speed = statistics.mean(r["tokens_per_s"] for r in good)
        ratio = loss / reference
        verdict = "✓" if ratio <= 1.02 else f"✗ (+{100 * (ratio - 1.02):.1f}%)"
        row.update(test=loss, sd=sd, ratio=ratio)
        lines.append(f"| {row['method']} | {row['lr']:g} | {loss:.4f} ± {sd:.4f} | {ratio:.4f} | {verdict} | "
                     f"{forgetting:+.4f} | {peak:.0f} MiB | {speed:.0f} |")
        csv_rows.append({**base_row("quality"), "threads": args.threads, "case": f"stdlib docstrings, {args.steps} "
                         f"steps, {len(good)} seeds", "provider": row["method"], "mb": round(peak, 1),
                         "tokens_per_s": round(speed), "note": f"lr {row['lr']:g}; test loss {loss:.4f} ± {sd:.4f}; "
                         f"/AdamW {ratio:.4f}; forgetting {forgetting:+.4f}"})
    for name, why in NOT_ON_CPU.items():
        lines.append(f"| {name} | – | not run: {why} | | | | | |")
    sweep_line = "lr sweep (final validation loss, seed 0): " + "; ".join(
        f"{r['method']} {r['lr']:g} → " + (f"{r['val_loss']:.4f}" if "failed" not in r
                                          else "diverged" if "loss is" in r["failed"] else "failed") for r in sweeps)
    header = (f"{base_note}{args.steps} steps of 8 sequences, {len(seeds)} seed(s); forgetting: held-out corpus loss "
              f"after − before ({heldout[args.base]:.4f})")
    table = "\n".join([header, "", *lines, "", sweep_line])
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    plot_path = args.plot or (args.out if args.quick else Path(__file__).resolve().parent) / "quality_val_loss.png"
    plot([r for r in rows if all("curve" in x for x in r["runs"])], plot_path,
         f"stdlib docstrings: validation loss, {args.steps} steps, mean of {len(seeds)} seed(s), each at its best lr")
    print(f"plot: {plot_path}\nruns: {args.out}")
    if not args.quick:
        append_rows(csv_rows)


if __name__ == "__main__":
    main()
