"""LeMo's pattern predictor on the tiny Llama (4 layers, 2048-token sequences, the CPython docs): how well it finds
the blocks exact Q·K scoring keeps, and what it changes in a training run.

    python benchmarks/bench_predictor.py [--steps 150] [--refresh 25] [--threads 2]

1. Two runs of recipes/tiny-llama-pydoc-long.yaml (fused AdaLomo, checkpointing, chunked loss, layers 1..2 of 4 keep
   40% of their 64-token blocks), one selecting by the exact scores, one by the predictor refitted every
   ``--refresh`` steps: held-out perplexity, tokens/s, and the recall the trainer reports at each refit (the old
   predictor on the refit step's fresh batch, before it is refitted).
2. On the predictor run's final model, per sparse layer, fitted on one training sequence and scored on 8 held-out
   ones: the recall of the exact top blocks for the predictor, for the position-only rule (the number of queries
   that may attend each token, which the predictor also uses) and for a random choice, and the time to score a
   sequence exactly vs by the predictor.
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

ROOT = Path(__file__).resolve().parent.parent


def train(out: Path, steps: int, refresh: int | None, threads: int) -> dict:
    overrides = [f"train.max_steps={steps}", f"checkpoint.output_dir={out}", "log.progress=false",
                 "checkpoint.save_every_n_steps=null"]
    if refresh:
        overrides += ["tokens.predictor=true", f"tokens.refresh_every={refresh}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowmem.cli", "train", str(ROOT / "recipes/tiny-llama-pydoc-long.yaml"),
                    *overrides], check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"seconds": seconds, "val_ppl": [r["val_ppl"] for r in records if "val_ppl" in r][-1],
            "tokens_per_s": sorted(speeds)[len(speeds) // 2],
            "recalls": [(r["step"], r["token_recall"]) for r in records if "token_recall" in r]}


def held_out(model_path: Path, threads: int) -> list[dict]:
    import torch

    from lowmem.assets import pydoc_texts
    from lowmem.data import collate, pack, tokenize_text
    from lowmem.model import load_model, load_tokenizer
    from lowmem.activations.tokens import ScorePredictor, TokenEliminator, block_recall, query_counts

    torch.set_num_threads(threads)
    model = load_model(str(model_path), "float32").train()
    tokenizer = load_tokenizer(str(model_path))
    blocks = pack(tokenize_text(pydoc_texts(), tokenizer), 2048)
    sequences = [collate(blocks[i:i + 1], tokenizer.pad_token_id) for i in range(0, len(blocks), len(blocks) // 9)][:9]
    eliminator = TokenEliminator(model, 0.4, 1, 64)
    eliminator.remove()  # only its scoring: every layer runs dense, so each sees the inputs it has in training
    inputs: dict[int, list] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda layer, args, kwargs: inputs.setdefault(id(layer), []).append((args[0] if args else
                                                                              kwargs["hidden_states"], kwargs)),
        with_kwargs=True) for layer in eliminator.sparse]
    with torch.no_grad():
        for batch in sequences:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    rows = []
    for number, layer in enumerate(eliminator.sparse):
        seen = []
        for hidden, kwargs in inputs[id(layer)]:
            normed = layer.input_layernorm(hidden).detach()
            counts = query_counts(kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1], hidden.device)
            start = time.perf_counter()
            exact = eliminator.exact_token_scores(layer, normed, kwargs)
            exact_s = time.perf_counter() - start
            seen.append((normed, counts, exact, exact_s))
        predictor = ScorePredictor()
        normed, counts, exact, _ = seen[0]
        predictor.fit(normed, exact, counts)
        recall = {"predictor": [], "position only": [], "random": []}
        predict_s = []
        for normed, counts, exact, _ in seen[1:]:
            truth = eliminator.pool(exact)
            keep = eliminator.keep_count(truth.shape[1])
            start = time.perf_counter()
            predicted = eliminator.pool(predictor.predict(normed, counts))
            predict_s.append(time.perf_counter() - start)
            recall["predictor"].append(float(block_recall(predicted, truth, keep)))
            recall["position only"].append(float(block_recall(eliminator.pool(counts), truth, keep)))
            generator = torch.Generator().manual_seed(len(predict_s))
            recall["random"].append(float(block_recall(torch.rand(truth.shape, generator=generator), truth, keep)))
        rows.append({"layer": 1 + number, **{k: sum(v) / len(v) for k, v in recall.items()},
                     "exact_ms": 1e3 * sorted(s[3] for s in seen)[len(seen) // 2],
                     "predict_ms": 1e3 * sorted(predict_s)[len(predict_s) // 2]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--refresh", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from common import append_rows, base_row

    with tempfile.TemporaryDirectory() as tmp:
        exact = train(Path(tmp) / "exact", args.steps, None, args.threads)
        predicted = train(Path(tmp) / "predicted", args.steps, args.refresh, args.threads)
        layers = held_out(Path(tmp) / "predicted" / "final", args.threads)
    print(f"| blocks chosen by | val ppl after {args.steps} steps | tokens/s | run s | recall at refits |\n"
          "|---|---|---|---|---|")
    for name, r in (("exact Q·K scores", exact), (f"predictor (refit every {args.refresh})", predicted)):
        recalls = ", ".join(f"{v:.2f}" for _, v in r["recalls"]) or "—"
        print(f"| {name} | {r['val_ppl']:.1f} | {r['tokens_per_s']:.0f} | {r['seconds']:.0f} | {recalls} |")
    print("\n| sparse layer | recall: predictor | position only | random | exact scoring ms | predictor ms |\n"
          "|---|---|---|---|---|---|")
    for row in layers:
        print(f"| {row['layer']} | {row['predictor']:.3f} | {row['position only']:.3f} | {row['random']:.3f} | "
              f"{row['exact_ms']:.1f} | {row['predict_ms']:.2f} |")
    rows = [{**base_row("token_predictor"), "threads": args.threads, "case": f"tiny-llama 1x2048, {args.steps} steps",
             "provider": name, "note": f"val ppl {r['val_ppl']:.1f}; {r['tokens_per_s']:.0f} tok/s; recalls "
                                       + " ".join(f"{v:.3f}" for _, v in r["recalls"])}
            for name, r in (("exact", exact), ("predictor", predicted))]
    rows += [{**base_row("token_predictor"), "threads": args.threads, "case": f"held-out recall, layer {row['layer']}",
              "provider": "predictor", "p50_ms": round(row["predict_ms"], 2),
              "note": f"recall {row['predictor']:.3f} (position only {row['position only']:.3f}, random "
                      f"{row['random']:.3f}); exact scoring {row['exact_ms']:.1f} ms"} for row in layers]
    append_rows(rows)


if __name__ == "__main__":
    main()
