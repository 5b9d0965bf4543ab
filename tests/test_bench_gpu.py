"""benchmarks/bench_gpu.py (what `make gpu-check` runs on a GPU) in its CPU mode, so it cannot rot unseen."""

import csv
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_benchmark_runs_every_provider_in_cpu_mode(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import bench_gpu

    out = tmp_path / "results.csv"
    results = bench_gpu.main(["--device", "cpu", "--steps", "2", "--tokens", "64", "--out", str(out)])
    expected = {(name, config) for name, _, config in bench_gpu.cases(bench_gpu.torch.device("cpu"), None)}
    assert {(r["provider"], r["config"]) for r in results} == expected
    assert {r["provider"] for r in results} == set(bench_gpu.PROVIDERS)
    # only an optional peer may be missing or refuse the CPU: lomo-optim is no dependency, its AdaLomo needs CUDA
    failed = {r["provider"] for r in results if "error" in r}
    assert failed <= {"lomo-optim AdaLomo"}, [r for r in results if "error" in r]
    for r in results:
        if "error" not in r:
            assert r["allocated"] > 0 and r["tokens_per_s"] > 0 and all(math.isfinite(x) for x in r["losses"])
    for r in results:  # every lowmem row carries its plan; on CPU it is the counted bytes alone
        if r["provider"].startswith(("lowmem", "recipe")) and "error" not in r:
            assert r["planned"] == r["planned_counted"] > 0
    hift = next(r for r in results if r["provider"] == "lowmem hift+adamw offload")
    assert hift["steps"] == 9  # two full cycles of 4 groups, and one step more
    assert hift["first_cycle_tokens_per_s"] > 0  # reported beside the steady state's (the second cycle on)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == len(results) and {row["benchmark"] for row in rows} == {"train_gpu_cpu_mode"}
