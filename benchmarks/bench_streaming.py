"""Host memory of reading training data: in memory (build_datasets + BatchStream) against data.streaming.

Writes a text JSONL file of ``--mb`` MiB (pydoc topics repeated with their index, so no two rows are equal) and, each
in a process of its own, reads it the way ``lowmem train`` does up to the first ``--batches`` batches of 8 × 512
tokens: peak RSS (VmHWM) of the process above what it held before reading, and seconds to the first batch. The
in-memory peak grows with the file; the stream's stays at its buffer.

    python benchmarks/bench_streaming.py --mb 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, base_row, rss_bytes  # noqa: E402


def write_corpus(path: Path, mib: int) -> int:
    from lowmem.assets import pydoc_texts

    texts, rows, written = pydoc_texts(), 0, 0
    with open(path, "w") as f:
        while written < mib << 20:
            line = json.dumps({"text": f"{rows}: {texts[rows % len(texts)][:4000]}"}) + "\n"
            f.write(line)
            written += len(line)
            rows += 1
    return rows


def measure(path: str, mode: str, batches: int) -> dict:
    from lowmem.config import DataConfig
    from lowmem.data import BatchStream, build_datasets
    from lowmem.data_stream import StreamingBatches
    from lowmem.model import load_tokenizer

    tokenizer = load_tokenizer("lowmem:tiny-llama")
    before = rss_bytes("VmRSS")
    start = time.perf_counter()
    config = DataConfig(path=path, max_seq_len=512, streaming=mode == "streaming")
    if mode == "streaming":
        stream = StreamingBatches(config, tokenizer, 8, 0, tokenizer.pad_token_id)
    else:
        stream = BatchStream(build_datasets(config, tokenizer, 0).train, 8, 0, tokenizer.pad_token_id)
    stream.next()
    first = time.perf_counter() - start
    for _ in range(batches - 1):
        stream.next()
    return {"mode": mode, "peak_mib": (rss_bytes("VmHWM") - before) / 2**20, "first_batch_s": first,
            "batches_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="size of the generated JSONL file in MiB")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batches)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        rows = write_corpus(path, args.mb)
        results = []
        for mode in ("in_memory", "streaming"):
            out = subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--measure", str(path),
                                  mode], check=True, capture_output=True, text=True,
                                 env={**__import__("os").environ, "HF_DATASETS_CACHE": str(Path(tmp) / "cache")})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.mb} MiB, {rows} rows; {args.batches} batches of 8 x 512 tokens")
    print(f"{'mode':<10} {'peak MiB':>9} {'first batch s':>14} {'all batches s':>14}")
    for r in results:
        print(f"{r['mode']:<10} {r['peak_mib']:9.0f} {r['first_batch_s']:14.1f} {r['batches_s']:14.1f}")
    append_rows([{**base_row("data_streaming"), "case": f"{args.mb} MiB jsonl, {args.batches} batches 8x512",
                  "provider": r["mode"], "p50_ms": round(r["first_batch_s"] * 1e3, 1), "mb": round(r["peak_mib"], 1),
                  "note": f"p50_ms: time to the first batch; mb: peak RSS above the start; "
                          f"{r['batches_s']:.1f} s to batch {args.batches}"} for r in results])


if __name__ == "__main__":
    main()
