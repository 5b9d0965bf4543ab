"""Fused update kernels: lowmem native vs its PyTorch reference, with torch's and transformers' optimizers
stepping the same tensor as peers.

    python benchmarks/bench_update_ops.py [--threads 2] [--shapes 1024x1024,4096x4096]

Prints p20/p50/p80 ms per step and appends rows to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from common import append_rows, base_row, quantiles_ms
from lowmem.ops.native import ensure_loaded
from lowmem.ops.quant import dynamic_map, quantize_blockwise_ref
from lowmem.ops.update import (
    factored_update_,
    factored_update_ref,
    lion8bit_update_,
    lion8bit_update_ref,
    sgd_update_,
    sgd_update_ref,
)


def optimizer_step(optimizer_cls, param, grad, **kwargs):
    p = torch.nn.Parameter(param.clone())
    optimizer = optimizer_cls([p], **kwargs)

    def step():
        p.grad = grad
        optimizer.step()

    return step


def providers(shape, dtype):
    g = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    row, col = torch.ones(shape[0]), torch.ones(shape[1])
    empty = torch.zeros(0)
    factored = dict(step=10.0, grad_scale=1.0, lr=1e-3, relative_step=False, decay_rate=-0.8, eps1=1e-30,
                    clip_threshold=1.0, eps2=1e-3, scale_parameter=True, weight_decay=0.0, beta1=0.0)
    factored_ref = {**factored, "step": torch.tensor(10.0), "grad_scale": torch.tensor(1.0)}
    out = {
        ("sgd", "reference"): lambda: sgd_update_ref(param, grad, 1e-3, 0.01, 1.0),
        ("sgd", "torch.optim.SGD"): optimizer_step(torch.optim.SGD, param, grad, lr=1e-3, weight_decay=0.01),
        ("adalomo", "reference"): lambda: factored_update_ref(param, grad, row, col, empty, **factored_ref),
        ("adalomo", "transformers Adafactor"): optimizer_step(
            transformers.Adafactor, param, grad, lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False),
        ("adalomo", "torch.optim.Adafactor"): optimizer_step(torch.optim.Adafactor, param, grad, lr=1e-3, foreach=False),
    }
    codes, absmax = quantize_blockwise_ref(torch.randn(shape, generator=g) * 0.01, dynamic_map(), 256, True)
    lion = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0)
    out[("lion8bit", "reference")] = lambda: lion8bit_update_ref(param, grad, codes, absmax, dynamic_map(),
                                                                 torch.tensor(1.0), *lion.values(), 256)
    try:
        import bitsandbytes as bnb

        out[("lion8bit", "bitsandbytes Lion8bit")] = optimizer_step(bnb.optim.Lion8bit, param, grad, lr=1e-4,
                                                                    betas=(0.9, 0.99))
    except Exception as err:  # optional peer
        print(f"bitsandbytes unavailable: {err}")
    if ensure_loaded().loaded:
        out[("lion8bit", "native")] = lambda: lion8bit_update_(param, grad, codes, absmax, **lion)
        out[("sgd", "native")] = lambda: sgd_update_(param, grad, 1e-3, 0.01, 1.0)
        out[("adalomo", "native")] = lambda: factored_update_(param, grad, row, col, empty, **factored)
    if dtype != torch.float32:  # the optimizers keep fp32 math on the given dtype; skip them for bf16
        out = {k: v for k, v in out.items() if not any(peer in k[1] for peer in ("optim", "transformers", "bitsandbytes"))}
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1024x1024,4096x4096")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'op':<8} {'case':<22} {'provider':<24} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} {'vs ref':>7}")
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            case = f"{text} {str(dtype).split('.')[1]}"
            found = providers(shape, dtype)
            timed = {key: quantiles_ms(fn, repeats=args.repeats) for key, fn in found.items()}
            for (op, name), (p20, p50, p80) in timed.items():
                ref = {op: timed[(op, "reference")][1]}
                print(f"{op:<8} {case:<22} {name:<24} {p20:8.2f} {p50:8.2f} {p80:8.2f} {ref[op] / p50:6.1f}x")
                rows.append({**base_row(f"update_{op}"), "case": case, "provider": name, "p20_ms": round(p20, 3),
                             "p50_ms": round(p50, 3), "p80_ms": round(p80, 3),
                             "mb": round(torch.tensor([], dtype=dtype).element_size() * shape[0] * shape[1] / 2**20, 1)})
    append_rows(rows)


if __name__ == "__main__":
    main()
