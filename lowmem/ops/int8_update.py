"""The fused int8-weight update: dequantize → rule → requantize in one pass over the codes, with no float copy of
the matrix. Schemas and pure-PyTorch references (the specification and the fallback); native kernels in
``csrc/cpu/int8_update.cpp`` and ``csrc/cuda/int8_update.cu`` override them.

``int8_update_``            one step of a rule on an int8 weight (``lowmem.weights.int8``: uint8 codes of the linear
                            map, one float32 absmax per block, float32 outliers at sorted int32 positions), in place.
                            Rules (``rule``): SGD, FACTORED (Adafactor/AdaLomo's element-wise part, from the
                            coefficients of ``int8_factored_prepare``), LION (float32 momentum), LION8BIT (momentum as
                            dynamic-map codes + absmax per block of the same size as the weight's), ASSIGN (the new
                            value is given: a rule with no kernel here, and the initial quantization).
``int8_factored_prepare``   the factored rules' reductions, each reading one tensor: the row and column statistics of
                            the gradient (updated in place), the update's RMS clip (the gradient again) and the
                            weight's RMS (the codes); returns [r (rows), c (cols), clip divisor, α] (float32).

Requantization: a block's scale only grows (two codes of headroom when a value outgrows it) except at a refresh,
which picks the ``n_outliers`` largest magnitudes afresh (ties to the lower index) and every block scale afresh.
Rounding is stochastic, ``floor(x·scale + u)``, with u from Philox4x32-10 (Salmon et al. 2011) keyed by the
weight's seed and counted by (element index, update count): the noise of element i at update t is the same on
any thread or block layout and on CPU and CUDA, and resuming needs only the seed and the count.

Every element's arithmetic is float32 with one rounding per operation, in the order written here (the kernels are
built without fused multiply-adds), so the native kernels equal these references bit for bit given the same
coefficients; the prepare reductions sum in double natively and agree to float32 rounding.
"""

from __future__ import annotations

import struct

import torch

from lowmem.ops.quant import _lib, dequantize_blockwise_ref, quantize_blockwise_ref
from lowmem.ops.update import factored_statistics_, factored_step_scalars
from lowmem.placement.tensor_cache import tensor_cache

SGD, FACTORED, LION, LION8BIT, ASSIGN = 0, 1, 2, 3, 4
RULE_NAMES = {SGD: "sgd", FACTORED: "factored", LION: "lion", LION8BIT: "lion8bit", ASSIGN: "assign"}
ZERO_CODE = 128
MAX_CODE = 127  # codes span ZERO_CODE ± MAX_CODE; code 0 is never written


def f32(x: float) -> float:
    """``x`` rounded to float32 (as a C ``static_cast<float>`` of a double does), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


HEADROOM = f32(1 + 2 / MAX_CODE)  # a scale that must grow grows two codes beyond the value that outgrew it

_lib.define(
    "int8_update_(Tensor(a!) codes, Tensor(b!) absmax, Tensor(c!) outlier_index, Tensor(d!) outlier_value, "
    "Tensor grad, Tensor mask, Tensor(e!) state, Tensor(f!) state_absmax, Tensor state_code, Tensor coef, "
    "Tensor grad_scale, int rule, float lr, float weight_decay, float beta1, float beta2, int seed, int step, "
    "bool refresh, bool stochastic, int blocksize) -> ()"
)
_lib.define(
    "int8_factored_prepare(Tensor codes, Tensor absmax, Tensor outlier_value, Tensor grad, Tensor(a!) row, "
    "Tensor(b!) col, Tensor step, Tensor grad_scale, float lr, bool relative_step, float decay_rate, float eps1, "
    "float clip_threshold, float eps2, bool scale_parameter, int blocksize) -> Tensor"
)


@tensor_cache()
def _linear_map_on(device: str) -> torch.Tensor:
    return (torch.arange(256, dtype=torch.float32, device=device) - ZERO_CODE) / MAX_CODE


def linear_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry symmetric linear code map of int8 weights: entry i is (i − 128) / 127 (one shared copy per
    device: never write to it)."""
    return _linear_map_on(str(torch.device(device)))


# -- Philox4x32-10, in int64 arithmetic on 32-bit values -------------------------------------------------------

