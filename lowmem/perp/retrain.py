"""Prune → retrain → export in one run (PERP): what the trainer, ``lowmem prune`` and the planner call on a loaded
model before its strategy is built.

1. Masks: a fresh run with ``prune.criterion`` prunes now (``lowmem.perp.prune``); otherwise the masks stored with the
   weights are loaded (``masks.safetensors``: written by ``lowmem prune``, by checkpoints and by the final export).
2. ``update.trainable`` chooses what trains, adding adapters (``lowmem.weights.adapters``); on resume their weights come
   from the checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import unset_fake_temporarily

from lowmem import assets
from lowmem.weights.adapters import ADAPTERS, ADAPTERS_FILE, load_adapter_state_dict, select_trainable
from lowmem.data import eval_batches
from lowmem.errors import UserError
from lowmem.weights.masks import MASKS_FILE, load_masks
from lowmem.perp.prune import PruneReport, prune_model, sparsity_report

log = logging.getLogger("lowmem")


@dataclass
class Retraining:
    trainable: int
    total: int
    report: PruneReport | None = None  # when this run pruned

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)


def calibration_batches(config, train_examples, pad_token_id: int):
    """Wanda's calibration: the first ``prune.calibration_batches`` batches of the training sequences, in order."""
    return eval_batches(train_examples, config.train.batch_size, pad_token_id, config.prune.calibration_batches)


def calibration_sequences(config, tokenizer, train_examples) -> list:
    """The training sequences wanda calibrates on: ``train_examples`` (in memory), or under data.streaming the first
    ``prune.calibration_batches`` batches' worth streamed in the file's order."""
    if not config.data.streaming:
        return train_examples
    from lowmem.data_stream import first_sequences

    return first_sequences(config.data, tokenizer, config.prune.calibration_batches * config.train.batch_size)


def prune_from_config(model: torch.nn.Module, config, calibration=None, report: bool = True) -> PruneReport | None:
    """Prune by the recipe's ``prune`` section and report the sparsity reached. ``calibration``: a callable returning
    wanda's batches (:func:`calibration_batches`), called only for wanda. ``report``: read the sparsity back (the
    memory plan, on tensors without values, cannot: None)."""
    p = config.prune
    batches = calibration() if p.criterion == "wanda" and calibration is not None else None
    masks = prune_model(model, p.criterion, p.sparsity, p.pattern, p.include_head, batches)
    if not report:
        return None
    reached = sparsity_report(model, masks)
    log.info("prune: %s %s, %d matrices at %.2f%% sparsity (%.2f%% of all weights)", p.criterion, p.pattern,
             len(reached.layers), 100 * reached.sparsity, 100 * reached.model_sparsity)
    return reached


def load_stored_masks(model: torch.nn.Module, folder: str | Path) -> bool:
    """Attach the masks saved beside the weights in ``folder``, if any."""
    path = Path(assets.resolve(str(folder))) / MASKS_FILE
    if not path.is_file():
        return False
    try:
        with unset_fake_temporarily():  # a file's bytes are real tensors, also while the memory plan traces the run
            packed = load_file(path)
        load_masks(model, packed)
    except ValueError as err:
        raise UserError(f"{path}: {err} (was it written for this model?)") from None
    return True


def prepare(model: torch.nn.Module, config, source: str, resume_from: Path | None = None,
            calibration=None, report: bool = True) -> Retraining:
    """Masks and trainable subset for ``model`` loaded from ``source`` (a checkpoint folder when resuming).

    ``calibration``: a callable returning wanda's calibration batches (called only when they are needed).
    ``report``: read back the sparsity reached and log what trains (the memory plan, on tensors without values,
    neither reads nor logs)."""
    pruned = None
    if resume_from is None and config.prune.criterion != "none":
        pruned = prune_from_config(model, config, calibration, report)
    elif load_stored_masks(model, source) and report:
        log.info("prune: sparsity masks loaded from %s", source)
    counts = select_trainable(model, config.update.trainable, config.lora.rank, config.lora.alpha)
    if resume_from is not None and config.update.trainable in ADAPTERS:
        path = resume_from / ADAPTERS_FILE
        if not path.is_file():
            raise UserError(f"resume: {resume_from} has no {ADAPTERS_FILE} for update.trainable="
                            f"{config.update.trainable} (resume with the update.trainable it was written with)")
        try:
            load_adapter_state_dict(model, load_file(path))
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
    result = Retraining(counts["trainable"], counts["total"], pruned)
    if report:
        log.info("update.trainable=%s: %s of %s weights train (%.3f%%)", config.update.trainable,
                 f"{result.trainable:,}", f"{result.total:,}", 100 * result.fraction)
    return result
