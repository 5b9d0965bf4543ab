"""Shared benchmark plumbing: timing quantiles and CSV rows with device, torch version and date."""

from __future__ import annotations

import csv
import datetime
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.csv"
FIELDS = ["date", "device", "threads", "torch", "benchmark", "case", "provider", "p20_ms", "p50_ms", "p80_ms", "mb",
          "mb_reserved", "tokens_per_s", "note"]


def rss_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes: ``VmRSS`` (now) or ``VmHWM`` (the high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def llama_100m(max_positions: int = 1024):
    """The ~106M-parameter Llama the CPU benchmarks train (vocab 32000, hidden 768, 8 layers), seeded, no cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def quantiles_ms(fn, repeats: int = 20, warmup: int = 3) -> tuple[float, float, float]:
    """p20/p50/p80 wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
    return q[0], q[1], q[2]


def report_against(timed: dict, baseline: tuple[str, str], bench: str, shape: str, mb: float, width: int = 16) -> None:
    """Print ``timed`` ((op, provider) → p20/p50/p80 ms) with each p50's ratio to ``baseline``'s, and append the rows
    to results.csv as ``bench`` cases "op shape"."""
    reference = timed[baseline][1]
    print(f"{'update':<{width}} {'provider':<14} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} {'× ' + baseline[0]:>7}")
    rows = []
    for (op, provider), (p20, p50, p80) in timed.items():
        print(f"{op:<{width}} {provider:<14} {p20:8.2f} {p50:8.2f} {p80:8.2f} {p50 / reference:7.2f}")
        rows.append({**base_row(bench), "case": f"{op} {shape}", "provider": provider, "p20_ms": round(p20, 3),
                     "p50_ms": round(p50, 3), "p80_ms": round(p80, 3), "mb": mb})
    append_rows(rows)


def append_rows(rows: list[dict], path: Path = RESULTS) -> None:
    """Append ``rows`` to the CSV at ``path``; a file written with fewer columns gets the new ones first (empty)."""
    if path.exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
            f.seek(0)
            header = next(csv.reader(f), [])
        if header != FIELDS:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(old)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)


def base_row(benchmark: str) -> dict:
    return {"date": datetime.date.today().isoformat(), "device": device_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "benchmark": benchmark}
