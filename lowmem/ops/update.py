"""Fused per-tensor update ops: their schemas and pure-PyTorch references (the specification and the
fallback). Native kernels in ``csrc/cpu/{update,lion8bit}.cpp`` and ``csrc/cuda/{update,lion8bit}.cu``
override them.

``sgd_update_``       θ ← θ·(1 − lr·wd) − lr·(s·g)                      (LOMO's rule; s = unscale × clip)
``factored_update_``  Adafactor/AdaLomo: β₂ₜ = 1 − t^decay_rate, ρ = min(lr, 1/√t) with ``relative_step``
                      else lr; second-moment statistics of (s·g)² + ε₁ (row and column means for
                      matrices, full for vectors), u = g/√v̂, u /= max(1, RMS(u)/d), α = ρ·max(ε₂, RMS(θ))
                      (or ρ), optional first moment m ← β₁m + (1−β₁)αu, θ ← θ − α·wd·θ − (m or αu).
``lion8bit_update_``  Lion with the momentum as uint8 codes + float32 absmax per block (QFT).
All math is float32 (:func:`math_dtype`: float64 for float64 weights, which the numerical tests train, and which run
the references); the weight is written back in its own dtype; a gradient whose dtype differs from the weight's is read
as float32 (never rounded down to the weight's dtype).

Values that change every step without the host knowing them (the gradient scale s, which folds loss-scale
unscaling and a clipping coefficient computed on the device, and the step count t) are 0-d float32 tensors
on the weight's device, read by the kernels there: no op waits for the device to hand a number to the host.
"""

from __future__ import annotations

import torch

from lowmem.ops.quant import _lib  # the one "lowmem" library
from lowmem.placement.tensor_cache import tensor_cache

_lib.define("sgd_update_(Tensor(a!) param, Tensor grad, float lr, float weight_decay, Tensor grad_scale) -> ()")
_lib.define(
    "factored_update_(Tensor(a!) param, Tensor grad, Tensor(b!) row, Tensor(c!) col, Tensor(d!) exp_avg, "
    "Tensor step, Tensor grad_scale, float lr, bool relative_step, float decay_rate, float eps1, "
    "float clip_threshold, float eps2, bool scale_parameter, float weight_decay, float beta1) -> ()"
)


@tensor_cache(maxsize=64)
def _constant(value: float, device: str) -> torch.Tensor:
    return torch.full((), value, dtype=torch.float32, device=device)


