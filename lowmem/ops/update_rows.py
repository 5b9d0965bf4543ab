"""Updates from a row-sparse gradient: an embedding's, which holds only the rows of the batch's tokens.

A matrix's gradient given as ``values`` (k × cols) and ``slot`` (one int32 per row: row i's gradient is
``values[slot[i]]``, or zero where ``slot[i] < 0``). For rules whose update is zero where the gradient is zero
(LOMO's sgd; adafactor/adalomo without a first moment) the update from it equals the update from the same gradient
made dense, weight decay and the factored statistics included: a missing row adds ε₁ to its row statistic and to
every column's (the column mean counts it), and only decays. The native kernels (``csrc/cpu/update.cpp``,
``csrc/cuda/update.cu``) are the dense kernels reading the gradient through the slots, so their result is the dense
kernels' bit for bit; the references below compute over the k rows only (same math, their sums in another order).

``sgd_update_rows_``       as ``sgd_update_`` (lowmem/ops/update.py) on the dense gradient;
``factored_update_rows_``  as ``factored_update_`` without a first moment.
"""

from __future__ import annotations

import torch

from lowmem.ops.quant import _lib  # the one "lowmem" library
from lowmem.ops.update import device_scalar, factored_step_scalars, math_dtype, scaled_grad

_lib.define("sgd_update_rows_(Tensor(a!) param, Tensor slot, Tensor values, float lr, float weight_decay, "
            "Tensor grad_scale) -> ()")
_lib.define(
    "factored_update_rows_(Tensor(a!) param, Tensor slot, Tensor values, Tensor(b!) row, Tensor(c!) col, "
    "Tensor step, Tensor grad_scale, float lr, bool relative_step, float decay_rate, float eps1, "
    "float clip_threshold, float eps2, bool scale_parameter, float weight_decay) -> ()"
)


def row_slots(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The slot map of a row-sparse gradient whose ``values[p]`` is row ``rows[p]`` (``rows`` distinct, except the
    value ``n_rows``: padding, no row): int32, one entry per row of the matrix, −1 where the gradient is zero. Made
    on ``rows``' device, without a host read."""
    slot = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=rows.device)
    slot[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
    return slot[:n_rows]


def _check_rows(rows: torch.Tensor, values: torch.Tensor) -> None:
    """Sizes only (no value is read): one row of values per entry of ``rows``."""
    if rows.dim() != 1 or values.dim() != 2 or values.shape[0] != rows.shape[0]:
        raise ValueError(f"row-sparse gradient: rows {tuple(rows.shape)} and values {tuple(values.shape)} must be "
                         "(k,) and (k, cols)")


def _present(slot: torch.Tensor, values: torch.Tensor, grad_scale, dtype):
    """(rows with a gradient, their scaled gradient rows in ``dtype``)."""
    rows = (slot >= 0).nonzero().squeeze(1)
    return rows, scaled_grad(values[slot[rows].long()], grad_scale, dtype)


def sgd_update_rows_ref(param, slot, values, lr, weight_decay, grad_scale) -> None:
    """Reference of ``sgd_update_rows_``: every row decays, the rows with a gradient also step."""
    dtype = math_dtype(param.dtype)
    work = param if param.dtype == dtype else param.to(dtype)
    rows, g = _present(slot, values, grad_scale, dtype)
    if weight_decay:
        work.mul_(1 - lr * weight_decay)
    work.index_add_(0, rows, g, alpha=-lr)
    if work is not param:
        param.copy_(work)


def factored_update_rows_ref(param, slot, values, row, col, step, grad_scale, lr, relative_step, decay_rate, eps1,
                             clip_threshold, eps2, scale_parameter, weight_decay) -> None:
    """Reference of ``factored_update_rows_``: ``factored_update_ref``'s operations with the zero rows' terms
    written out: their (s·g)² is 0 (ε₁ is added to each mean), their u is 0."""
    dtype = math_dtype(param.dtype)
    n_rows, n_cols = param.shape
    work = param.to(dtype, copy=True)
    rows, g = _present(slot, values, grad_scale, dtype)
    beta2t, keep_new, rho = factored_step_scalars(step, lr, relative_step, decay_rate, dtype)
    alpha = rho * work.pow(2).mean().sqrt().clamp(min=eps2) if scale_parameter else rho
    sq = g * g
    row_mean = torch.zeros((n_rows,), dtype=dtype, device=param.device)
    row_mean[rows] = sq.mean(dim=-1)
    row.mul_(beta2t).add_((row_mean + eps1) * keep_new)
    col.mul_(beta2t).add_((sq.sum(dim=0) / n_rows + eps1) * keep_new)
    r_factor = (row / row.mean()).rsqrt()
    update = g * (r_factor[rows].unsqueeze(-1) * col.rsqrt().unsqueeze(0))
    update.div_((update.pow(2).sum() / (n_rows * n_cols)).sqrt().div(clip_threshold).clamp(min=1.0))
    update.mul_(alpha)
    if weight_decay and isinstance(alpha, torch.Tensor):
        work.addcmul_(work, alpha * -weight_decay)
    elif weight_decay:
        work.add_(work, alpha=-weight_decay * alpha)
    work.index_add_(0, rows, update, alpha=-1.0)
    param.copy_(work)


_lib.impl("sgd_update_rows_", sgd_update_rows_ref, "CompositeExplicitAutograd")
_lib.impl("factored_update_rows_", factored_update_rows_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::sgd_update_rows_")
def _sgd_rows_fake(*args):
    return None


@torch.library.register_fake("lowmem::factored_update_rows_")
def _factored_rows_fake(*args):
    return None


def sgd_update_rows_(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, lr: float,
                     weight_decay: float = 0.0, grad_scale: float | torch.Tensor = 1.0) -> None:
    """LOMO's SGD step from a row-sparse gradient (``values[p]`` is row ``rows[p]``; see :func:`row_slots`) in place."""
    from lowmem.ops.native import ensure_loaded

    slot = row_slots(rows, param.shape[0])
    _check_rows(rows, values)
    if param.dtype == torch.float64:
        sgd_update_rows_ref(param, slot, values, float(lr), float(weight_decay), grad_scale)
        return
    ensure_loaded()
    torch.ops.lowmem.sgd_update_rows_(param, slot, values, float(lr), float(weight_decay),
                                      device_scalar(grad_scale, param.device))


def factored_update_rows_(param, rows, values, row, col, *, step, grad_scale=1.0, lr, relative_step=False,
                          decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay) -> None:
    """One Adafactor/AdaLomo step without a first moment from a row-sparse gradient, in place (see the module)."""
    from lowmem.ops.native import ensure_loaded

    slot = row_slots(rows, param.shape[0])
    _check_rows(rows, values)
    if param.dtype == torch.float64:
        step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step), device=param.device)
        factored_update_rows_ref(param, slot, values, row, col, step, grad_scale, float(lr), bool(relative_step),
                                 float(decay_rate), float(eps1), float(clip_threshold), float(eps2),
                                 bool(scale_parameter), float(weight_decay))
        return
    ensure_loaded()
    torch.ops.lowmem.factored_update_rows_(param, slot, values, row, col, device_scalar(step, param.device),
                                           device_scalar(grad_scale, param.device), float(lr), bool(relative_step),
                                           float(decay_rate), float(eps1), float(clip_threshold), float(eps2),
                                           bool(scale_parameter), float(weight_decay))
