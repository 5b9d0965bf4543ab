"""Full fine-tuning on real-size Llama shapes (random weights), side by side: peak GPU memory and throughput.

    python benchmarks/bench_gpu.py                       # on a GPU: Llama-3.2-1B- and Llama-3-8B-like configs
    python benchmarks/bench_gpu.py --device cpu          # the same providers on tiny stand-in configs (CI runs this)
    options: --steps 4 --tokens 2048 --only NAME,NAME --out results.csv --[no-]isolate (a process per provider;
             default on a GPU) --cap-to-plan (each lowmem row capped at its plan: does the plan suffice?)
             --cap GiB (every row on a card of that size: the allocator capped at GiB minus the CUDA context)

Each provider trains a fresh model built from ``benchmarks/configs/*.json`` (architecture values only, random
weights) in bfloat16 with gradient checkpointing, batch 1 × ``--tokens`` random tokens, for ``--steps`` steps:

    baselines   torch AdamW (fused) in the plain loop; torch AdamW stepped inside backward (one optimizer per
                parameter from ``register_post_accumulate_grad_hook``: torchtune's optimizer-in-backward);
                bitsandbytes PagedAdamW8bit and lomo-optim AdaLomo where they import;
    lowmem      fused + adalomo; fused + lion8bit with int8 weights; hift + adamw with ``offload_states`` and
                ``offload_frozen_weights`` (4 groups, two full cycles: its tokens/s of the first cycle beside the
                steady state's, from the second on); and each shipped 24 GB recipe on its model's shape, with the
                recipe's own settings.

On a GPU: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the provider's whole run (model
included; reset between providers), tokens/s over the steps after the first. Each lowmem row also carries what
``lowmem plan`` predicts for it (simulated on fake tensors before the model is built: counted bytes, and with the
modeled CUDA terms), to compare with ``max_memory_allocated`` and ``max_memory_reserved`` and calibrate the model. On CPU the peak is the process's RSS
high-water mark (reset per provider through /proc/self/clear_refs). Rows are appended to benchmarks/results.csv
(or ``--out``) and a markdown table is printed. A provider that runs out of memory or cannot run is a row too.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, append_rows, base_row, rss_bytes  # noqa: E402

CONFIGS = {"cuda": ["llama-3.2-1b", "llama-3-8b"], "cpu": ["tiny-llama-tied", "tiny-llama"]}
# Each shipped 24 GB recipe runs on its model's shape (on CPU: the untied tiny stand-in).
RECIPES = {"llama3-8b-adalomo-24gb": "llama-3-8b", "llama2-7b-lomo-24gb": "llama-2-7b", "llama2-7b-qft-24gb": "llama-2-7b",
           "llama3-8b-adalomo-int8-16gb": "llama-3-8b", "qwen2.5-14b-adalomo-int8-24gb": "qwen2.5-14b"}
PROVIDERS = {
    "torch AdamW (fused)": dict(peer="adamw"),
    "torch AdamW in backward": dict(peer="adamw-in-backward"),
    "bnb PagedAdamW8bit": dict(peer="paged-adamw8bit"),
    "lomo-optim AdaLomo": dict(peer="lomo-adalomo"),
    "lowmem fused+adalomo": dict(overrides=["update.strategy=fused", "update.rule=adalomo", "update.lr=5e-4",
                                            "update.clip_grad_norm=null"]),
    "lowmem fused+adalomo int8w": dict(overrides=["update.strategy=fused", "update.rule=adalomo", "update.lr=5e-4",
                                                  "model.weight_format=int8", "update.clip_grad_norm=null"]),
    "lowmem fused+lion8bit int8w": dict(overrides=["update.strategy=fused", "update.rule=lion8bit", "update.lr=1e-5",
                                                   "model.weight_format=int8", "update.clip_grad_norm=null"]),
    "lowmem hift+adamw offload": dict(overrides=["update.strategy=hift", "update.rule=adamw", "update.lr=1e-5",
                                                 "memory.offload_states=true", "memory.offload_frozen_weights=true"]),
    **{f"recipe {name}": dict(recipe=name) for name in RECIPES},
}
LR = 1e-5  # the baselines' AdamW lr


def build_model(config_name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(HERE / "configs" / f"{config_name}.json")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    model.train()
    return model


def make_batches(vocab: int, tokens: int, steps: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (1, tokens), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device),
                    "attention_mask": torch.ones_like(ids).to(device)})
    return out


def peer_step(name: str, model, device: torch.device):
    """One step of a baseline on a loss (backward included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=LR, fused=fused)
    elif name == "paged-adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=LR)
    elif name == "lomo-adalomo":
        import lomo_optim

        adalomo = lomo_optim.AdaLomo(model, lr=5e-4)
        return lambda loss: adalomo.fused_backward(loss, 5e-4)
    elif name == "adamw-in-backward":
        optimizers = {p: torch.optim.AdamW([p], lr=LR, fused=fused) for p in params}

        def apply(p: torch.Tensor) -> None:
            optimizers[p].step()
            optimizers[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(apply)
        return lambda loss: loss.backward()
    else:
        raise ValueError(name)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def load_recipe(spec: dict):
    """The spec's recipe (lowmem providers without one take the 8B AdaLomo recipe's model and memory settings) with
    the spec's overrides; None for a baseline."""
    from lowmem.config import load_config

    if "recipe" not in spec and "overrides" not in spec:
        return None
    return load_config(HERE.parent / "recipes" / f"{spec.get('recipe', 'llama3-8b-adalomo-24gb')}.yaml",
                       spec.get("overrides", []))


def lowmem_step(config, model, device: torch.device, n_steps: int):
    """The recipe's strategy and rule on ``model`` (int8 weights when the recipe says so); returns (step function,
    steps to run, HiFT's cycle length or None)."""
    from lowmem.weights.int8 import quantize_model
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy
    from lowmem.placement.units import discover_units

    if config.model.weight_format == "int8":
        i8 = config.model.int8
        quantize_model(model, i8.outlier_fraction, i8.refresh_every, i8.blocksize, config.train.seed,
                       i8.stochastic_rounding, include_head=i8.include_head)
    cycle = None
    if config.update.strategy == "hift":  # 4 groups: two full cycles and one step more, for the steady state
        config.hift.group_size = math.ceil(len(discover_units(model)) / 4)
        cycle = math.ceil(len(discover_units(model)) / config.hift.group_size)
        n_steps = max(n_steps, 2 * cycle + 1)
    strategy = make_strategy(config.update.strategy, model, make_rule(config.update), config.update, config, device)

    def step(loss_fn) -> torch.Tensor:
        strategy.prepare(config.update.lr)
        loss = loss_fn()
        strategy.backward(loss)
        strategy.step()
        return loss

    return step, n_steps, cycle


def plan_for(recipe, config_name: str, args, device: torch.device):
    """``lowmem plan`` of what this row runs: the recipe on the row's model shape, 1 × ``--tokens`` tokens, as many
    steps (HiFT: its 4 groups, as :func:`lowmem_step` sets them)."""
    import copy

    from lowmem.planner.plan import simulate
    from lowmem.placement.units import discover_units

    config = copy.deepcopy(recipe)
    config.model.path = str(HERE / "configs" / f"{config_name}.json")
    config.data.max_seq_len, config.train.batch_size = args.tokens, 1
    steps = args.steps
    if config.update.strategy == "hift":
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model.path))
        config.hift.group_size = math.ceil(len(discover_units(shape)) / 4)
        steps = max(steps, 2 * math.ceil(len(discover_units(shape)) / config.hift.group_size) + 1)
    return simulate(config, steps=steps, target=device.type)


