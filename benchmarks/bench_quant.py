"""Blockwise int8 quantize + dequantize round trip: lowmem native vs its PyTorch reference vs bitsandbytes.

    python benchmarks/bench_quant.py [--threads 2] [--sizes 1048576,16777216]

Prints a table and appends rows to benchmarks/results.csv. Run on a quiet machine: on 2 cores a
benchmark beside another process slows by an order of magnitude.
"""

from __future__ import annotations

import argparse

import torch

from common import append_rows, base_row, quantiles_ms
from lowmem.ops.native import ensure_loaded
from lowmem.ops.quant import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    dynamic_map,
    quantize_blockwise,
    quantize_blockwise_ref,
)


def providers():
    code = dynamic_map()

    def reference(x):
        codes, absmax = quantize_blockwise_ref(x, code, 256, True)
        return dequantize_blockwise_ref(codes, absmax, code, 256, x.dtype)

    def native(x):
        codes, absmax = quantize_blockwise(x)
        return dequantize_blockwise(codes, absmax, dtype=x.dtype)

    found = {"reference": reference}
    if ensure_loaded().loaded:
        found["native"] = native
    try:
        import bitsandbytes.functional as bnb

        def bitsandbytes(x):
            codes, state = bnb.quantize_blockwise(x, blocksize=256)
            return bnb.dequantize_blockwise(codes, state)

        found["bitsandbytes"] = bitsandbytes
    except Exception as err:  # optional peer
        print(f"bitsandbytes unavailable: {err}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="1048576,16777216")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'case':<22} {'provider':<13} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} {'vs ref':>7}")
    for n in (int(s) for s in args.sizes.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n).to(dtype)
            case = f"{n} {str(dtype).split('.')[1]}"
            ref_p50 = None
            for name, fn in providers().items():
                p20, p50, p80 = quantiles_ms(lambda: fn(x), repeats=args.repeats)
                ref_p50 = ref_p50 or p50
                print(f"{case:<22} {name:<13} {p20:8.2f} {p50:8.2f} {p80:8.2f} {ref_p50 / p50:6.1f}x")
                rows.append({**base_row("quant_roundtrip"), "case": case, "provider": name, "p20_ms": round(p20, 3),
                             "p50_ms": round(p50, 3), "p80_ms": round(p80, 3), "mb": round(n * x.element_size() / 2**20, 1)})
    append_rows(rows)


if __name__ == "__main__":
    main()