def device_scalar(value: float | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor on ``device``: a tensor passes through (cast to float32 when needed);
    a number becomes a cached constant made there by a fill kernel, never copied from host memory.
    The cached constants are shared: never write to one."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == torch.float32 else value.float()
    return _constant(float(value), str(torch.device(device)))


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an update computes in for a weight of ``dtype``: float32, or float64 for float64 weights (the
    numerical tests compare strategies in float64, where rounding cannot hide a difference; the native kernels compute
    in float32, so float64 weights take the references)."""
    return torch.promote_types(dtype, torch.float32)


def scaled_grad(grad: torch.Tensor, grad_scale: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``grad_scale · grad`` in ``dtype`` (float32, or :func:`math_dtype`). A number 1 multiplies nothing (and for a
    grad already in ``dtype`` copies nothing); a tensor scale is applied on the device without being read."""
    g = grad.to(dtype)
    if isinstance(grad_scale, torch.Tensor):
        return g * grad_scale
    return g if grad_scale == 1.0 else g * grad_scale


def sgd_update_ref(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float,
                   grad_scale: torch.Tensor) -> None:
    """Reference of ``sgd_update_``: in place on ``param``."""
    dtype = math_dtype(param.dtype)
    work = param if param.dtype == dtype else param.to(dtype)
    g = scaled_grad(grad, grad_scale, dtype)
    if weight_decay:
        work.mul_(1 - lr * weight_decay)
    work.add_(g, alpha=-lr)
    if work is not param:
        param.copy_(work)


def factored_shapes(shape: torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """State shapes: (row, col) for a tensor of ≥ 2 dims, (full, (0,)) for a vector."""
    if len(shape) >= 2:
        return tuple(shape[:-1]), tuple(shape[:-2]) + (shape[-1],)
    return tuple(shape), (0,)


def factored_step_scalars(step: torch.Tensor, lr: float, relative_step: bool, decay_rate: float, dtype: torch.dtype):
    """(β₂ₜ, 1 − β₂ₜ, ρ) of step t (a device tensor, already counted): β₂ₜ = 1 − t^decay_rate and ρ = min(lr, 1/√t) with
    ``relative_step`` (device tensors of ``dtype``), else ρ = lr (a number)."""
    t = step.double()
    beta2t = (1.0 - t.pow(decay_rate)).to(dtype)
    rho = t.rsqrt().clamp(max=lr).to(dtype) if relative_step else lr
    return beta2t, 1.0 - beta2t, rho


def factored_statistics_(sq: torch.Tensor, row: torch.Tensor, col: torch.Tensor, beta2t, keep_new, eps1: float):
    """Fold the row and column means of (s·g)² + ε₁ (``sq`` = (s·g)² of a matrix, or a stack of them; ε₁ added to each
    mean, as the kernels do) into ``row`` and ``col``; returns the factors r = 1/√(row / mean(row)) as [..., rows, 1]
    and c = 1/√col as [..., 1, cols]."""
    row.mul_(beta2t).add_((sq.mean(dim=-1) + eps1) * keep_new)
    col.mul_(beta2t).add_((sq.mean(dim=-2) + eps1) * keep_new)
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1), col.unsqueeze(-2).rsqrt()


def factored_update_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    exp_avg: torch.Tensor,
    step: torch.Tensor,
    grad_scale: torch.Tensor,
    lr: float,
    relative_step: bool,
    decay_rate: float,
    eps1: float,
    clip_threshold: float,
    eps2: float,
    scale_parameter: bool,
    weight_decay: float,
    beta1: float,
) -> None:
    """Reference of ``factored_update_``: updates ``param``, ``row``, ``col`` and ``exp_avg`` in place.

    ``exp_avg`` with no elements means no first moment; ``col`` with no elements means ``row`` is the full
    second moment of a vector. ``step`` is t, already counted for this update. Follows transformers'
    Adafactor operation for operation, with the step-dependent scalars kept on the device.
    """
    dtype = math_dtype(param.dtype)
    work = param.to(dtype, copy=True)
    g = scaled_grad(grad, grad_scale, dtype)
    beta2t, keep_new, rho = factored_step_scalars(step, lr, relative_step, decay_rate, dtype)
    alpha = rho * work.pow(2).mean().sqrt().clamp(min=eps2) if scale_parameter else rho
    if col.numel() > 0:
        r_factor, c_factor = factored_statistics_(g * g, row, col, beta2t, keep_new, eps1)
        update = g * (r_factor * c_factor)
    else:
        row.mul_(beta2t).add_((g * g + eps1) * keep_new)
        update = row.rsqrt() * g
    update.div_((update.pow(2).mean().sqrt() / clip_threshold).clamp(min=1.0))
    update.mul_(alpha)
    if exp_avg.numel() > 0:
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        update = exp_avg
    if weight_decay and isinstance(alpha, torch.Tensor):
        work.addcmul_(work, alpha * -weight_decay)  # θ + θ·(−wd·α), as the kernels round it
    elif weight_decay:
        work.add_(work, alpha=-weight_decay * alpha)
    work.add_(-update)
    param.copy_(work)


_lib.impl("sgd_update_", sgd_update_ref, "CompositeExplicitAutograd")
_lib.impl("factored_update_", factored_update_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::sgd_update_")
def _sgd_fake(param, grad, lr, weight_decay, grad_scale):
    return None


@torch.library.register_fake("lowmem::factored_update_")
def _factored_fake(param, grad, row, col, exp_avg, step, grad_scale, *args):
    return None


def sgd_update_(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float = 0.0,
                grad_scale: float | torch.Tensor = 1.0) -> None:
    """Apply LOMO's SGD step to ``param`` in place (native kernel when loaded; float64 weights: the reference)."""
    from lowmem.ops.native import ensure_loaded

    if param.dtype == torch.float64:
        sgd_update_ref(param, grad, float(lr), float(weight_decay), grad_scale)
        return
    ensure_loaded()
    torch.ops.lowmem.sgd_update_(param, grad, float(lr), float(weight_decay), device_scalar(grad_scale, param.device))


def factored_update_(param, grad, row, col, exp_avg, *, step, grad_scale=1.0, lr, relative_step=False, decay_rate,
                     eps1, clip_threshold, eps2, scale_parameter, weight_decay, beta1=0.0) -> None:
    """Apply one Adafactor/AdaLomo step in place (native kernel when loaded); ``step`` is t (a number, or the
    rule's float32 step tensor on the weight's device). Float64 weights take the reference, in float64."""
    from lowmem.ops.native import ensure_loaded

    if param.dtype == torch.float64:
        step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step), device=param.device)
        factored_update_ref(param, grad, row, col, exp_avg, step, grad_scale, float(lr), bool(relative_step),
                            float(decay_rate), float(eps1), float(clip_threshold), float(eps2), bool(scale_parameter),
                            float(weight_decay), float(beta1))
        return
    ensure_loaded()
    torch.ops.lowmem.factored_update_(param, grad, row, col, exp_avg, device_scalar(step, param.device),
                                      device_scalar(grad_scale, param.device), float(lr), bool(relative_step),
                                      float(decay_rate), float(eps1), float(clip_threshold), float(eps2),
                                      bool(scale_parameter), float(weight_decay), float(beta1))


