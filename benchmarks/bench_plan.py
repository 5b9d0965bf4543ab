"""The memory planner: planned peaks of common models under lowmem's recipes and the usual baselines, how long a
plan takes, and planned against measured on the ~106M Llama on CPU.

    pip install matplotlib   # for the plot only
    python benchmarks/bench_plan.py [--part planned,measured] [--threads 2]

planned   every shipped model config × {AdamW, bitsandbytes' AdamW8bit, AdamW in backward (torchtune's
          optimizer_in_bwd), LOMO, AdaLomo, QFT, HiFT + AdamW with offloading} at bf16, 1 × 2048 tokens, gradient checkpointing and chunked loss (as the
          24 GB recipes), for a CUDA device: planned peak with its modeled terms, and the seconds the simulation took.
          Writes benchmarks/plan_components.png (the 8B model's peak by component per mode).
measured  on the ~106M Llama (float32, 2 × 256 tokens, 3 steps) for every strategy × rule: the simulated peak of
          live tensor bytes, the same count in a real CPU run of the same steps, and the process RSS high-water mark
          over its baseline (each real run in its own process, MALLOC_MMAP_THRESHOLD_=131072).
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

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "llama3-8b-adalomo-24gb.yaml"
MODELS = ["llama-3.2-1b", "mistral-7b", "qwen2.5-7b", "llama-3.1-8b", "llama-2-13b", "llama-3.1-70b"]
COMMON = ["model.dtype=bfloat16", "model.gradient_checkpointing=true", "memory.loss_chunk_tokens=512",
          "data.max_seq_len=2048", "train.batch_size=1", "update.clip_grad_norm=null"]
MODES = {
    "AdamW": ["update.strategy=standard", "update.rule=adamw"],
    "8-bit AdamW (bitsandbytes)": ["peer=bnb-adamw8bit"],
    "AdamW in backward": ["update.strategy=fused", "update.rule=adamw"],
    "LOMO (fused SGD)": ["update.strategy=fused", "update.rule=sgd"],
    "AdaLomo (fused)": ["update.strategy=fused", "update.rule=adalomo"],
    "QFT (int8 + lion8bit)": ["update.strategy=fused", "update.rule=lion8bit", "model.weight_format=int8"],
    "HiFT + AdamW, offloaded": ["update.strategy=hift", "update.rule=adamw", "hift.group_size=8",
                                "memory.offload_states=true", "memory.offload_frozen_weights=true"],
}
SLOW = {"llama-3.1-70b": ["AdamW", "8-bit AdamW (bitsandbytes)", "AdaLomo (fused)", "QFT (int8 + lion8bit)"]}  # a 70B step takes minutes here
STRATEGY_RULES = [("standard", "adamw"), ("standard", "sgd"), ("standard", "adafactor"), ("standard", "lion"),
                  ("fused", "sgd"), ("fused", "adalomo"), ("fused", "adamw"), ("fused", "lion8bit"),
                  ("hift", "adamw"), ("hift", "adafactor")]


def planned(modes: list[str], models: list[str]) -> list[dict]:
    from lowmem.config import load_config
    from lowmem.planner.plan import GiB, simulate

    rows = []
    for model in models:
        for mode in modes:
            if model in SLOW and mode not in SLOW[model]:
                continue
            overrides = [o for o in MODES[mode] if not o.startswith("peer=")]
            peer = next((o.split("=", 1)[1] for o in MODES[mode] if o.startswith("peer=")), None)
            config = load_config(RECIPE, [f"model.path=lowmem:{model}", *COMMON, *overrides])
            start = time.perf_counter()
            plan = simulate(config, target="cuda", peer=peer)
            seconds = time.perf_counter() - start
            rows.append({"model": model, "mode": mode, "planned_gib": plan.device_bytes / GiB,
                         "host_gib": sum(plan.host.values()) / GiB, "seconds": seconds, "steps": plan.steps,
                         "device": plan.device, "modeled": plan.modeled})
            print(f"| {model} | {mode} | {plan.device_bytes / GiB:.1f} | "
                  f"{'yes' if plan.device_bytes <= 24 * GiB else 'no'} | {sum(plan.host.values()) / GiB:.1f} | "
                  f"{plan.steps} | {seconds:.0f} |", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["model"] == "llama-3.1-8b"]
    parts = sorted({k for r in rows for k in r["device"]} | {"modeled"}, key=lambda k: (k == "modeled", k))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [(sum(r["modeled"].values()) if part == "modeled" else r["device"].get(part, 0)) / 2**30 for r in rows]
        ax.bar([r["mode"] for r in rows], values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(24, color="black", linestyle="--", linewidth=1)
    ax.text(len(rows) - 0.5, 24.5, "24 GB", ha="right")
    ax.set_ylabel("planned peak on the GPU, GiB")
    ax.set_title("Llama-3.1-8B, bf16, 1 × 2048 tokens, checkpointing + chunked loss (planned, not measured)")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measured_worker(strategy: str, rule: str, config_dir: str) -> dict:
    import torch
    from common import llama_100m, rss_bytes

    from lowmem.config import load_config
    from lowmem.planner.plan import simulate

    overrides = [f"model.path={config_dir}", "model.dtype=float32", "model.gradient_checkpointing=false",
                 "data.max_seq_len=256", "train.batch_size=2", f"update.strategy={strategy}", f"update.rule={rule}",
                 "memory.loss_chunk_tokens=0", "hift.group_size=4", "update.clip_grad_norm=null"]
    config = load_config(RECIPE, overrides)
    start = time.perf_counter()
    plan = simulate(config, steps=3, target="cpu")
    plan_s = time.perf_counter() - start
    model = llama_100m()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    real = simulate(config, steps=3, fake=False, model=model, target="cpu")
    return {"planned": plan.counted_bytes, "counted": real.counted_bytes, "rss": rss_bytes("VmHWM") - base,
            "plan_s": plan_s, "device": plan.device}


def measured(threads: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from common import llama_100m

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llama_100m().config.save_pretrained(tmp)
        for strategy, rule in STRATEGY_RULES:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="131072")
            proc = subprocess.run([sys.executable, __file__, "--worker", strategy, rule, tmp], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {strategy} + {rule} | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mib = 2**20
            print(f"| {strategy} + {rule} | {r['planned'] / mib:.1f} | {r['counted'] / mib:.1f} | "
                  f"{r['planned'] / r['counted']:.4f} | {r['rss'] / mib:.1f} | {r['plan_s']:.1f} |", flush=True)
            rows.append({"strategy": strategy, "rule": rule, **r})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3)
    parser.add_argument("--part", default="planned,measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=None, help="comma-separated planned modes (default: all, and the plot)")
    parser.add_argument("--models", default=None, help="comma-separated model configs (default: all)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measured_worker(*args.worker)))
        return
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from common import append_rows, base_row

    csv_rows = []
    if "planned" in args.part:
        print("| model | mode | planned GiB | fits 24 GB | host GiB | steps simulated | plan s |\n"
              "|---|---|---|---|---|---|---|")
        rows = planned(args.modes.split(",") if args.modes else list(MODES),
                       args.models.split(",") if args.models else MODELS)
        csv_rows += [{**base_row("plan_planned"), "case": r["model"], "provider": r["mode"],
                      "mb": round(r["planned_gib"] * 1024, 1), "p50_ms": round(r["seconds"] * 1e3),
                      "note": f"planned for cuda, {r['steps']} steps simulated"} for r in rows]
        try:
            if not args.modes:
                plot(rows, HERE / "plan_components.png")
        except ImportError:
            print("matplotlib not installed: no plot")
    if "measured" in args.part:
        print("\n| strategy + rule | simulated MiB | counted in a real run MiB | ratio | peak RSS over base MiB | "
              "plan s |\n|---|---|---|---|---|---|")
        rows = measured(args.threads)
        csv_rows += [{**base_row("plan_measured"), "case": "llama-106m 2x256 fp32, 3 steps",
                      "provider": f"{r['strategy']} + {r['rule']}", "mb": round(r["rss"] / 2**20, 1),
                      "note": f"simulated {r['planned']} B; counted {r['counted']} B"} for r in rows]
    append_rows(csv_rows)


if __name__ == "__main__":
    main()
