"""Peak memory and step time of full fine-tuning strategies on a ~100M-parameter Llama, on one machine:

    standard+adamw, fused+sgd, fused+adalomo, fused+lion8bit with float and with int8 weights (QFT), hift
    (k = 4, 11) with adamw, adafactor and lion8bit (lowmem)
    vs lomo-optim's Lomo and AdaLomo, the hift package (the original implementations), lion-pytorch's Lion
    and bitsandbytes' Lion8bit (each in the plain backward-then-step loop)

    pip install --no-deps lomo-optim lion-pytorch   # optional peers; --no-deps so they cannot pull another torch
    python benchmarks/bench_strategies.py [--steps 5] [--threads 2] [--only a,b]

Every provider runs in its own process, twice: once with MALLOC_MMAP_THRESHOLD_=131072 so freed tensors
return to the OS and the RSS peak tracks live tensors (DESIGN.md §5), once without it for step time (the
threshold slows steps). "train peak" is the RSS high-water mark during the steps minus the RSS after the
model and data were loaded (int8 weights: after quantizing); "peak" is the whole process's RSS high-water
mark over the steps, model included. "weights" counts the bytes the model's weights are stored in.
Rows are appended to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = {
    "standard+adamw": dict(strategy="standard", rule="adamw", lr=1e-3),
    "fused+sgd": dict(strategy="fused", rule="sgd", lr=0.3),
    "fused+adalomo": dict(strategy="fused", rule="adalomo", lr=2e-2),
    "lomo-optim Lomo": dict(peer="Lomo", lr=0.3),
    "lomo-optim AdaLomo": dict(peer="AdaLomo", lr=2e-2),
    # 11 units (embeddings, 8 layers, norm, lm_head): group_size 3 → k = 4 groups, 1 → k = 11.
    "hift k=4 +adamw": dict(strategy="hift", rule="adamw", lr=1e-3, group_size=3),
    "hift k=11 +adamw": dict(strategy="hift", rule="adamw", lr=1e-3, group_size=1),
    "hift k=4 +adafactor": dict(strategy="hift", rule="adafactor", lr=1e-2, group_size=3),
    "hift k=11 +adafactor": dict(strategy="hift", rule="adafactor", lr=1e-2, group_size=1),
    "fused+lion8bit": dict(strategy="fused", rule="lion8bit", lr=1e-4),
    "fused+lion8bit int8w": dict(strategy="fused", rule="lion8bit", lr=1e-4, int8_weights=True),
    "standard+lion8bit int8w": dict(strategy="standard", rule="lion8bit", lr=1e-4, int8_weights=True),
    "lion-pytorch Lion": dict(peer="lion-pytorch", lr=1e-4),
    "bnb Lion8bit": dict(peer="bnb Lion8bit", lr=1e-4),
    "hift k=4 +lion8bit": dict(strategy="hift", rule="lion8bit", lr=1e-4, group_size=3),
    "hift k=11 +lion8bit": dict(strategy="hift", rule="lion8bit", lr=1e-4, group_size=1),
    "hift package": dict(peer="hift"),
}


def build_model_and_batches(steps: int, batch: int, seq: int):
    from common import llama_100m

    from lowmem.data import collate, pack, tokenize_text
    from lowmem.model import load_tokenizer
    from lowmem.assets import pydoc_texts

    model = llama_100m()
    tokenizer = load_tokenizer("lowmem:tiny-llama")
    blocks = pack(tokenize_text(pydoc_texts(), tokenizer), seq)
    batches = [collate(blocks[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(steps)]
    return model, batches


def peer_step(spec: dict, model):
    """A function running one step of a peer implementation on a loss."""
    import torch

    if spec["peer"] in ("Lomo", "AdaLomo"):
        import lomo_optim

        optimizer = getattr(lomo_optim, spec["peer"])(model, lr=spec["lr"])
        return lambda loss: optimizer.fused_backward(loss, spec["lr"])
    if spec["peer"] == "lion-pytorch":
        from lion_pytorch import Lion

        optimizer = Lion(model.parameters(), lr=spec["lr"], betas=(0.9, 0.99))
    elif spec["peer"] == "bnb Lion8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.Lion8bit(model.parameters(), lr=spec["lr"], betas=(0.9, 0.99), min_8bit_size=4096)
    else:
        raise ValueError(spec["peer"])

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def weight_bytes(model) -> int:
    from lowmem.weights.int8 import int8_weights

    int8 = int8_weights(model)
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(w.stored_bytes() for w in int8.values())


def worker(name: str, steps: int) -> dict:
    import torch
    from common import rss_bytes

    from lowmem.config import UpdateConfig
    from lowmem.activations.loss import count_label_tokens, loss_sum
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy

    spec = PROVIDERS[name]
    if spec.get("peer") == "hift":
        import hift  # noqa: F401  (the original HiFT package; reported as failing if it cannot import)
    if spec.get("strategy") == "hift":
        steps = max(steps, 11 // spec["group_size"] + (11 % spec["group_size"] > 0) + 1)  # one full cycle + 1
    model, batches = build_model_and_batches(steps, batch=2, seq=256)
    n_params = sum(p.numel() for p in model.parameters())
    if spec.get("int8_weights"):
        from lowmem.weights.int8 import quantize_model

        quantize_model(model)
    loaded = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    times, losses, stats = [], [], {}
    if "peer" in spec:
        step = peer_step(spec, model)
        for batch in batches:
            start = time.perf_counter()
            loss = loss_sum(model, batch) / count_label_tokens(batch)
            step(loss)
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
    else:
        from lowmem.config import Config, HiftConfig, MemoryConfig

        update = UpdateConfig(strategy=spec["strategy"], rule=spec["rule"], lr=spec["lr"], clip_grad_norm=None)
        config = Config(update=update, hift=HiftConfig(group_size=spec.get("group_size", 1)),
                        memory=MemoryConfig(offload_states=spec["strategy"] == "hift"))
        strategy = make_strategy(spec["strategy"], model, make_rule(update), update, config)
        resident, grad_peaks = [], []
        for batch in batches:
            start = time.perf_counter()
            strategy.prepare(spec["lr"])
            loss = loss_sum(model, batch) / count_label_tokens(batch)
            strategy.backward(loss)
            stats = strategy.step()
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
            resident.append(stats.get("device_resident_bytes", 0))
            grad_peaks.append(stats["grad_bytes_peak"])
            stats["device_resident_peak"] = max(resident)
            stats["grad_bytes_peak"] = max(grad_peaks)  # under hift it depends on the active group
    steady = sorted(times[1:]) or times  # the first step pays one-time allocations
    return {"provider": name, "params": n_params, "rss_loaded": loaded, "train_peak": rss_bytes("VmHWM") - loaded,
            "peak": rss_bytes("VmHWM"), "weight_bytes": weight_bytes(model),
            "step_s": steady[len(steady) // 2], "losses": losses, "grad_bytes_peak": stats.get("grad_bytes_peak"),
            "state_bytes": stats.get("state_bytes"), "threads": torch.get_num_threads(),
            "device_resident_peak": stats.get("device_resident_peak") or None}


def run_worker(name: str, steps: int, threads: int, memory_mode: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if memory_mode:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"provider": name, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated provider names")
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(args.worker, args.steps)))
        return

    from common import append_rows, base_row

    names = args.only.split(",") if args.only else list(PROVIDERS)
    mib = 2**20
    print(f"{'provider':<24} {'peak MiB':>8} {'train peak MiB':>14} {'RSS loaded MiB':>14} {'weights MiB':>11} "
          f"{'step s':>7} {'grads MiB':>9} {'state MiB':>9} {'resident MiB':>12}  loss first→last ({args.steps} steps)")
    rows = []
    for name in names:
        memory = run_worker(name, args.steps, args.threads, memory_mode=True)
        timing = run_worker(name, args.steps, args.threads, memory_mode=False)
        if "error" in memory or "error" in timing:
            print(f"{name:<24} failed: {memory.get('error') or timing.get('error')}")
            continue
        fmt = lambda v: f"{v / mib:9.1f}" if v is not None else f"{'n/a':>9}"  # noqa: E731
        print(f"{name:<24} {memory['peak'] / mib:8.1f} {memory['train_peak'] / mib:14.1f} "
              f"{memory['rss_loaded'] / mib:14.1f} {memory['weight_bytes'] / mib:11.1f} "
              f"{timing['step_s']:7.2f} {fmt(memory['grad_bytes_peak'])} {fmt(memory['state_bytes'])} "
              f"{fmt(memory.get('device_resident_peak')):>12}  "
              f"{timing['losses'][0]:.3f}→{timing['losses'][-1]:.3f}")
        rows.append({**base_row("strategies_100m"), "case": f"{memory['params'] / 1e6:.0f}M params, 2x256 tokens",
                     "provider": name, "p50_ms": round(timing["step_s"] * 1e3, 1),
                     "mb": round(memory["train_peak"] / mib, 1)})
    append_rows(rows)


if __name__ == "__main__":
    main()
