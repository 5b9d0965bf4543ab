"""The fused int8-weight update (issue 22) against a plain copy of the gradient, side by side in one run.

    python benchmarks/bench_int8_update.py [--threads 2] [--shape 4096x4096] [--repeats 10]

One weight of ``--shape`` (int8 codes, 1% float32 outliers) with a float32 gradient. Rows, each p20/p50/p80 ms and
its ratio to the copy (``copy_(grad)`` into a tensor made once: the gradient read and written once, 2 × 64 MiB at 4096 × 4096):
    int8 RULE native      ``Int8Weight.update_with``: the fused op (an ordinary step; factored rules include their
                          reductions, ``int8_factored_prepare``)
    int8 RULE refresh     the same step when it refreshes the outliers and scales (every ``refresh_every`` steps)
    int8 sgd reference    the op's pure-PyTorch reference (the fallback without the extension), with --reference
    float RULE native     the float32 weight's own fused update (``lowmem.ops.update``), for comparison
Appends rows to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse

import torch

from common import quantiles_ms, report_against
from lowmem.config import UpdateConfig
from lowmem.weights.int8 import Int8Weight
from lowmem.ops import int8_update as iu
from lowmem.ops.native import ensure_loaded
from lowmem.rules import make_rule

RULES = ("sgd", "lion", "lion8bit", "adalomo", "adafactor")


def int8_step(rule_name: str, weight: torch.Tensor, grad: torch.Tensor, refresh: bool):
    rule = make_rule(UpdateConfig(rule=rule_name, lr=1e-4))
    w = Int8Weight(weight, outlier_fraction=0.01, refresh_every=1 if refresh else 0)
    state = rule.init_state(w.template(), "mlp.up_proj.weight")
    return lambda: w.update_with(rule, grad, state, 1e-4)


def int8_sgd_reference(weight: torch.Tensor, grad: torch.Tensor):
    w = Int8Weight(weight, outlier_fraction=0.01, refresh_every=0)
    none, scale = torch.empty(0), torch.tensor(1.0)
    return lambda: iu.int8_update_ref(w.codes, w.absmax, w.outlier_index, w.outlier_value, grad,
                                      torch.empty(0, dtype=torch.bool), none, none, none, none, scale, iu.SGD, 1e-4,
                                      0.0, 0.0, 0.0, w.seed, 1, False, True, w.blocksize)


def float_step(rule_name: str, weight: torch.Tensor, grad: torch.Tensor):
    rule = make_rule(UpdateConfig(rule=rule_name, lr=1e-4))
    w = weight.clone()
    state = rule.init_state(w, "mlp.up_proj.weight")
    return lambda: rule.update(w, grad, state, 1e-4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference", action="store_true", help="also time the PyTorch reference (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert ensure_loaded().loaded, "build the extension first (make install)"
    shape = tuple(int(s) for s in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g) * 0.02
    grad = torch.randn(shape, generator=g) * 1e-3
    copied = torch.empty_like(grad)
    cases = {("copy", "copy_(grad)"): lambda: copied.copy_(grad)}
    for rule in RULES:
        cases[(f"int8 {rule}", "native")] = int8_step(rule, weight, grad, refresh=False)
        cases[(f"int8 {rule}", "refresh")] = int8_step(rule, weight, grad, refresh=True)
        if rule != "lion8bit":
            cases[(f"float {rule}", "native")] = float_step(rule, weight, grad)
    if args.reference:
        cases[("int8 sgd", "reference")] = int8_sgd_reference(weight, grad)
    timed = {key: quantiles_ms(fn, repeats=args.repeats) for key, fn in cases.items()}
    print(f"{args.shape} float32 gradient, {args.threads} threads")
    report_against(timed, ("copy", "copy_(grad)"), "int8_update", args.shape, round(4 * shape[0] * shape[1] / 2**20, 1))


if __name__ == "__main__":
    main()