def run_provider(name: str, spec: dict, config_name: str, args, device: torch.device) -> dict:
    from lowmem.activations.loss import chunk_tokens_for, count_label_tokens, loss_sum
    from lowmem.model import DTYPES, enable_gradient_checkpointing

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    n_steps = args.steps
    recipe = load_recipe(spec)
    if recipe is not None and recipe.tokens.eliminate and device.type == "cpu":
        # the CPU stand-in has 2 layers, fewer than the recipe's model: keep one sparse layer (the last is dense)
        layers = json.loads((HERE / "configs" / f"{config_name}.json").read_text())["num_hidden_layers"]
        recipe.tokens.dense_layers = min(recipe.tokens.dense_layers, layers - 2)
    planned = plan_for(recipe, config_name, args, device) if recipe else None
    if device.type == "cuda" and args.cap:
        # a card of args.cap GiB: its context lives outside the allocator, as on that card
        from lowmem.planner.plan import CUDA_CONTEXT_BYTES

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((args.cap * 2**30 - CUDA_CONTEXT_BYTES) / total, device)
    elif planned is not None and args.cap_to_plan:
        # the allocator may hold what the plan says minus the context (which lives outside it): a run that cannot
        # is an out-of-memory row, so the planner's modeled terms are checked, not only compared
        from lowmem.planner.plan import CUDA_CONTEXT_BYTES

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((planned.device_bytes - CUDA_CONTEXT_BYTES) / total, device)
    model = build_model(config_name, DTYPES[recipe.model.dtype] if recipe else torch.bfloat16, device)
    if recipe is None or recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    cycle = None
    if recipe is None:
        apply = peer_step(spec["peer"], model, device)

        def step(loss_fn) -> torch.Tensor:
            loss = loss_fn()
            apply(loss)
            return loss
    else:
        step, n_steps, cycle = lowmem_step(recipe, model, device, n_steps)
    # lowmem rows compute the loss as their recipe does (chunked from a 32k vocabulary unless it says otherwise)
    chunk = chunk_tokens_for(recipe.memory.loss_chunk_tokens, model.config.vocab_size) if recipe else 0
    batches = make_batches(model.config.vocab_size, args.tokens, n_steps, device)
    losses, times = [], []
    for batch in batches:
        tokens = count_label_tokens(batch)
        start = time.perf_counter()
        loss = step(lambda: loss_sum(model, batch, chunk) / tokens)
        losses.append(float(loss.detach()))  # waits for the step: the time below is the step's
        times.append(time.perf_counter() - start)
    # HiFT: its steady state is the second cycle on (the first makes every group's state and pins every host copy)
    steady = times[cycle:] if cycle else (times[1:] or times)
    row = {"tokens_per_s": args.tokens * len(steady) / sum(steady), "step_ms": 1e3 * sorted(steady)[len(steady) // 2],
           "losses": losses, "steps": n_steps, "planned_counted": planned.counted_bytes if planned else None,
           "planned": planned.device_bytes if planned else None}
    if cycle:
        row["first_cycle_tokens_per_s"] = args.tokens * cycle / sum(times[:cycle])
    if device.type == "cuda":
        row.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        # What the device holds outside torch's caching allocator (the CUDA context, library handles): the
        # planner's modeled context term is calibrated from this.
        free, total = torch.cuda.mem_get_info()
        row.update(outside_allocator=total - free - torch.cuda.memory_reserved())
    else:
        row.update(allocated=rss_bytes("VmHWM"), reserved=None)
    del model, step, batches
    return row


def measure(name: str, config_name: str, args) -> dict:
    """run_provider's row, or ``{"error": ...}`` for a provider that cannot run (``failed``: for a reason other than
    a missing package or the memory), so the others still run."""
    try:
        return run_provider(name, PROVIDERS[name], config_name, args, torch.device(args.device))
    except ImportError as err:
        return {"error": f"not installed ({err.name})"}
    except torch.cuda.OutOfMemoryError:
        return {"error": f"out of memory (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}", "failed": True}


def isolated(name: str, config_name: str, args) -> dict:
    """:func:`measure` in a fresh process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, name, config_name, args).result()


def cases(device: torch.device, only: set[str] | None) -> list[tuple[str, dict, str]]:
    out = []
    for name, spec in PROVIDERS.items():
        if only and name not in only:
            continue
        if "recipe" in spec:
            out.append((name, spec, RECIPES[spec["recipe"]] if device.type == "cuda" else CONFIGS["cpu"][-1]))
        else:
            out.extend((name, spec, config) for config in CONFIGS[device.type])
    return out


def csv_row(r: dict, args, device: torch.device) -> dict:
    """The results.csv row of one provider's result."""
    base = {**base_row("train_gpu" if device.type == "cuda" else "train_gpu_cpu_mode"),
            "case": f"{r['config']} bf16 1x{args.tokens} ckpt" + (" capped to plan" if args.cap_to_plan else "")
            + (f" capped at {args.cap:g} GiB" if args.cap else ""),
            "provider": r["provider"]}
    if "error" in r:
        return {**base, "note": r["error"]}
    return {**base, "p50_ms": round(r["step_ms"], 1), "mb": round(r["allocated"] / 2**20, 1),
            "mb_reserved": round(r["reserved"] / 2**20, 1) if r["reserved"] is not None else "",
            "tokens_per_s": round(r["tokens_per_s"], 1),
            "note": json.dumps({"loss": [round(x, 4) for x in r["losses"]], "steps": r["steps"],
                                "planned_counted_bytes": r["planned_counted"], "planned_bytes": r["planned"],
                                "outside_allocator_bytes": r.get("outside_allocator"),
                                "first_cycle_tokens_per_s": r.get("first_cycle_tokens_per_s")})}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--only", default=None, help="comma-separated provider names")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each provider in a fresh process (default on a GPU): what one provider leaves behind "
                             "(a model kept alive by its hooks' reference cycles, a CUDA context's caches) cannot "
                             "count in the next one's peak")
    parser.add_argument("--cap-to-plan", action="store_true",
                        help="on a GPU, run each lowmem row with the caching allocator capped at what `lowmem plan` "
                             "predicts for it (torch.cuda.set_per_process_memory_fraction): a row that does not "
                             "fit says out of memory")
    parser.add_argument("--cap", type=float, default=None,
                        help="on a GPU, run every row as on a card of this many GiB: the caching allocator capped at "
                             "it minus the CUDA context (torch.cuda.set_per_process_memory_fraction)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.isolate is None:
        args.isolate = device.type == "cuda"
    if args.cap_to_plan and device.type != "cuda":
        parser.error("--cap-to-plan caps the CUDA caching allocator: it needs --device cuda")
    if args.cap and (device.type != "cuda" or args.cap_to_plan or not args.isolate):
        parser.error("--cap caps the CUDA caching allocator for the process: it needs --device cuda and --isolate, "
                     "and not --cap-to-plan")
    if args.cap_to_plan and not args.isolate:
        parser.error("--cap-to-plan needs --isolate: the cap holds for the rest of the process")
    results = []
    gib = 2**30 if device.type == "cuda" else 2**20
    unit = "GiB" if device.type == "cuda" else "MiB (peak RSS)"
    print(f"| config | provider | max allocated {unit} | max reserved {unit} (÷ allocated) | planned counted / with "
          f"modeled {unit} | tokens/s (HiFT: first cycle → steady) | loss first → last |")
    print("|---|---|---|---|---|---|---|")
    for name, _, config_name in cases(device, set(args.only.split(",")) if args.only else None):
        row = isolated(name, config_name, args) if args.isolate else measure(name, config_name, args)
        if "error" in row:
            failed = "failed: " if row.pop("failed", False) else ""
            line = f"| {config_name} | {name} | {failed}{row['error']} | | | | |"
        else:
            reserved = (f"{row['reserved'] / gib:.2f} ({row['reserved'] / row['allocated']:.2f})"
                        if row["reserved"] is not None else "–")
            speed = f"{row['tokens_per_s']:.0f}"
            if row.get("first_cycle_tokens_per_s"):
                speed = f"{row['first_cycle_tokens_per_s']:.0f} → {speed}"
            planned = (f"{row['planned_counted'] / gib:.2f} / {row['planned'] / gib:.2f}" if row["planned"] is not None
                       else "–")
            line = (f"| {config_name} | {name} | {row['allocated'] / gib:.2f} | {reserved} | {planned} | "
                    f"{speed} | {row['losses'][0]:.3f} → {row['losses'][-1]:.3f} |")
        print(line, flush=True)
        results.append({"provider": name, "config": config_name, **row})
        append_rows([csv_row(results[-1], args, device)], Path(args.out))  # row by row: a timeout loses none
    return results


if __name__ == "__main__":
    main()
