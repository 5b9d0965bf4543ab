"""What a resumed run may change from the recipe its checkpoint was written with.

A checkpoint holds weights, rule state, a data position and the recipe that made them. Changing a setting that
gives the saved state another meaning (AdamW's ``exp_avg`` read as Lion's momentum, a data position into another
dataset, HiFT's position into other groups, int8 blocks of another size) would train on silently. So a resume
refuses every change except the settings listed here, which only steer what happens next.
"""

from __future__ import annotations

from typing import Any

from lowmem.errors import UserError

# Steering only: the schedule and its length, clipping, the hyperparameters of the same rule, logging,
# evaluation, checkpointing, where tensors live, recomputation and token elimination.
SAFE_KEYS = {
    "model.path",  # a resume loads the weights and the tokenizer from the checkpoint, never from model.path
    "model.gradient_checkpointing",
    "model.int8.refresh_every",
    "model.int8.stochastic_rounding",
    "update.lr",
    "update.weight_decay",
    "update.clip_grad_norm",
    "update.clip_mode",
    "update.beta1",
    "update.beta2",
    "update.eps",
    "update.adafactor.relative_step",
    "update.adafactor.scale_parameter",
    "update.adafactor.clip_threshold",
    "update.adafactor.decay_rate",
    "update.adafactor.eps1",
    "update.adafactor.eps2",
    "update.adalomo.clip_threshold",
    "update.adalomo.decay_rate",
    "update.adalomo.eps1",
    "update.adalomo.eps2",
    "update.lion.beta1",
    "update.lion.beta2",
    "hift.fused",
    "train.max_steps",
    "train.epochs",
    "train.lr_schedule",
    "train.warmup_ratio",
    "train.eval_every_n_steps",
    "train.eval_max_batches",
    "train.device",
}
SAFE_SECTIONS = ("log.", "checkpoint.", "memory.", "update.loss_scale.", "tokens.")
# Safe to change between two values, not to or from null (null means the state does not exist).
SAFE_UNLESS_NULL = {"update.adafactor.beta1"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_compatible(checkpoint, saved: dict[str, Any] | None, current: dict[str, Any],
                     nprocs: tuple[int, int] = (1, 1)) -> None:
    """Raise a one-line error naming the first setting whose change would give the state in ``checkpoint``
    another meaning. ``saved`` and ``current`` are ``Config.to_dict()`` trees; ``saved`` None (a checkpoint
    without its recipe) checks nothing. Keys the saved recipe lacks (added by a newer lowmem) are not compared.
    ``nprocs``: the processes of the saved run and of this one; train.batch_size may change with them as long as the
    global micro-batch (processes × train.batch_size), which the data position counts in, stays the same."""
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(current)
    before, now = nprocs
    regrouped = before != now  # the same number of processes: train.batch_size is compared as any other key
    if regrouped and "train.batch_size" in old and old["train.batch_size"] * before != new["train.batch_size"] * now:
        raise UserError(
            f"resume: the global micro-batch (processes × train.batch_size) was {before} × {old['train.batch_size']} "
            f"when {checkpoint} was saved and is {now} × {new['train.batch_size']} now, which changes the meaning of "
            "the saved data position (keep the product: set train.batch_size="
            f"{old['train.batch_size'] * before // now if old['train.batch_size'] * before % now == 0 else '…'}, or "
            "start a new run with checkpoint.resume=never or another checkpoint.output_dir)")
    for key, value in new.items():
        regrouped_batch = regrouped and key == "train.batch_size"  # checked above, as the global micro-batch
        if regrouped_batch or key in SAFE_KEYS or key.startswith(SAFE_SECTIONS) or key not in old or old[key] == value:
            continue
        if key in SAFE_UNLESS_NULL and None not in (old[key], value):
            continue
        raise UserError(
            f"resume: {key} was {old[key]!r} when {checkpoint} was saved and is {value!r} now, which changes the "
            f"meaning of the saved state (set {key}={_yaml(old[key])} to resume, or start a new run with "
            "checkpoint.resume=never or another checkpoint.output_dir)"
        )


def check_same_data(checkpoint, saved: dict[str, Any], sequences: int, fingerprint: str) -> None:
    """The data position is an index into the shuffled training sequences: they must be the same (their count and
    a hash of their tokens, saved as ``train_sequences`` and ``train_fingerprint``)."""
    count, digest = saved.get("train_sequences"), saved.get("train_fingerprint")
    if count is not None and count != sequences:
        changed = f"now makes {sequences} sequences, {count} when {checkpoint} was saved"
    elif digest is not None and digest != fingerprint:
        changed = f"now makes {sequences} sequences as when {checkpoint} was saved, but other ones"
    else:
        return
    raise UserError(f"resume: the training data {changed}: the data changed, so the saved data position means "
                    "nothing (resume with the same data, or start a new run with checkpoint.resume=never)")


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
