"""The ``lowmem`` command: thin wrappers over the package. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
from pathlib import Path

import click

from lowmem.errors import UserError, did_you_mean

log = logging.getLogger("lowmem")


def recipes_dir() -> Path:
    """The shipped recipes: package data ``lowmem/recipes`` in an installed wheel (setup.py maps the checkout's
    ``recipes/`` there), else ``recipes/`` of the source checkout lowmem runs from."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    folder = recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``lowmem ls``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    recipes = shipped_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    raise UserError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe{did_you_mean(name_or_path, recipes)}"
        " (see `lowmem ls`)"
    )


def setup_logging(verbose: bool) -> None:
    class TqdmHandler(logging.Handler):
        def emit(self, record):
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lowmem: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # their own bars (shard writing, dataset building) would interleave with lowmem's
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except Exception:  # cosmetic only
        pass


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """lowmem: memory-efficient full-parameter fine-tuning of LLMs."""
    setup_logging(verbose)


@main.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train in N processes on FSDP2 (one per GPU; gloo on CPU), launched by torch.distributed.run.")
@user_errors
def train(recipe: str, overrides: tuple[str, ...], nproc: int | None) -> None:
    """Fine-tune from RECIPE (a YAML file or a shipped recipe name), with section.key=value OVERRIDES.

    With --nproc N the global batch is N × train.batch_size × train.gradient_accumulation_steps; logs, metrics and
    checkpoints come from rank 0 (see README, "Several GPUs").

    \b
    Example:
      lowmem train tiny-llama-pydoc train.max_steps=20 update.lr=1e-3
      lowmem train tiny-llama-pydoc --nproc 2
    """
    from lowmem.config import load_config
    from lowmem.distributed.world import launched
    from lowmem.trainer import train as run_training

    config = load_config(resolve_recipe(recipe), overrides)  # checked before any process starts
    if nproc is not None and not launched():
        from lowmem.distributed.launch import launch_train

        launch_train(nproc, recipe, overrides)
        return
    result = run_training(config)
    if not result.main:  # a rank other than 0: rank 0 prints the summary
        return
    summary = {"output_dir": str(result.output_dir), "steps": result.steps, "final": str(result.final_dir)}
    if result.first_eval and result.last_eval:
        summary["val_ppl_before"] = round(result.first_eval["val_ppl"], 3)
        summary["val_ppl_after"] = round(result.last_eval["val_ppl"], 3)
    click.echo(json.dumps(summary))


@main.command(name="prune")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--output", "output", type=click.Path(file_okay=False), default=None,
              help="Folder for the pruned model (default: checkpoint.output_dir/pruned).")
