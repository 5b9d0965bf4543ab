"""Activation memory of one long-context step on the ~100M Llama (vocab 32000), batch 1, by loss mode, sequence
length and gradient checkpointing:

    dense            the plain loss: the [seq, vocab] logits and their float32 log-softmax are kept for backward
    chunked          memory.loss_chunk_tokens=512: head + cross-entropy per chunk, recomputed in backward
    chunked+keepR    and token elimination: layers 2..6 of 8 keep the top R of their 64-token blocks

    python benchmarks/bench_activations.py [--seqs 1024,2048,4096] [--steps 3] [--threads 2]

Every case runs in its own process with MALLOC_MMAP_THRESHOLD_=131072, so freed tensors leave the RSS. Reported:
"activations" = bytes of the storages the forward leaves alive for backward (``lowmem.metrics.LiveTensorBytes``,
exact: what autograd saved, what checkpointing keeps, the loss); "peak over base" = the RSS high-water mark during
the steps minus the RSS before them (model, data and rule state of the first step excluded: fused AdaLomo's state
is O(rows + cols)); the median step time after the first; the loss of the last step. The update is fused AdaLomo
(no gradient set), so what is left of a step's peak is activations. Rows are appended to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = {"dense": dict(chunk=0), "chunked": dict(chunk=512), "chunked+keep0.6": dict(chunk=512, keep=0.6),
         "chunked+keep0.4": dict(chunk=512, keep=0.4)}
DENSE_LAYERS = 2  # of 8: tokens.dense_layers for the keep modes (the last layer is dense too)


def worker(mode: str, seq: int, checkpointing: bool, steps: int) -> dict:
    import torch
    from common import llama_100m, rss_bytes

    from lowmem.assets import pydoc_texts
    from lowmem.config import UpdateConfig
    from lowmem.data import collate, pack, tokenize_text
    from lowmem.activations.loss import count_label_tokens, loss_sum
    from lowmem.metrics import LiveTensorBytes
    from lowmem.model import enable_gradient_checkpointing, load_tokenizer
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy

    model = llama_100m(max_positions=max(seq, 1024))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    tokenizer = load_tokenizer("lowmem:tiny-llama")
    blocks = pack(tokenize_text(pydoc_texts(), tokenizer), seq)
    batches = [collate(blocks[i:i + 1], tokenizer.pad_token_id) for i in range(steps)]
    update = UpdateConfig(strategy="fused", rule="adalomo", lr=2e-2, clip_grad_norm=None)
    strategy = make_strategy("fused", model, make_rule(update), update)
    chunk = MODES[mode]["chunk"]
    if "keep" in MODES[mode]:
        from lowmem.activations.tokens import TokenEliminator

        TokenEliminator(model, MODES[mode]["keep"], DENSE_LAYERS, 64)
    base = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    times, losses, activations = [], [], None
    for batch in batches:
        start = time.perf_counter()
        strategy.prepare(update.lr)
        with LiveTensorBytes([*model.parameters(), *model.buffers()]) as live:
            loss = loss_sum(model, batch, chunk) / count_label_tokens(batch)
        activations = activations or live.nbytes
        strategy.backward(loss)
        strategy.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    steady = sorted(times[1:]) or times
    return {"activations": activations, "peak_over_base": rss_bytes("VmHWM") - base,
            "step_s": steady[len(steady) // 2], "loss": losses[-1], "threads": torch.get_num_threads()}


def run(mode: str, seq: int, checkpointing: bool, steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    args = [sys.executable, __file__, "--worker", mode, "--seqs", str(seq), "--steps", str(steps)]
    proc = subprocess.run(args + (["--checkpointing"] if checkpointing else []), env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--seqs", default="1024,2048,4096")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(args.worker, int(args.seqs), args.checkpointing, args.steps)))
        return

    from common import append_rows, base_row

    mib = 2**20
    print("| seq | checkpointing | loss mode | activations MiB | peak over base MiB | step s | loss after "
          f"{args.steps} steps |\n|---|---|---|---|---|---|---|")
    rows = []
    for seq in map(int, args.seqs.split(",")):
        for checkpointing in (False, True):
            for mode in args.modes.split(","):
                r = run(mode, seq, checkpointing, args.steps, args.threads)
                if "error" in r:
                    print(f"| {seq} | {'on' if checkpointing else 'off'} | {mode} | failed: {r['error']} | | | |")
                    continue
                print(f"| {seq} | {'on' if checkpointing else 'off'} | {mode} | {r['activations'] / mib:.1f} | "
                      f"{r['peak_over_base'] / mib:.1f} | {r['step_s']:.2f} | {r['loss']:.4f} |", flush=True)
                rows.append({**base_row("activations_100m"), "threads": r["threads"],
                             "case": f"1x{seq} tokens, checkpointing {'on' if checkpointing else 'off'}",
                             "provider": mode, "p50_ms": round(r["step_s"] * 1e3, 1),
                             "mb": round(r["peak_over_base"] / mib, 1),
                             "note": f"activations {r['activations'] / mib:.1f} MiB; loss {r['loss']:.4f}"})
    append_rows(rows)


if __name__ == "__main__":
    main()
