"""The input embedding's update from the batch's rows (issue 22 items 2 and 3) against the dense update and a copy.

    python benchmarks/bench_update_rows.py [--threads 2] [--shape 128256x4096] [--rows 2048] [--repeats 5]

One bf16 embedding of ``--shape`` (Llama-3's by default: 1 GiB) and a float32 gradient of ``--rows`` distinct rows
(a 2048-token batch touches about that many). Rows, each p20/p50/p80 ms, side by side in one run:
    copy                    ``copy_`` of the weight into a tensor made once (1 GiB read, 1 GiB written)
    RULE rows               ``update_rows`` (``sgd_update_rows_`` / ``factored_update_rows_``): what a fused step with
                            ``memory.offload_embeddings`` runs on the host, per step
    RULE dense              the same update from the gradient made dense (the float32 gradient exists, 2 GiB)
Appends rows to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse

import torch

from common import quantiles_ms, report_against
from lowmem.config import UpdateConfig
from lowmem.ops.native import ensure_loaded
from lowmem.rules import make_rule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="128256x4096")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert ensure_loaded().loaded, "build the extension first (make install)"
    n, width = (int(s) for s in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, width, generator=g) * 0.02).to(torch.bfloat16)
    rows = torch.randperm(n, generator=g)[: args.rows].sort().values
    values = torch.randn(args.rows, width, generator=g) * 1e-3
    copied = torch.empty_like(weight)
    cases = {("copy", "copy_(weight)"): lambda: copied.copy_(weight)}
    dense = torch.zeros(n, width)
    dense[rows] = values
    for name in ("sgd", "adalomo"):
        rule = make_rule(UpdateConfig(rule=name, lr=1e-4))
        state = rule.init_state(weight, "model.embed_tokens.weight")
        cases[(name, "rows")] = lambda rule=rule, state=state: rule.update_rows(weight, rows, values, state, 1e-4)
        cases[(name, "dense")] = lambda rule=rule, state=state: rule.update(weight, dense, state, 1e-4)
    timed = {key: quantiles_ms(fn, repeats=args.repeats) for key, fn in cases.items()}
    print(f"{args.shape} bfloat16 embedding, {args.rows} rows with a gradient, {args.threads} threads")
    report_against(timed, ("copy", "copy_(weight)"), "update_rows", f"{args.shape} {args.rows} rows",
                   round(2 * n * width / 2**20, 1), width=10)


if __name__ == "__main__":
    main()