# ---------------------------------------------------------------------------------------------------
# Lion with an int8 blockwise-quantized momentum (QFT)

_lib.define(
    "lion8bit_update_(Tensor(a!) param, Tensor grad, Tensor(b!) codes, Tensor(c!) absmax, Tensor code, "
    "Tensor grad_scale, float lr, float beta1, float beta2, float weight_decay, int blocksize) -> ()"
)


SLICE = 2**24  # values per slice of an element-wise pure-PyTorch update: its float32 temporaries are 64 MiB each


def in_slices(param: torch.Tensor, grad: torch.Tensor, *states: torch.Tensor):
    """(param, grad, *states) as matching 1-D slices of :data:`SLICE` values, for an element-wise update that writes
    param and states in place; the whole tensors at once when one of them is not contiguous (views of it would not
    write through). The float32 gradient, the float32 copy of a 16-bit weight and the update's intermediates then
    exist one slice at a time: for a 128k-vocabulary embedding (Llama-3's) ≤ 64 MiB each instead of 2 GiB each."""
    if not (param.is_contiguous() and all(s.is_contiguous() for s in states)):
        yield (param, grad, *states)
        return
    flat = [param.view(-1), grad.reshape(-1), *(s.view(-1) for s in states)]
    for start in range(0, param.numel(), SLICE):
        yield tuple(t[start:start + SLICE] for t in flat)


def lion_update_(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale) -> None:
    """One Lion step with a float32 momentum ``exp_avg`` (shaped like ``param``), in place: c = β₁m + (1−β₁)g,
    θ ← θ(1 − lr·wd) − lr·sign(c), m ← β₂m + (1−β₂)g. The ``lion`` rule and the lion8bit reference share it.
    Runs :func:`in_slices`."""
    for p, g, m in in_slices(param, grad, exp_avg):
        _lion_slice_(p, g, m, lr, beta1, beta2, weight_decay, grad_scale)


def _lion_slice_(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale) -> None:
    dtype = exp_avg.dtype  # the rule's math dtype: float32, or float64 for float64 weights
    g = scaled_grad(grad, grad_scale, dtype)
    c = exp_avg.mul(beta1).add_(g, alpha=1.0 - beta1)
    work = param if param.dtype == dtype else param.to(dtype)
    if weight_decay:
        work.mul_(1.0 - lr * weight_decay)
    work.add_(torch.sign(c), alpha=-lr)
    if work is not param:
        param.copy_(work)
    exp_avg.mul_(beta2).add_(g, alpha=1.0 - beta2)


def lion8bit_update_ref(param, grad, codes, absmax, code, grad_scale, lr, beta1, beta2, weight_decay, blocksize):
    """Reference of ``lion8bit_update_``: dequantize the momentum, take one :func:`lion_update_` step,
    requantize the momentum keeping each value's sign."""
    from lowmem.ops.quant import dequantize_blockwise_ref, quantize_blockwise_ref

    m = dequantize_blockwise_ref(codes, absmax, code, blocksize, torch.float32).view(param.shape)
    lion_update_(param, grad, m, lr, beta1, beta2, weight_decay, grad_scale)
    new_codes, new_absmax = quantize_blockwise_ref(m, code, blocksize, True)
    codes.copy_(new_codes.view(codes.shape))
    absmax.copy_(new_absmax)


_lib.impl("lion8bit_update_", lion8bit_update_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::lion8bit_update_")
def _lion8bit_fake(*args):
    return None


def lion8bit_update_(param, grad, codes, absmax, *, lr, beta1, beta2, weight_decay=0.0, grad_scale=1.0,
                     blocksize=256, code=None) -> None:
    """One Lion step with the momentum stored as uint8 codes + float32 absmax per block (native when loaded)."""
    from lowmem.ops.native import ensure_loaded
    from lowmem.ops.quant import dynamic_map

    ensure_loaded()
    code = dynamic_map(param.device) if code is None else code
    torch.ops.lowmem.lion8bit_update_(param, grad, codes, absmax, code, device_scalar(grad_scale, param.device),
                                      float(lr), float(beta1), float(beta2), float(weight_decay), int(blocksize))
