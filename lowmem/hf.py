"""lowmem inside HF Trainer (and TRL's SFTTrainer): any lowmem rule × strategy, int8 weights and the chunked loss.

    import lowmem
    from lowmem.hf import LowmemTrainer
    model = lowmem.load_model(path, dtype="bfloat16", weight_format="int8", gradient_checkpointing=True)
    args = TrainingArguments(output_dir="out", learning_rate=5e-4, max_grad_norm=0, lr_scheduler_type="cosine", ...)
    trainer = LowmemTrainer(model=model, args=args, train_dataset=data, update={"rule": "adalomo", "strategy": "fused"})
    trainer.train()

The Trainer keeps its loop, data, lr scheduler, logging, evaluation and checkpoint folders; lowmem supplies the
update and the loss:

* ``update`` holds :class:`lowmem.Update`'s keywords (``rule``, ``strategy``, ``adalomo``, ``hift``, ``memory``, ...).
  The learning rate, weight decay and gradient clipping come from ``TrainingArguments`` (``learning_rate``,
  ``weight_decay``, ``max_grad_norm``: lowmem clips, the Trainer does not) and are refused in ``update``. The lr of
  each step is the Trainer's scheduler's.
* The loss is :func:`lowmem.lm_loss`'s, summed over label tokens and divided by the label tokens of all the step's
  micro-batches (``num_items_in_batch``); ``loss_chunk_tokens`` as ``memory.loss_chunk_tokens``.
* Gradient accumulation is exact under ``standard`` and ``hift``, and refused under ``fused`` (no gradient is kept).
* A checkpoint folder holds the model as :func:`lowmem.save_pretrained` writes it (int8 dequantized, adapters
  merged, masks beside it), the int8 weights' exact state (``weights_int8.safetensors``), the Trainer's own files,
  and lowmem's rule state in ``lowmem_update.safetensors``; resuming loads it back, exactly. A checkpoint's masks
  must be the model's (``lowmem.load_model(checkpoint)`` attaches them). Adapters are saved merged, without their
  frozen base, so resuming them is refused, as ``load_best_model_at_end`` with int8 weights or adapters. The
  Trainer's log gets lowmem's ``grad_norm`` (before clipping; with clipping off, the rules do not measure it).
* Mixed precision (``fp16`` / ``bf16``) is refused: the model trains in the dtype it was loaded in.

:func:`sft_trainer_class` gives the same for TRL's ``SFTTrainer`` when TRL is installed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import Trainer

from lowmem.api import Update
from lowmem.errors import UserError

log = logging.getLogger("lowmem")
STATE_FILE = "lowmem_update.safetensors"
FROM_ARGUMENTS = {"lr": "learning_rate", "weight_decay": "weight_decay", "clip_grad_norm": "max_grad_norm"}


class UpdateOptimizer(torch.optim.Optimizer):
    """The face a Trainer sees of a :class:`lowmem.Update`: the scheduler sets ``param_groups[0]["lr"]``, ``step()``
    finishes lowmem's step. It holds no state of its own (lowmem's is saved beside it, as safetensors)."""

    def __init__(self, update: Update, params):
        super().__init__(params, {"lr": update.lr})
        self.update = update
        self.last_stats: dict = {}

    def step(self, closure=None):
        if closure is not None:
            raise UserError("UpdateOptimizer.step: a closure is not supported (lowmem runs backward itself)")
        self.last_stats = self.update.step()


class LowmemTrainerMixin:
    """What :class:`LowmemTrainer` adds to a Trainer class; mixed into TRL's SFTTrainer by :func:`sft_trainer_class`."""

    def __init__(self, *args, update: dict | None = None, loss_chunk_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        options = dict(update or {})
        given = [key for key in FROM_ARGUMENTS if key in options]
        if given:
            raise UserError(f"LowmemTrainer: update['{given[0]}'] comes from TrainingArguments."
                            f"{FROM_ARGUMENTS[given[0]]}; set it there")
        if self.args.fp16 or self.args.bf16:
            raise UserError("LowmemTrainer: fp16/bf16 in TrainingArguments turn on mixed precision, which lowmem does "
                            "not run under; load the model in the dtype to train in (lowmem.load_model(dtype=...)) and "
                            "set fp16=False, bf16=False")
        accumulation = self.args.gradient_accumulation_steps
        fused = options.get("strategy") == "fused" or (options.get("strategy") == "hift"
                                                       and (options.get("hift") or {}).get("fused"))
        if fused and accumulation > 1:
            raise UserError(f"LowmemTrainer: gradient_accumulation_steps is {accumulation}, but a fused update applies "
                            "each gradient inside backward and keeps none to accumulate; set it to 1 and raise "
                            "per_device_train_batch_size (or use strategy 'standard')")
        clip = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        self.lowmem_update = Update(self.model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                    clip_grad_norm=clip, seed=self.args.seed, device=self.args.device, **options)
        if self.lowmem_update.config.update.strategy == "hift":
            log.warning("LowmemTrainer: the Trainer's scheduler moves the lr every step; HiFT's delayed schedule (one "
                        "lr per cycle of groups, as lowmem train runs it) is not applied")
        if self.args.load_best_model_at_end and (why := self._reload_refusal(best=True)):
            raise UserError(f"LowmemTrainer: load_best_model_at_end reloads saved weights, {why}")
        self.lowmem_loss_chunk_tokens = loss_chunk_tokens
        self.lowmem_chunk = None  # resolved at the first loss: the probe that the head can be chunked
        self.model_accepts_loss_kwargs = True  # so the Trainer counts the step's label tokens (num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad] or list(self.model.parameters())[:1]
            self.optimizer = self.lowmem_optimizer = UpdateOptimizer(self.lowmem_update, params)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # evaluation that wants the logits: the model's own forward
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from lowmem.activations.loss import count_label_tokens, loss_sum, resolve_chunk_tokens

        if "position_ids" in inputs:  # lowmem's loss runs the model on input_ids and attention_mask alone
            raise UserError("LowmemTrainer: batches with position_ids (padding-free or packed sequences) are not "
                            "supported yet; use padded batches (TRL: padding_free=False)")
        if self.lowmem_chunk is None:
            self.lowmem_chunk = resolve_chunk_tokens(self.lowmem_loss_chunk_tokens, model)
        if num_items_in_batch is None:
            total = max(count_label_tokens(inputs), 1)
        else:  # a step whose labels are all ignored: a zero loss, not 0/0
            count = num_items_in_batch
            total = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
        return loss_sum(model, inputs, self.lowmem_chunk) / total

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        self.lowmem_update.set_lr(self.optimizer.param_groups[0]["lr"])
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:
            loss = loss / self.current_gradient_accumulation_steps
        self.lowmem_update.backward(loss)
        return loss.detach()

    def _clip_grad_norm(self, model):
        return None  # lowmem clips by update.clip_grad_norm (TrainingArguments.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # the pre-clipping norm lowmem measured in the step (fused: during backward), logged as the Trainer's own
        optimizer = getattr(self, "lowmem_optimizer", None)  # the Trainer's optimizer may be accelerate's wrapper
        norm = optimizer.last_stats.get("grad_norm") if optimizer is not None else None
        return super()._maybe_log_save_evaluate(tr_loss, norm if norm is not None else grad_norm, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from transformers.trainer import TRAINING_ARGS_NAME

        from lowmem.checkpoint import settle, save_int8_weights, save_masks, save_model

        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.lowmem_update.flush()
        settle()  # weights kept in host memory are written by copies that may still be queued
        save_model(self.model, folder, merge=True)
        save_masks(self.model, folder)
        save_int8_weights(self.model, folder)  # the exact int8 state beside the float export, for a resume
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        super()._save_optimizer_and_scheduler(output_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.lowmem_update.state_dict().items()}
        tmp = Path(output_dir) / f".{STATE_FILE}.tmp"
        save_file(state, tmp)
        os.replace(tmp, Path(output_dir) / STATE_FILE)

    def _reload_refusal(self, best: bool = False) -> str | None:
        """Why the weights this trainer saves cannot be loaded back exactly into its model, or None. ``best``: by
        the Trainer's own loader (load_best_model_at_end), which reads the float export only."""
        from lowmem.weights.adapters import adapted_layers
        from lowmem.weights.int8 import int8_weights

        if best and int8_weights(self.model):
            return ("but the Trainer's loader reads int8 weights' float export, which does not requantize exactly; "
                    "set load_best_model_at_end=False (resume_from_checkpoint resumes int8 weights exactly)")
        if adapted_layers(self.model):
            return ("but adapters are saved merged into their weights and their frozen base is not kept; use lowmem "
                    "train, which resumes adapters exactly")
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from lowmem.weights.int8 import int8_weights

        why = self._reload_refusal()
        if why:
            raise UserError(f"LowmemTrainer: resume_from_checkpoint {resume_from_checkpoint} reloads saved weights, "
                            f"{why}")
        folder = Path(resume_from_checkpoint)
        self._check_masks(folder)
        if int8_weights(self.model):
            self._load_int8_checkpoint(folder)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _check_masks(self, folder: Path) -> None:
        """The checkpoint's sparsity masks must be the model's: the update was built with the model's, and a mask
        attached now would not be seen by it."""
        from safetensors.torch import load_file

        from lowmem.weights.masks import MASKS_FILE, masks_state_dict

        path = folder / MASKS_FILE
        saved = load_file(str(path)) if path.is_file() else {}
        mine = masks_state_dict(self.model)
        if saved.keys() != mine.keys() or any(not torch.equal(saved[k], mine[k]) for k in saved):
            if not mine:
                raise UserError(f"LowmemTrainer: {folder} holds sparsity masks the model does not have (load the "
                                f"model with lowmem.load_model('{folder}'), which attaches them, then resume)")
            what = ("has no sparsity masks, but the model has some" if not saved
                    else "holds other sparsity masks than the model's")
            raise UserError(f"LowmemTrainer: {folder} {what} (resume the model it was written from)")

    def _load_int8_checkpoint(self, folder: Path) -> None:
        """Int8 weights exactly from their saved state; the float ones (norms, embeddings, head) from the export."""
        from safetensors import safe_open

        from lowmem.checkpoint import INT8_FILE, load_int8_weights
        from lowmem.weights.int8 import int8_weights

        if not (folder / INT8_FILE).is_file():
            raise UserError(f"LowmemTrainer: {folder} has no {INT8_FILE}, so its int8 weights cannot resume exactly "
                            "(it was not written by LowmemTrainer from an int8 model)")
        prefixes = tuple(f"{name}." for name in int8_weights(self.model))
        state = self.model.state_dict()
        wanted = {key for key in state if not key.startswith(prefixes)}
        loaded = {}
        for file in sorted(folder.glob("model*.safetensors")):
            with safe_open(str(file), "pt") as f:
                loaded.update({key: f.get_tensor(key) for key in f.keys() if key in wanted})
        shared = {state[key].data_ptr() for key in loaded}  # a tied weight is saved once
        missing = [key for key in wanted - loaded.keys() if state[key].data_ptr() not in shared]
        if missing:
            raise UserError(f"LowmemTrainer: {folder} lacks {missing[0]} of the model's float weights (was it written "
                            "for this model?)")
        with torch.no_grad():
            for key, value in loaded.items():
                state[key].copy_(value)
        load_int8_weights(folder, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        from safetensors.torch import load_file

        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise UserError(f"LowmemTrainer: {checkpoint} has no {STATE_FILE} (not written by LowmemTrainer)")
        # in host memory: the strategy places each state where it keeps it (HiFT's offloaded states stay there)
        self.lowmem_update.load_state_dict(load_file(str(path), device="cpu"))


class LowmemTrainer(LowmemTrainerMixin, Trainer):
    """``transformers.Trainer`` with a lowmem update and loss (see the module docstring)."""


def sft_trainer_class():
    """TRL's ``SFTTrainer`` with a lowmem update and loss, as :class:`LowmemTrainer` (TRL is optional)."""
    try:
        from trl import SFTTrainer
    except ImportError:
        raise UserError("lowmem.hf.sft_trainer_class: TRL is not installed (pip install trl)") from None
    return type("LowmemSFTTrainer", (LowmemTrainerMixin, SFTTrainer), {})