@user_errors
def prune_command(recipe: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Prune the model of RECIPE by its prune section and write it as an HF folder, with its masks.

    Prints the sparsity reached per matrix and overall. Wanda measures its input norms on the first
    prune.calibration_batches batches of the recipe's training data. The folder (weights in model.dtype, float)
    is a model.path for lowmem train and lowmem eval; its masks.safetensors keeps the zeros during retraining.

    \b
    Example:
      lowmem prune tiny-llama-pydoc model.path=outputs/tiny-llama-pydoc/final prune.criterion=wanda prune.pattern=2:4
    """
    from lowmem import checkpoint as ckpt
    from lowmem.config import load_config
    from lowmem.data import build_datasets
    from lowmem.model import load_model, load_tokenizer, pick_device
    from lowmem.perp.retrain import calibration_batches, calibration_sequences, prune_from_config

    config = load_config(resolve_recipe(recipe), overrides)
    if config.prune.criterion == "none":
        raise UserError("prune: prune.criterion is none (set prune.criterion=magnitude or prune.criterion=wanda)")
    device = pick_device(config.train.device)
    if config.model.weight_format == "int8":
        log.warning("prune: model.weight_format=int8 is for training; the pruned model is written in %s, and a "
                    "training run quantizes it", config.model.dtype)
    if config.memory.budget_gb is not None:  # pruning runs on the device: planned like training (lowmem plan)
        import dataclasses

        from lowmem.trainer import check_budget

        float_weights = dataclasses.replace(config, model=dataclasses.replace(config.model, weight_format="float"))
        check_budget(float_weights, config.model.path, device, steps=0)
    tokenizer = load_tokenizer(config.model.path)
    model = load_model(config.model.path, config.model.dtype, device)

    def calibration():
        train = [] if config.data.streaming else build_datasets(config.data, tokenizer, config.train.seed).train
        return calibration_batches(config, calibration_sequences(config, tokenizer, train), tokenizer.pad_token_id)

    report = prune_from_config(model, config, calibration)
    folder = Path(output) if output else Path(config.checkpoint.output_dir) / "pruned"

    def write(tmp: Path) -> None:
        ckpt.save_model(model, tmp)
        ckpt.save_masks(model, tmp)
        tokenizer.save_pretrained(tmp)
        summary = {"criterion": config.prune.criterion, "pattern": config.prune.pattern, "source": config.model.path,
                   **report.to_dict()}
        (tmp / "prune_report.json").write_text(json.dumps(summary, indent=1))

    ckpt.publish_folder(write, folder)
    click.echo(report.table())
    click.echo(json.dumps({"output": str(folder), "sparsity": round(report.sparsity, 6),
                           "model_sparsity": round(report.model_sparsity, 6)}))


@main.command(name="plan")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--budget", default="24GB", show_default=True, help="Device memory to fit in (e.g. 24GB, 80GiB).")
@click.option("--steps", type=int, default=None, help="Steps to simulate (default: 2; HiFT: a cycle + 1).")
@click.option("--device", "target", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda adds the CUDA context, allocator and workspace terms.")
@click.option("--fit", "search", is_flag=True, help="Search the knobs for plans that fit, rank them, write the best.")
@click.option("--write", "write_to", type=click.Path(dir_okay=False), default=None,
              help="With --fit: where to write the chosen recipe (default: RECIPE-fit.yaml here).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plan one rank of a run in N processes (FSDP2 shards, gathered layers in flight).")
@user_errors
def plan_command(recipe: str, overrides: tuple[str, ...], budget: str, steps: int | None, target: str, search: bool,
                 write_to: str | None, nproc: int) -> None:
    """Predict the peak memory of RECIPE's training step by running it on fake tensors (no data, no GPU).

    Prints the peak by component. Exit 0 if it fits --budget, 3 if not, with one line naming the change that
    makes it fit. model.path may be a shipped config (lowmem ls lists them), e.g. model.path=lowmem:llama-3.1-8b.
    With --fit, searches strategy, rule, chunked loss, checkpointing, token elimination, int8 weights and the
    micro-batch for plans that fit, ranks them by matrix FLOPs per token and writes the fastest as a recipe.

    \b
    Example:
      lowmem plan llama3-8b-adalomo-24gb model.path=lowmem:llama-3.1-8b --budget 24GB
      lowmem plan tiny-llama-pydoc --fit --budget 200MB --device cpu
      lowmem plan llama3-8b-adalomo-24gb model.path=lowmem:llama-3.1-8b --nproc 2 --budget 16GB
    """
    from lowmem.config import load_config
    from lowmem.planner.plan import parse_bytes, simulate, suggestion_line

    config = load_config(resolve_recipe(recipe), overrides)
    limit = parse_bytes(budget)
    if search:
        if nproc > 1:
            raise UserError("plan: --fit searches one process's knobs; plan several processes without --fit")
        fit_command(config, recipe, limit, target, write_to)
        return
    plan = simulate(config, steps, target=target, nproc=nproc)
    click.echo(f"plan: {config.model.path}, {config.model.dtype}, {config.update.strategy} + {config.update.rule}, "
               f"{config.train.batch_size} x {config.data.max_seq_len} tokens x {config.train.gradient_accumulation_steps}"
               + (f", per rank of {nproc} processes (FSDP2)" if nproc > 1 else "")
               + f", {plan.steps} steps simulated in {plan.seconds:.1f} s")
    click.echo(plan.table())
    for note in plan.notes:
        click.echo(f"note: {note}")
    if plan.fits(limit):
        click.echo(f"fits: {plan.device_bytes / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB")
        return
    if nproc > 1:  # the knob search simulates one process
        click.echo(f"plan: needs {plan.device_bytes / 2**30:.2f} GiB per rank, over the {limit / 2**30:.2f} GiB budget "
                   "(more processes shard more; the knob search, --fit, plans one process)", err=True)
    else:
        click.echo(suggestion_line(config, plan, limit, target), err=True)
    sys.exit(3)


def fit_command(config, recipe: str, limit: int, target: str, write_to: str | None) -> None:
    import yaml

    from lowmem.config import with_overrides
    from lowmem.planner.plan import GiB, fit

    click.echo(f"fit: searching plans under {limit / GiB:.2f} GiB for {config.model.path}")
    found = fit(config, limit, target, progress=click.echo)
    if not found:
        click.echo(f"fit: no plan fits {limit / GiB:.2f} GiB (try a smaller model, data.max_seq_len or "
                   "train.batch_size)", err=True)
        sys.exit(3)
    best_flops = found[0].flops_per_token
    click.echo("rank  planned GiB  GFLOP/token  relative speed  changes")
    for i, candidate in enumerate(found, 1):
        click.echo(f"{i:>4}  {candidate.plan.device_bytes / GiB:>11.2f}  {candidate.flops_per_token / 1e9:>11.2f}  "
                   f"{best_flops / max(candidate.flops_per_token, 1):>14.2f}  {' '.join(candidate.overrides)}")
    chosen = with_overrides(config, found[0].overrides)
    path = Path(write_to or f"{Path(recipe).stem}-fit.yaml")
    header = (f"# lowmem plan --fit: {config.model.path} under {limit / GiB:.2f} GiB ({target}); planned "
              f"{found[0].plan.device_bytes / GiB:.2f} GiB\n# changes: {' '.join(found[0].overrides)}\n")
    path.write_text(header + yaml.safe_dump(chosen.to_dict(), sort_keys=False))
    click.echo(f"wrote {path}")


@main.command(name="eval")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--recipe", default=None,
              help="Evaluate on this recipe's held-out split (its data section and train.seed), as training does.")
@click.option("--data", "data_path", default=None,
              help="Or a whole dataset: .json/.jsonl/.txt/.parquet/.csv/.arrow file, folder or hub id.")
@click.option("--format", "fmt", default=None, type=click.Choice(["text", "alpaca", "sharegpt", "messages"]),
              help="With --data (default: text; --recipe takes its own).")
@click.option("--max-seq-len", default=None, type=int, help="With --data (default: 512; --recipe takes its own).")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "float64"]))
@click.option("--max-batches", default=None, type=int, help="Evaluate only the first N batches.")
@click.option("--loss-chunk-tokens", default=None, type=click.IntRange(min=0),
              help="Head and loss this many positions at a time (0: off; default: 512 from a 32k vocabulary).")
@user_errors
def eval_command(checkpoints, recipe, data_path, fmt, max_seq_len, batch_size, dtype, max_batches,
                 loss_chunk_tokens) -> None:
    """Loss and perplexity of each model in CHECKPOINTS (HF folders), one JSON line each.

    With --recipe, on the recipe's held-out split (data.val_path, or data.val_fraction of its rows drawn by
    train.seed: the split training validates on), e.g. to compare the dense, pruned and retrained models; with --data,
    on a whole dataset.

    \b
    Example:
      lowmem eval outputs/dense/final outputs/run/pruned outputs/run/final --recipe tiny-llama-pydoc
    """
    from lowmem.config import DataConfig, load_config
    from lowmem.data import build_datasets, eval_batches
    from lowmem.activations.loss import check_chunked_head, chunk_tokens_for, evaluate
    from lowmem.model import load_model, load_tokenizer, pick_device

    if (recipe is None) == (data_path is None):
        raise UserError("eval: give exactly one of --recipe (its held-out split) and --data (a whole dataset)")
    if recipe is not None and (fmt is not None or max_seq_len is not None):
        raise UserError("eval: --format and --max-seq-len go with --data; --recipe reads data.format and "
                        "data.max_seq_len from the recipe (drop them, or override them in a copy of the recipe)")
    fmt, max_seq_len = fmt or "text", max_seq_len or 512
    device = pick_device("auto")
    examples = None
    for checkpoint in checkpoints:
        tokenizer = load_tokenizer(checkpoint)
        if examples is None:  # tokenized once, with the first model's tokenizer (the models are one family)
            if recipe is not None:
                config = load_config(resolve_recipe(recipe))
                data = build_datasets(config.data, tokenizer, config.train.seed)
                examples = data.val
                if not examples:
                    raise UserError(f"eval: {recipe} has no held-out split (data.val_fraction is "
                                    f"{config.data.held_out_fraction()}, no data.val_path)")
            else:
                data = build_datasets(DataConfig(path=data_path, format=fmt, max_seq_len=max_seq_len,
                                                 val_fraction=0.0), tokenizer, seed=0)
                examples = data.train
        model = load_model(checkpoint, dtype, device)
        chunk = chunk_tokens_for(loss_chunk_tokens, model.config.vocab_size)
        if chunk:
            check_chunked_head(model)
        scores = evaluate(model, eval_batches(examples, batch_size, tokenizer.pad_token_id, max_batches), device,
                          chunk)
        if not scores:
            raise UserError(f"eval: {recipe or data_path} has no label tokens to evaluate")
        click.echo(json.dumps({"model": checkpoint, "loss": scores["val_loss"], "perplexity": scores["val_ppl"],
                               "tokens": scores["val_tokens"]}))
        del model


@main.command(name="ls")
def ls_command() -> None:
    """List the shipped recipes with the first line of their description."""
    recipes = shipped_recipes()
    if not recipes:
        click.echo(f"no recipes found in {recipes_dir()}")
        return
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        click.echo(f"{name:<{width}}  {lines[0] if lines else ''}")
    from lowmem.assets import model_configs

    configs = model_configs()
    if configs:
        click.echo("\nmodel configs for lowmem plan (model.path=lowmem:NAME): " + ", ".join(configs))


@main.command(name="cp")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@user_errors
def cp_command(name: str, dest: str, force: bool) -> None:
    """Copy the shipped recipe NAME to DEST (a file or a folder) to edit it."""
    recipes = shipped_recipes()
    if name not in recipes:
        raise UserError(f"recipe '{name}' is not shipped{did_you_mean(name, recipes)} (see `lowmem ls`)")
    target = Path(dest)
    if target.is_dir():
        target = target / recipes[name].name
    if target.exists() and not force:
        raise UserError(f"{target} exists (pass --force to overwrite)")
    shutil.copyfile(recipes[name], target)
    click.echo(str(target))


@main.command(name="env")
def env_command() -> None:
    """Versions, devices, and whether the native extension is built (or why not)."""
    import torch

    from lowmem.ops import build
    from lowmem.ops.native import status

    native = status()
    with_cuda, why = build.want_cuda(torch.version.cuda)
    rows = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "cuda available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "nvcc": build.find_nvcc() or "not found",
        "native ops": f"{native.source} ({native.reason})",
        "native CUDA kernels": "built" if native.with_cuda else f"not built ({why if not with_cuda else 'rebuild lowmem'})",
    }
    for package in ("transformers", "datasets", "bitsandbytes", "safetensors", "tokenizers"):
        try:
            rows[package] = __import__(package).__version__
        except Exception as err:  # report, never fail: env is the diagnosis command
            rows[package] = f"unavailable ({type(err).__name__})"
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
