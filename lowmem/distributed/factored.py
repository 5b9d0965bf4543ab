"""Adafactor / AdaLomo on a parameter sharded by rows (FSDP2's Shard(0)): the one-process rule
(``lowmem.ops.update.factored_update_ref``, transformers' Adafactor operation for operation) with its four whole-tensor
quantities summed over the ranks.

A rank holds rows [a, b) of θ and of the reduced gradient g. Of the statistics of an R × C matrix:

    row means of g² + ε₁     the rank's own rows, complete on it (a mean over the columns it holds whole)
    column means of g² + ε₁  a sum over all R rows: partial column sums, all-reduced, / R
    mean of the row statistic (r's normaliser)      a sum over all rows: all-reduced, / R
    RMS(θ) (α's scale)       a sum of squares over every element: all-reduced
    RMS(update) (clipping)   the same, once the update is made: all-reduced

so a step costs two all-reduces of C + 2 and 1 numbers. The column statistic is the same on every rank (replicated
state); the row statistic, and β₁'s first moment, are sharded as the parameter is. A vector (a norm's weight) keeps
its full second moment, sharded; its update's RMS and RMS(θ) are summed the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowmem.ops.update import factored_step_scalars, math_dtype, scaled_grad


@torch.no_grad()
def sharded_factored_update_(rule, param, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
                             grad_scale=1.0) -> None:
    """One step of the factored ``rule`` on the DTensor ``param`` (Shard(0)), from this rank's shard ``grad`` of the
    reduced gradient; ``state`` holds this rank's share (see the module docstring)."""
    if param.dim() > 2:
        from lowmem.errors import UserError

        raise UserError(f"distributed: {rule.name} on a {param.dim()}-D parameter sharded by rows is not supported "
                        "(its column statistic would span more than one dimension); use update.rule=adamw")
    shard = param.to_local()
    rows_total, numel = param.shape[0], param.numel()
    state["step"] += 1
    dtype = math_dtype(shard.dtype)
    work = shard.to(dtype, copy=True)
    g = scaled_grad(grad, grad_scale, dtype)
    beta2t, keep_new, rho = factored_step_scalars(state["step"], lr, rule.relative_step, rule.decay_rate, dtype)
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    matrix = col.numel() > 0
    sq = g * g
    if matrix:
        row.mul_(beta2t).add_((sq.mean(dim=-1) + rule.eps1) * keep_new)
        sums = torch.cat([work.pow(2).sum().reshape(1), row.sum().reshape(1), sq.sum(dim=-2)])
    else:
        row.mul_(beta2t).add_((sq + rule.eps1) * keep_new)
        sums = work.pow(2).sum().reshape(1)
    dist.all_reduce(sums)
    param_sq = sums[0]
    if matrix:
        col.mul_(beta2t).add_((sums[2:] / rows_total + rule.eps1) * keep_new)
        r_factor = (row / (sums[1] / rows_total)).rsqrt().unsqueeze(-1)
        update = g * (r_factor * col.unsqueeze(-2).rsqrt())
    else:
        update = row.rsqrt() * g
    update_sq = update.pow(2).sum()
    dist.all_reduce(update_sq)
    update.div_(((update_sq / numel).sqrt() / rule.clip_threshold).clamp(min=1.0))
    alpha = rho * (param_sq / numel).sqrt().clamp(min=rule.eps2) if rule.scale_parameter else rho
    update.mul_(alpha)
    exp_avg = state.get("exp_avg")
    if exp_avg is not None:
        exp_avg.mul_(rule.beta1).add_(update, alpha=1.0 - rule.beta1)
        update = exp_avg
    if rule.weight_decay and isinstance(alpha, torch.Tensor):
        work.addcmul_(work, alpha * -rule.weight_decay)
    elif rule.weight_decay:
        work.add_(work, alpha=-rule.weight_decay * alpha)
    work.add_(-update)
    shard.copy_(work)