_MASK = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a·b, from 16-bit pieces so int64 never overflows."""
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK
    high = (p_hi + (p_lo >> 16)) >> 16
    return high, low


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32 with 10 rounds (Random123's ``philox4x32``): four int64 tensors of 32-bit counter words and a key
    of two 32-bit words → four int64 tensors of 32-bit outputs."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK, (k1 + _PHILOX_W[1]) & _MASK
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def rounding_noise(n: int, seed: int, step: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The stochastic-rounding noise u ∈ [0, 1) of elements ``start`` … ``start + n − 1`` at update ``step``
    (float32, multiples of 2⁻²⁴): element i takes word i mod 4 of Philox4x32-10 at counter
    (⌊i/4⌋ low, ⌊i/4⌋ high, step low, step high) under key (seed low, seed high)."""
    first, last = start >> 2, (start + n - 1) >> 2
    group = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10([group & _MASK, group >> 32, torch.full_like(group, step & _MASK),
                           torch.full_like(group, (step >> 32) & _MASK)], (seed & _MASK, (seed >> 32) & _MASK))
    bits = torch.stack(words, dim=1).reshape(-1)[start - 4 * first: start - 4 * first + n]  # group by group
    return (bits >> 8).to(torch.float32) * 2.0**-24


# -- references -------------------------------------------------------------------------------------------------


def _dequantized(codes, absmax, outlier_index, outlier_value, blocksize) -> torch.Tensor:
    w = dequantize_blockwise_ref(codes.reshape(-1), absmax, linear_map(codes.device), blocksize, torch.float32)
    if outlier_index.numel():
        w[outlier_index.long()] = outlier_value
    return w


def _rule_value(rule, w, g, state, state_absmax, state_code, coef, lr, weight_decay, beta1, beta2, blocksize):
    """The new float32 value of every element (a new tensor), writing the rule's state."""
    if rule == SGD:
        return w * f32(1.0 - lr * weight_decay) + g * f32(-lr)
    if rule == FACTORED:
        rows = coef.numel() - 2 - g.shape[-1]
        r, c, denom, alpha = coef[:rows], coef[rows:-2], coef[-2], coef[-1]
        update = (g * (r[:, None] * c[None, :])) / denom * alpha
        if state.numel():
            m = state.view(update.shape)
            m.copy_(m * f32(beta1) + update * f32(1.0 - f32(beta1)))
            update = m
        if weight_decay:
            w = w + w * (alpha * f32(-weight_decay))
        return w - update
    if rule in (LION, LION8BIT):
        if rule == LION8BIT:
            m = dequantize_blockwise_ref(state, state_absmax, state_code, blocksize, torch.float32).view(g.shape)
        else:
            m = state.view(g.shape)
        b1, b2 = f32(beta1), f32(beta2)
        c = m * b1 + g * f32(1.0 - b1)
        new = w * f32(1.0 - lr * weight_decay) + torch.sign(c) * f32(-lr)
        m_new = m * b2 + g * f32(1.0 - b2)
        if rule == LION8BIT:
            codes, new_absmax = quantize_blockwise_ref(m_new, state_code, blocksize, True)
            state.copy_(codes.view(state.shape))
            state_absmax.copy_(new_absmax)
        else:
            m.copy_(m_new)
        return new
    raise ValueError(f"int8_update_: unknown rule {rule}")


def int8_update_ref(codes, absmax, outlier_index, outlier_value, grad, mask, state, state_absmax, state_code, coef,
                    grad_scale, rule, lr, weight_decay, beta1, beta2, seed, step, refresh, stochastic, blocksize):
    """Reference of ``int8_update_``: the whole matrix at once (float32 temporaries of its size)."""
    n = codes.numel()
    cols = grad.shape[-1] if grad.dim() >= 2 else n
    if rule == ASSIGN:
        new = grad.reshape(-1).to(torch.float32, copy=True)
    else:
        w = _dequantized(codes, absmax, outlier_index, outlier_value, blocksize).view(-1, cols)
        g = grad.reshape(-1, cols).to(torch.float32) * grad_scale
        new = _rule_value(rule, w, g, state, state_absmax, state_code, coef, lr, weight_decay, beta1, beta2,
                          blocksize).reshape(-1)
    if mask.numel():
        new = torch.where(mask.reshape(-1), new, torch.zeros((), dtype=torch.float32, device=new.device))
    k = outlier_index.numel()
    if k:
        if refresh:
            order = torch.sort(new.abs(), descending=True, stable=True).indices[:k]
            outlier_index.copy_(order.sort().values)
        index = outlier_index.long()
        outlier_value.copy_(new[index])
        new[index] = 0.0
    n_blocks = absmax.numel()
    blocks = new.new_zeros(n_blocks * blocksize)
    blocks[:n] = new
    blocks = blocks.view(n_blocks, blocksize)
    block_max = blocks.abs().amax(dim=1)
    if refresh:
        absmax.copy_(block_max)
    else:
        absmax.copy_(torch.where(block_max > absmax, block_max * HEADROOM, absmax))
    scale = torch.where(absmax > 0, f32(MAX_CODE) / absmax, torch.zeros_like(absmax))
    scaled = (blocks * scale[:, None]).view(-1)[:n]
    if stochastic:
        scaled = torch.floor(scaled + rounding_noise(n, seed, step, codes.device))
    else:
        scaled = torch.round(scaled)
    codes.copy_((scaled.clamp(-MAX_CODE, MAX_CODE) + ZERO_CODE).to(torch.uint8).view(codes.shape))


