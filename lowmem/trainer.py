"""The training loop, and nothing else: recipe → model + data → :class:`lowmem.Update` → steps → checkpoints.

Per optimizer step: the lr for this step, ``gradient_accumulation_steps`` micro-batches whose summed
token losses are divided by the label tokens of the whole step (so 2×2 equals a batch of 4 exactly),
the update's backward per micro-batch and its ``step()`` at the end; then metrics, validation and
checkpoints at their intervals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowmem import assets
from lowmem import checkpoint as ckpt
from lowmem.api import Update
from lowmem.config import Config
from lowmem.data import BatchStream, build_datasets, eval_batches, fingerprint
from lowmem.data_stream import StreamingBatches, stream_fingerprint
from lowmem.distributed.gather import export_final as distributed_export
from lowmem.distributed.shard import load_state_shards, materialize, reshard, shard_model, state_layout
from lowmem.distributed.sharded_checkpoint import is_sharded_checkpoint, load_rule_state, read_weights
from lowmem.distributed.sharded_checkpoint import save_checkpoint as distributed_save
from lowmem.distributed.support import check_resume, check_rule_on_shards, check_supported
from lowmem.distributed.world import World, teardown
from lowmem.distributed.world import setup as distributed_setup
from lowmem.errors import UserError
from lowmem.placement.host_sync import read_all
from lowmem.activations.loss import chunk_tokens_for, count_label_tokens, evaluate, loss_sum, resolve_chunk_tokens
from lowmem.metrics import MetricsLog, Progress, SavedTensorBytes, format_bytes, peak_memory_bytes, peak_memory_record
from lowmem.model import load_model, load_tokenizer, pick_device
from lowmem.ops.native import ensure_loaded
from lowmem.perp.retrain import Retraining, calibration_batches, calibration_sequences, prepare
from lowmem.resume import check_compatible, check_same_data
from lowmem.schedule import learning_rate
from lowmem.activations.tokens import TokenEliminator

log = logging.getLogger("lowmem")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, of this invocation
    first_eval: dict | None = None
    last_eval: dict | None = None
    final_dir: Path | None = None
    retraining: Retraining | None = None  # what trained (update.trainable), and the pruning report of this run
    main: bool = True  # false on the ranks of a distributed run other than 0 (rank 0 reports)


def total_steps(config: Config, n_train: int | None, nproc: int = 1) -> int:
    """train.max_steps, or train.epochs over ``n_train`` sequences (None: streamed, and max_steps is required) in
    global batches of ``nproc`` processes."""
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps * nproc
    if config.train.max_steps is not None:
        return config.train.max_steps
    steps = config.train.epochs * (n_train // per_step)
    if steps == 0:
        raise UserError(
            f"data: {n_train} training sequences are fewer than one step needs (train.batch_size × "
            f"train.gradient_accumulation_steps{' × nproc' if nproc > 1 else ''} = {per_step}); lower them or set "
            "train.max_steps"
        )
    return steps


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers this process holds (distributed: its shards)."""
    from lowmem.distributed.shard import local

    return sum(local(t).nbytes for t in [*model.parameters(), *model.buffers()])


def find_resume_point(config: Config) -> Path | None:
    resume = config.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(Path(config.checkpoint.output_dir))
    return Path(resume)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on ``device``. To a GPU it goes through pinned memory without blocking: a copy from pageable
    memory would wait for everything queued on the device first."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def check_budget(config: Config, weights: str, device: torch.device, steps: int | None = None) -> None:
    """Simulate the run's steps (``lowmem plan``; ``steps=0``: its pruning alone, as ``lowmem prune`` runs it) before
    anything is allocated; refuse it if it needs more than ``memory.budget_gb`` (``auto``: what the device has free)."""
    import dataclasses

    from lowmem.planner.plan import CUDA_CONTEXT_BYTES, GiB, simulate, suggestion_line

    if config.memory.budget_gb == "auto":
        if device.type == "cuda":
            # the free memory is measured once this process's CUDA context exists, while the plan counts one
            budget = torch.cuda.mem_get_info(device)[0] + CUDA_CONTEXT_BYTES
        else:
            budget = available_host_bytes()
    else:
        budget = int(float(config.memory.budget_gb) * GiB)
    planned = dataclasses.replace(config, model=dataclasses.replace(config.model, path=weights))
    plan = simulate(planned, steps=steps, target=device.type)
    if not plan.fits(budget) and steps == 0:
        raise UserError(f"memory.budget_gb: pruning needs {plan.device_bytes / GiB:.2f} GiB, over the {budget / GiB:.2f} "
                        "GiB budget (prune on a larger device, or with train.device=cpu)")
    if not plan.fits(budget):
        raise UserError(f"memory.budget_gb: {suggestion_line(planned, plan, budget, device.type)}")
    log.info("plan: %.2f GiB planned of %.2f GiB (memory.budget_gb %s; %d steps simulated in %.1f s)",
             plan.device_bytes / GiB, budget / GiB, config.memory.budget_gb, plan.steps, plan.seconds)


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (what the host can give without swapping)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise UserError("memory.budget_gb=auto: /proc/meminfo has no MemAvailable (set a size in GiB)")


