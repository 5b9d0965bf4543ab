"""Fused per-tensor update ops: their schemas and pure-PyTorch references (the specification and the
fallback). Native kernels in ``csrc/cpu/{update,lion8bit}.cpp`` and ``csrc/cuda/{update,lion8bit}.cu``
override them.

``sgd_update_``       θ ← θ·(1 − lr·wd) − lr·(s·g)                      (LOMO's rule; s = unscale × clip)
``factored_update_``  Adafactor/AdaLomo: second-moment statistics of (s·g)² + ε₁ (row and column means
                      for matrices, full for vectors), u = g/√v̂, u /= max(1, RMS(u)/d), α = ρ·max(ε₂, RMS(θ))
                      (or ρ), optional first moment m ← β₁m + (1−β₁)αu, θ ← θ − α·wd·θ − (m or αu).
``lion8bit_update_``  Lion with the momentum as uint8 codes + float32 absmax per block (QFT).
All math is float32; the weight is written back in its own dtype.
"""

from __future__ import annotations

import torch

from lowmem.ops.quant import _lib  # the one "lowmem" library

_lib.define("sgd_update_(Tensor(a!) param, Tensor grad, float lr, float weight_decay, float grad_scale) -> ()")
_lib.define(
    "factored_update_(Tensor(a!) param, Tensor grad, Tensor(b!) row, Tensor(c!) col, Tensor(d!) exp_avg, "
    "float grad_scale, float beta2t, float eps1, float clip_threshold, float rho, float eps2, "
    "bool scale_parameter, float weight_decay, float beta1) -> ()"
)


def scaled_grad(grad: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``grad_scale · grad`` in float32 (no multiplication, and for a float32 grad no copy, when it is 1)."""
    g = grad.to(torch.float32)
    return g if grad_scale == 1.0 else g * grad_scale


def sgd_update_ref(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float, grad_scale: float) -> None:
    """Reference of ``sgd_update_``: in place on ``param``."""
    work = param if param.dtype == torch.float32 else param.float()
    g = scaled_grad(grad, grad_scale)
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


def factored_update_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    exp_avg: torch.Tensor,
    grad_scale: float,
    beta2t: float,
    eps1: float,
    clip_threshold: float,
    rho: float,
    eps2: float,
    scale_parameter: bool,
    weight_decay: float,
    beta1: float,
) -> None:
    """Reference of ``factored_update_``: updates ``param``, ``row``, ``col`` and ``exp_avg`` in place.

    ``exp_avg`` with no elements means no first moment; ``col`` with no elements means ``row`` is the full
    second moment of a vector. Follows transformers' Adafactor operation for operation.
    """
    work = param.float()
    g = scaled_grad(grad, grad_scale)
    alpha = rho * max(eps2, float(work.pow(2).mean().sqrt())) if scale_parameter else rho
    sq = g * g + eps1
    if col.numel() > 0:
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = g * (r_factor * c_factor)
    else:
        row.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
        update = row.rsqrt() * g
    update.div_((update.pow(2).mean().sqrt() / clip_threshold).clamp(min=1.0))
    update.mul_(alpha)
    if exp_avg.numel() > 0:
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        update = exp_avg
    if weight_decay:
        work.add_(work, alpha=-weight_decay * alpha)
    work.add_(-update)
    param.copy_(work)


_lib.impl("sgd_update_", sgd_update_ref, "CompositeExplicitAutograd")
_lib.impl("factored_update_", factored_update_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::sgd_update_")
def _sgd_fake(param, grad, lr, weight_decay, grad_scale):
    return None


@torch.library.register_fake("lowmem::factored_update_")
def _factored_fake(param, grad, row, col, exp_avg, *args):
    return None


def sgd_update_(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float = 0.0, grad_scale: float = 1.0):
    """Apply LOMO's SGD step to ``param`` in place (native kernel when loaded)."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    torch.ops.lowmem.sgd_update_(param, grad, float(lr), float(weight_decay), float(grad_scale))


def factored_update_(param, grad, row, col, exp_avg, *, grad_scale=1.0, beta2t, eps1, clip_threshold, rho, eps2,
                     scale_parameter, weight_decay, beta1=0.0) -> None:
    """Apply one Adafactor/AdaLomo step in place (native kernel when loaded)."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    torch.ops.lowmem.factored_update_(param, grad, row, col, exp_avg, float(grad_scale), float(beta2t), float(eps1),
                                      float(clip_threshold), float(rho), float(eps2), bool(scale_parameter),
                                      float(weight_decay), float(beta1))


# ---------------------------------------------------------------------------------------------------
# Lion with an int8 blockwise-quantized momentum (QFT)

_lib.define(
    "lion8bit_update_(Tensor(a!) param, Tensor grad, Tensor(b!) codes, Tensor(c!) absmax, Tensor code, float lr, "
    "float beta1, float beta2, float weight_decay, float grad_scale, int blocksize) -> ()"
)


def lion_update_(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale) -> None:
    """One Lion step with a float32 momentum ``exp_avg`` (shaped like ``param``), in place: c = β₁m + (1−β₁)g,
    θ ← θ(1 − lr·wd) − lr·sign(c), m ← β₂m + (1−β₂)g. The ``lion`` rule and the lion8bit reference share it."""
    g = scaled_grad(grad, grad_scale)
    c = exp_avg.mul(beta1).add_(g, alpha=1.0 - beta1)
    work = param if param.dtype == torch.float32 else param.float()
    if weight_decay:
        work.mul_(1.0 - lr * weight_decay)
    work.add_(torch.sign(c), alpha=-lr)
    if work is not param:
        param.copy_(work)
    exp_avg.mul_(beta2).add_(g, alpha=1.0 - beta2)


def lion8bit_update_ref(param, grad, codes, absmax, code, lr, beta1, beta2, weight_decay, grad_scale, blocksize):
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
    torch.ops.lowmem.lion8bit_update_(param, grad, codes, absmax, code, float(lr), float(beta1), float(beta2),
                                      float(weight_decay), float(grad_scale), int(blocksize))