def int8_factored_prepare_ref(codes, absmax, outlier_value, grad, row, col, step, grad_scale, lr, relative_step,
                              decay_rate, eps1, clip_threshold, eps2, scale_parameter, blocksize):
    """Reference of ``int8_factored_prepare``: transformers' Adafactor statistics for a matrix (as
    ``lowmem.ops.update.factored_update_ref``), the weight's RMS read from codes and outliers (an outlier's own code
    is the zero code)."""
    g = grad.to(torch.float32) * grad_scale
    beta2t, keep_new, rho = factored_step_scalars(step, lr, relative_step, decay_rate, torch.float32)
    if scale_parameter:
        w = dequantize_blockwise_ref(codes, absmax, linear_map(codes.device), blocksize, torch.float32)
        sum_sq = w.double().pow(2).sum() + outlier_value.double().pow(2).sum()
        alpha = rho * (sum_sq / codes.numel()).sqrt().float().clamp(min=eps2)
    else:
        alpha = torch.full((), f32(rho), dtype=torch.float32, device=g.device) if isinstance(rho, float) else rho
    r_factor, c_factor = factored_statistics_(g * g, row, col, beta2t, keep_new, eps1)
    u = g * (r_factor * c_factor)
    denom = (u.double().pow(2).mean().sqrt() / clip_threshold).clamp(min=1.0).float()
    return torch.cat([r_factor.view(-1), c_factor.view(-1), denom.view(1), alpha.view(1).float()])


_lib.impl("int8_update_", int8_update_ref, "CompositeExplicitAutograd")
_lib.impl("int8_factored_prepare", int8_factored_prepare_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::int8_update_")
def _int8_update_fake(*args):
    return None


@torch.library.register_fake("lowmem::int8_factored_prepare")
def _int8_prepare_fake(codes, absmax, outlier_value, grad, row, col, *args):
    return grad.new_empty((row.numel() + col.numel() + 2,), dtype=torch.float32)


# -- entry points -----------------------------------------------------------------------------------------------


@tensor_cache(maxsize=16)
def _empty(dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def empty_on(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A shared empty tensor (an absent optional argument of the ops): never resize it."""
    return _empty(dtype, str(torch.device(device)))


def int8_update_(codes, absmax, outlier_index, outlier_value, grad, *, rule: int, mask=None, state=None,
                 state_absmax=None, state_code=None, coef=None, grad_scale=1.0, lr=0.0, weight_decay=0.0, beta1=0.0,
                 beta2=0.0, seed=0, step=0, refresh=False, stochastic=True, blocksize=256) -> None:
    """One fused step on an int8 weight's buffers, in place (native when loaded); optional tensors default to empty."""
    from lowmem.ops.native import ensure_loaded
    from lowmem.ops.update import device_scalar

    ensure_loaded()
    device = codes.device
    none_f = empty_on(device)
    torch.ops.lowmem.int8_update_(
        codes, absmax, outlier_index, outlier_value, grad,
        mask if mask is not None else empty_on(device, torch.bool), state if state is not None else none_f,
        state_absmax if state_absmax is not None else none_f, state_code if state_code is not None else none_f,
        coef if coef is not None else none_f, device_scalar(grad_scale, device), int(rule), float(lr),
        float(weight_decay), float(beta1), float(beta2), int(seed), int(step), bool(refresh), bool(stochastic),
        int(blocksize))


def int8_factored_prepare(codes, absmax, outlier_value, grad, row, col, *, step, grad_scale=1.0, lr,
                          relative_step=False, decay_rate, eps1, clip_threshold, eps2, scale_parameter,
                          blocksize=256) -> torch.Tensor:
    """The factored rules' coefficients for :func:`int8_update_` (updates ``row`` and ``col``; native when loaded)."""
    from lowmem.ops.native import ensure_loaded
    from lowmem.ops.update import device_scalar

    ensure_loaded()
    device = codes.device
    return torch.ops.lowmem.int8_factored_prepare(
        codes, absmax, outlier_value, grad, row, col, device_scalar(step, device), device_scalar(grad_scale, device),
        float(lr), bool(relative_step), float(decay_rate), float(eps1), float(clip_threshold), float(eps2),
        bool(scale_parameter), int(blocksize))