def train(config: Config, step_guard=None) -> TrainResult:
    """Run the recipe ``config``; ``step_guard`` (a context manager factory, e.g.
    :class:`lowmem.placement.host_sync.ForbidHostReads`) wraps each step's work, from the batch transfer to the
    update."""
    world, device_name = distributed_setup(config.train.device)
    try:
        return _train(config, step_guard, world, pick_device(device_name))
    finally:
        teardown(world)


def _train(config: Config, step_guard, world: World, device: torch.device) -> TrainResult:
    output_dir = Path(config.checkpoint.output_dir)
    native = ensure_loaded()
    log.info("native ops: %s", native.source)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)

    if world.is_main:
        ckpt.remove_stale_temporaries(output_dir)
    world.barrier()
    resume_from = find_resume_point(config)
    resume_state = ckpt.load_trainer_state(resume_from) if resume_from else None
    if resume_state is not None:
        check_compatible(resume_from, resume_state.get("config"), config.to_dict(),
                         nprocs=(resume_state.get("world_size", 1), world.size))
    # A resumed run loads the weights saved in the checkpoint, an HF model folder (a distributed run's: its config and
    # its weights' shards). So does its tokenizer: model.path is not read on resume.
    weights = str(resume_from) if resume_from else config.model.path
    sharded = resume_from is not None and is_sharded_checkpoint(resume_from)
    if world.active:
        check_supported(config, weights)
        if resume_from:
            check_resume(config, sharded)
    if config.memory.budget_gb is not None:
        check_budget(config, weights, device)
    tokenizer = load_tokenizer(weights)
    int8 = config.model.int8 if config.model.weight_format == "int8" else None
    # Streaming frozen weights: the model is loaded in host memory and HiFT's plan places it, so the units it
    # keeps off the device never visit it (the load does not peak at the whole model there).
    streamed = config.update.strategy == "hift" and config.memory.offload_frozen_weights
    # Distributed: made on the meta device, sharded, then each rank allocates its shards on its device and reads its
    # rows (a folder whose safetensors are not named as the model's: loaded whole in host memory, then sharded)
    model = load_model(weights, config.model.dtype, torch.device("cpu") if streamed or world.active else device,
                       config.model.gradient_checkpointing, int8, config.train.seed, shards_later=world.active)
    if world.active:  # the chunked loss keeps the head in the root's unit
        chunked = chunk_tokens_for(config.memory.loss_chunk_tokens, model.config.vocab_size) > 0
        shard_model(model, device, head_in_root=chunked)
        if any(p.is_meta for p in model.parameters()):
            materialize(model, device)
            read_weights(model, assets.resolve(weights))
    if resume_from and int8 is not None and not ckpt.load_int8_weights(resume_from, model):
        log.warning("checkpoint %s has no int8 weights: requantized from its float weights", resume_from)
    data = build_datasets(config.data, tokenizer, config.train.seed)
    if config.data.streaming:  # read as the steps need it; the resume check sees the files, not every token
        stream = StreamingBatches(config.data, tokenizer, config.train.batch_size, config.train.seed,
                                  tokenizer.pad_token_id, part=(world.rank, world.size))
        n_train, data_fingerprint = None, stream_fingerprint(config.data.path)
    else:
        stream = BatchStream(data.train, config.train.batch_size, config.train.seed, tokenizer.pad_token_id,
                             part=(world.rank, world.size))
        n_train, data_fingerprint = len(data.train), fingerprint(data.train)
    if resume_state is not None:
        check_same_data(resume_from, resume_state, n_train, data_fingerprint)
    steps = total_steps(config, n_train, world.size)
    if resume_state is not None and resume_state["step"] > steps:
        raise UserError(f"resume: {resume_from} is at step {resume_state['step']}, past this run's {steps} steps "
                        f"(train.max_steps / train.epochs); set train.max_steps={resume_state['step']} or more")

    # Masks (pruning now, on a fresh run with prune.criterion) and what trains: before the strategy hooks anything.
    retraining = prepare(model, config, weights, resume_from,
                         lambda: calibration_batches(config, calibration_sequences(config, tokenizer, data.train),
                                                     tokenizer.pad_token_id))
    update = Update.from_config(model, config, device)
    if world.active:
        check_rule_on_shards(update.rule, update.strategy.params)
    if config.tokens.eliminate:  # weight streaming's pre-hooks are prepended, so they run before the scoring
        t = config.tokens
        eliminator = TokenEliminator(model, t.keep_ratio, t.dense_layers, t.block_size, t.predictor, t.refresh_every,
                                     device)
        log.info("tokens: %d sparse layers keep %.0f%% of their %d-token blocks, chosen by %s", len(eliminator.sparse),
                 100 * t.keep_ratio, t.block_size,
                 f"a predictor refitted every {t.refresh_every} steps" if t.predictor else "exact Q·K scores")
    else:
        eliminator = None
    start_step = 0
    if resume_from:
        if world.active and sharded:  # each rank reads its own rows of the saved state
            saved = load_rule_state(resume_from, update)
        elif world.active:
            saved = load_state_shards(resume_from / "optimizer.safetensors", *state_layout(update))
        else:
            saved = ckpt.load_strategy_state(resume_from)
        update.load_state_dict(saved)
        if eliminator is not None:
            eliminator.load_state_dict(ckpt.load_token_state(resume_from))
        stream.load_state_dict(resume_state["data"])
        ckpt.restore_rng(ckpt.load_rng(resume_from, world.rank), resume_state.get("python_rng"))
        start_step = resume_state["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    if streamed:
        update.place(model)
    log.info("embeddings: %s", getattr(update.strategy, "embedding_gradient",
                                       "dense gradient (row-sparse updates run under update.strategy=fused)"))
    # after placement: with weight streaming the probe's forward would otherwise run the whole model on the host
    chunk = resolve_chunk_tokens(config.memory.loss_chunk_tokens, model)
    if world.active:  # the probe's forward left the root gathered
        reshard(model)
        if chunked and not chunk:
            log.warning("distributed: the head stays in the root's FSDP2 unit (gathered through each step), sharded "
                        "for a chunked loss the model turned out not to allow; set memory.loss_chunk_tokens=0")
    log.info("update: strategy %s, rule %s, lr %g (%s schedule, warmup %.0f%%), %d steps of %s%d×%d sequences",
             update.strategy.name, update.rule.name, config.update.lr, config.train.lr_schedule,
             100 * config.train.warmup_ratio, steps, f"{world.size} processes × " if world.active else "",
             config.train.batch_size, config.train.gradient_accumulation_steps)

    if world.is_main:
        write_metrics = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step if resume_from else None).write
    else:  # rank 0 alone writes metrics.jsonl
        def write_metrics(record: dict) -> None:
            pass
    result = TrainResult(output_dir=output_dir, steps=steps, retraining=retraining, main=world.is_main)

    def validate(step: int) -> dict | None:
        if not data.val:
            return None
        update.flush()  # updates still running on the host (host embeddings)
        batches = eval_batches(data.val, config.train.batch_size, tokenizer.pad_token_id,
                               config.train.eval_max_batches, part=(world.rank, world.size))
        scores = evaluate(model, batches, device, chunk, world)  # each rank an N-th of the global batches
        if world.active:
            reshard(model)
        if result.first_eval is None:
            result.first_eval = scores
        result.last_eval = scores
        return scores

    progress = Progress(steps, start_step, config.log.progress and world.is_main)
    if start_step == 0:
        scores = validate(0)
        # what trains (and the sparsity this run pruned to) heads the metrics, with the starting validation
        first = {"step": 0, "trainable_params": retraining.trainable, "total_params": retraining.total,
                 "weight_bytes": weight_bytes(model)}
        if retraining.report is not None:
            first.update(sparsity=retraining.report.sparsity, model_sparsity=retraining.report.model_sparsity)
        write_metrics({**first, **(scores or {})})
        if scores:
            progress.message(f"step 0: val_loss {scores['val_loss']:.4f}  val_ppl {scores['val_ppl']:.2f}")

    def save(step: int) -> None:
        update.flush()  # the weights' updates still running on the host (host embeddings) land first
        trainer_state = {"data": stream.state_dict(), "total_steps": steps, "config": config.to_dict(),
                         "train_sequences": n_train, "train_fingerprint": data_fingerprint}
        if world.active:
            distributed_save(world, output_dir, step, model, tokenizer, update, trainer_state,
                             config.checkpoint.keep_last)
            return
        ckpt.save_checkpoint(output_dir, step, model, tokenizer, update, trainer_state, config.checkpoint.keep_last,
                             eliminator.state_dict() if eliminator is not None else {})

    accum = config.train.gradient_accumulation_steps
    guard = step_guard or contextlib.nullcontext
    pending_losses: list[torch.Tensor] = []  # device scalars of the steps since the last log point
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, steps):
        position, span = update.schedule_position(step, steps)  # HiFT: the delayed schedule
        lr = learning_rate(position, config.update.lr, span, config.train.warmup_ratio, config.train.lr_schedule)
        host_batches = [stream.next() for _ in range(accum)]
        # Counted on the host batches, before they move: no device value is read inside the step (distributed: summed
        # over the ranks in host memory, so the loss is divided by the global batch's label tokens)
        step_tokens, batch_tokens = world.sum_counts(sum(count_label_tokens(b) for b in host_batches),
                                                     sum(int(b["attention_mask"].sum()) for b in host_batches))
        window_tokens += batch_tokens
        with guard():
            micro_batches = [to_device(b, device) for b in host_batches]
            update.set_lr(lr)
            update.begin()
            if eliminator is not None:
                eliminator.start_step(step)
            step_loss = None
            activation_bytes = 0
            for host, batch in zip(host_batches, micro_batches):
                update.feed(host)  # a micro-batch's host ids, for a host lookup
                with SavedTensorBytes(model.parameters()) as saved:
                    loss = loss_sum(model, batch, chunk) / max(step_tokens, 1)
                activation_bytes = max(activation_bytes, saved.nbytes)
                update.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            stats = update.step()
            if eliminator is not None:
                stats = {**stats, **eliminator.step_stats()}
        pending_losses.append(world.sum_(step_loss))  # each rank's share of the global batch's loss

        done = step + 1
        eval_now = config.train.eval_every_n_steps and done % config.train.eval_every_n_steps == 0 and done < steps
        every = config.checkpoint.save_every_n_steps
        save_now = every and done % every == 0 and done < steps
        # Evaluation and checkpoints wait for the device anyway: their steps are log points too.
        # So are the predictor's refits, whose recall is reported.
        logged = (done % config.log.every_n_steps == 0 or done == steps or eval_now or save_now
                  or "token_recall" in stats)
        if not logged:
            progress.update(None)
            continue
        # The log point: the one place a step's values come to the host (the device is waited for here).
        values = read_all({**{f"loss{i}": t for i, t in enumerate(pending_losses)},
                           **{k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}}, "log")
        losses = [values.pop(f"loss{i}") for i in range(len(pending_losses))]
        pending_losses = []
        result.losses.extend(losses)
        elapsed = time.perf_counter() - window_start
        record = {"step": done, "loss": losses[-1], "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                  **peak_memory_record(device), "epoch": stream.epoch,
                  "activation_bytes": activation_bytes, **stats, **values}
        bad = next((x for x in losses if not math.isfinite(x)), None)
        if bad is not None:
            progress.close()
            raise UserError(f"train: loss is {bad} at or before step {done} (lower update.lr or use "
                            "model.dtype=float32)")
        scores = validate(done) if eval_now or done == steps else None
        if scores:
            record.update(scores)
            progress.message(f"step {done}: val_loss {scores['val_loss']:.4f}  val_ppl {scores['val_ppl']:.2f}")
        write_metrics(record)
        progress.update(record)
        if save_now:
            save(done)
        window_tokens, window_start = 0, time.perf_counter()  # throughput excludes evaluation and checkpoints

    progress.close()
    if start_step < steps or not (output_dir / "final").exists():
        save(steps)
        result.final_dir = (distributed_export(world, output_dir, model, tokenizer) if world.active
                            else ckpt.export_final(output_dir, model, tokenizer))
    else:
        result.final_dir = output_dir / "final"
    log.info("done: %d steps; final model in %s; peak memory %s", steps, result.final_dir,
             format_bytes(peak_memory_bytes(device)))
    return result
