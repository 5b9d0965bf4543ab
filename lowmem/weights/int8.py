"""Int8 weights with a dense-and-sparse split (QFT, Li et al. 2023): no float copy of a linear weight is kept.

Each ``nn.Linear`` and transformers ``Conv1D`` weight (the output head too with ``model.int8.include_head``) becomes
an :class:`Int8Weight`,
in the layer's own layout:
    dense part   uint8 codes of a symmetric linear map (code 128 is zero, 128 ± 127 is ± absmax) with one
                 float32 absmax per block of ``blocksize`` values: 1 + 4/256 ≈ 1.016 bytes per value;
    sparse part  the ``outlier_fraction`` largest magnitudes, kept exactly as float32 values at int32
                 positions (8 bytes per outlier: 0.08 bytes per value at 1%), so they neither widen their
                 block's scale nor lose precision themselves.
:class:`Int8Linear` dequantizes the weight just in time, in forward and again in backward, so only the layer
at work has a float weight (it saves its input, never the weight). Its weight gradient is handed to the
trainer's strategy as a parameter's would be (``.grad`` plus post-accumulate hooks), and the update is one fused
op (``lowmem.ops.int8_update``): dequantize → the rule's step → requantize, a block of values at a time, with no
float copy of the matrix, for sgd, adafactor/adalomo, lion and lion8bit (other rules step a float32 copy, which
the op then requantizes):

* requantization rounds stochastically (``floor(x + u)``, u ~ U[0, 1)): unbiased, so an update far smaller
  than one code step still moves the weight on average, where rounding to nearest would drop it every time;
* a block's scale only grows between refreshes (by two codes of headroom when a value outgrows it), so the
  grid stays put and weights that did not move are not re-rounded;
* every ``refresh_every`` updates the outlier positions and all block scales are chosen afresh.
The noise u of element i at the weight's t-th update is Philox4x32-10 of (i, t) under the weight's seed (made
from the run's seed and its name): it does not depend on the order the strategy updates weights in, on threads or
devices, and a checkpoint resumes it from the update count alone.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from lowmem.ops.int8_update import (ASSIGN, FACTORED, LION, LION8BIT, SGD, int8_factored_prepare, int8_update_,
                                    linear_map)
from lowmem.ops.int8_update import MAX_CODE, ZERO_CODE  # noqa: F401  (the code layout, as lowmem.perp.prune reads it)
from lowmem.ops.quant import dequantize_blockwise, dynamic_map
from lowmem.rules.factored import Factored
from lowmem.rules.lion import Lion
from lowmem.rules.sgd import SGD as SGDRule

WEIGHT_BLOCKSIZE = 256


class Int8Weight(torch.nn.Module):
    """One linear weight as int8 blocks plus float32 outliers; updated in place by :meth:`update_with`.

    Quacks enough like a trainable parameter for the strategies: ``requires_grad``, ``grad``,
    ``register_post_accumulate_grad_hook``, ``shape``, ``device`` and ``numel()``.
    """

    def __init__(self, weight: torch.Tensor, outlier_fraction: float = 0.01, refresh_every: int = 100,
                 blocksize: int = WEIGHT_BLOCKSIZE, seed: int = 0, stochastic: bool = True):
        super().__init__()
        self.shape = weight.shape
        self.compute_dtype = weight.dtype
        self.n_outliers = min(weight.numel(), round(outlier_fraction * weight.numel()))
        self.refresh_every = refresh_every
        self.blocksize = blocksize
        self.seed = seed
        self.stochastic = stochastic
        self.requires_grad = True
        self.grad: torch.Tensor | None = None
        self._grad_hooks: OrderedDict[int, object] = OrderedDict()  # weak-referenceable, for RemovableHandle
        self.host_updates = 0  # mirrors the ``updates`` buffer (the noise's counter), so no step reads the device
        n_blocks = -(-weight.numel() // blocksize)
        device = weight.device
        self.register_buffer("codes", torch.full((weight.numel(),), ZERO_CODE, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.register_buffer("outlier_index", torch.zeros(self.n_outliers, dtype=torch.int32, device=device))
        self.register_buffer("outlier_value", torch.zeros(self.n_outliers, dtype=torch.float32, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=device))
        with torch.no_grad():  # the outliers and every scale chosen afresh, rounded to nearest
            int8_update_(self.codes, self.absmax, self.outlier_index, self.outlier_value, weight.detach(),
                         rule=ASSIGN, refresh=True, stochastic=False, blocksize=blocksize)

    # -- what the strategies see --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def numel(self) -> int:
        return self.codes.numel()

    def requires_grad_(self, requires_grad: bool = True) -> "Int8Weight":
        self.requires_grad = requires_grad
        return self

    def register_post_accumulate_grad_hook(self, hook) -> RemovableHandle:
        handle = RemovableHandle(self._grad_hooks)
        self._grad_hooks[handle.id] = hook
        return handle

    def accumulate_grad(self, grad: torch.Tensor) -> None:
        """Called from backward: sum into ``.grad`` as autograd does for a parameter, then run the hooks."""
        self.grad = grad if self.grad is None else self.grad + grad
        for hook in list(self._grad_hooks.values()):
            hook(self)

    def template(self) -> torch.Tensor:
        """A float32 tensor of this weight's shape and device that owns no memory, for ``rule.init_state``."""
        return torch.zeros((), dtype=torch.float32, device=self.device).expand(self.shape)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- dequantize, update, requantize ---------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a new float tensor of ``dtype`` (default: the model's dtype)."""
        dtype = dtype or self.compute_dtype
        flat = dequantize_blockwise(self.codes, self.absmax, linear_map(self.device), self.blocksize, dtype)
        if self.n_outliers:
            flat[self.outlier_index.long()] = self.outlier_value.to(dtype)
        return flat.view(self.shape)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start`` to ``stop`` of the (2-D) weight as a new float tensor of ``dtype``: only the blocks that hold
        them are dequantized, so a merge or an export row block by row block holds no float copy of the matrix."""
        dtype = dtype or self.compute_dtype
        cols = self.shape[-1]
        first, last = start * cols, stop * cols
        b0, b1 = first // self.blocksize, -(-last // self.blocksize)
        codes = self.codes[b0 * self.blocksize: min(b1 * self.blocksize, self.codes.numel())]
        flat = dequantize_blockwise(codes, self.absmax[b0:b1], linear_map(self.device), self.blocksize, dtype)
        flat = flat[first - b0 * self.blocksize: last - b0 * self.blocksize]
        if self.n_outliers:
            # No boolean indexing: no shape depends on the data, so nothing is read on the host and the planner's fake
            # tensors run it (the chunked int8 head). Outliers outside the rows write position 0's final value there
            # (its dequantized value, or the value of an outlier inside at 0, whose own code decodes to exactly 0),
            # so every write to a position is the same value: no accumulation (a sort on CUDA) is needed.
            index = self.outlier_index.long()
            inside = (index >= first) & (index < last)
            position = torch.where(inside, index - first, torch.zeros_like(index))
            value = self.outlier_value.to(dtype)
            at_start = torch.where(inside & (position == 0), value, torch.zeros_like(value)).sum()
            flat.index_put_((position,), torch.where(inside, value, flat[0] + at_start))
        return flat.view(stop - start, cols)

    @torch.no_grad()
    def update_with(self, rule, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
                    grad_scale: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None) -> None:
        """One step of ``rule`` on this weight, requantized into the same storage by one fused op; ``mask`` (a
        sparsity mask) zeroes the pruned entries before requantizing (code 128 is exactly zero)."""
        self.updates += 1
        self.host_updates += 1
        refresh = self.refresh_every > 0 and self.host_updates % self.refresh_every == 0
        kwargs = self._rule_kwargs(rule, grad, state, lr, grad_scale)
        if kwargs["rule"] == ASSIGN:  # a rule without an int8 kernel: its step on a float32 copy
            work = self.dequantize(torch.float32)
            rule.update(work, grad, state, lr, grad_scale=grad_scale)
            grad = work
        int8_update_(self.codes, self.absmax, self.outlier_index, self.outlier_value, grad,
                     mask=None if mask is None else mask.reshape(-1), seed=self.seed, step=self.host_updates,
                     refresh=refresh, stochastic=self.stochastic, blocksize=self.blocksize, **kwargs)

    def _rule_kwargs(self, rule, grad, state, lr, grad_scale) -> dict:
        """``int8_update_``'s rule arguments for ``rule`` (see ``lowmem.rules``), running its reductions first."""
        common = {"grad_scale": grad_scale, "lr": lr, "weight_decay": rule.weight_decay}
        if isinstance(rule, SGDRule):
            return {"rule": SGD, **common}
        if isinstance(rule, Factored) and grad.dim() == 2:
            state["step"] += 1
            coef = int8_factored_prepare(
                self.codes, self.absmax, self.outlier_value, grad, state["exp_avg_sq_row"], state["exp_avg_sq_col"],
                step=state["step"], grad_scale=grad_scale, lr=lr, relative_step=rule.relative_step,
                decay_rate=rule.decay_rate, eps1=rule.eps1, clip_threshold=rule.clip_threshold, eps2=rule.eps2,
                scale_parameter=rule.scale_parameter, blocksize=self.blocksize)
            return {"rule": FACTORED, "coef": coef, "state": state.get("exp_avg"), "beta1": rule.beta1 or 0.0, **common}
        if isinstance(rule, Lion) and "exp_avg" in state:
            return {"rule": LION, "state": state["exp_avg"], "beta1": rule.beta1, "beta2": rule.beta2, **common}
        if isinstance(rule, Lion) and rule.blocksize == self.blocksize:
            code = rule._code_on(self.device) if rule.code is not None else dynamic_map(self.device)
            return {"rule": LION8BIT, "state": state["exp_avg_codes"], "state_absmax": state["exp_avg_absmax"],
                    "state_code": code, "beta1": rule.beta1, "beta2": rule.beta2, **common}
        return {"rule": ASSIGN}

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, outliers={self.n_outliers}, blocksize={self.blocksize}, "
                f"refresh_every={self.refresh_every}, stochastic={self.stochastic}")


class _Int8LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b (``nn.Linear``, W stored [out, in]) or y = x·W + b (transformers' ``Conv1D``, W stored
    [in, out]), with W dequantized in forward and again in backward; only x is saved.

    ``anchor`` is an empty tensor that requires grad while the weight trains, so backward reaches this
    node even when neither the input nor the bias needs a gradient (a frozen layer below it).
    """

    @staticmethod
    def forward(ctx, x, anchor, weight: Int8Weight, bias, transposed: bool):
        ctx.weight, ctx.transposed = weight, transposed
        ctx.save_for_backward(x)
        w = weight.dequantize(x.dtype)
        return F.linear(x, w.T if transposed else w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight: Int8Weight = ctx.weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.dequantize(grad_out.dtype)
            grad_x = grad_out @ (w.T if ctx.transposed else w)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = flat_out.sum(0) if ctx.needs_input_grad[3] else None
        if weight.requires_grad:
            flat_x = x.reshape(-1, x.shape[-1])
            grad_w = flat_x.T @ flat_out if ctx.transposed else flat_out.T @ flat_x  # in the stored layout
            weight.accumulate_grad(grad_w)  # a fused strategy applies and frees it right here
        return grad_x, None, None, grad_bias, None


_ANCHOR = torch.empty(0, requires_grad=True)


def backward_anchor(weight: Int8Weight) -> torch.Tensor | None:
    """The ``anchor`` input of an autograd function that uses ``weight``: a tensor that requires grad while the weight
    trains under grad mode (so backward reaches the function even when nothing else needs a gradient), else None."""
    return _ANCHOR if weight.requires_grad and torch.is_grad_enabled() else None


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


class Int8Linear(torch.nn.Module):
    """Drop-in for ``nn.Linear``, or for transformers' ``Conv1D`` (GPT-2's projections: weight stored [in, out],
    ``x @ W + b``), whose weight is an :class:`Int8Weight` kept in the replaced layer's own layout, so the state
    dict (and the exported HF folder) has the same keys and shapes as before."""

    def __init__(self, layer: torch.nn.Module, **int8_options):
        super().__init__()
        self.transposed = not isinstance(layer, torch.nn.Linear)
        if self.transposed:
            self.in_features, self.out_features = layer.weight.shape
        else:
            self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = Int8Weight(layer.weight.data, **int8_options)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, backward_anchor(self.weight), self.weight, self.bias, self.transposed)

    def extra_repr(self) -> str:
        layout = ", layout=Conv1D [in, out]" if self.transposed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}"


# -- whole models ---------------------------------------------------------------------------------------


def _kept_float(model: torch.nn.Module, include_head: bool = False) -> set[int]:
    """Ids of the weights int8 weights leave in ``model.dtype``: the embeddings' and, unless ``include_head``, the
    output head's (also once it is int8 itself: :func:`matrix_layers` then leaves it out, as PERP's pruning wants)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if head is None or include_head:
        return kept
    return kept | {id(p) for p in head.parameters()} | {id(getattr(head, "weight", None))}


def matrix_layers(model: torch.nn.Module, kept: set[int] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The layers int8 weights replace (or have replaced): every ``nn.Linear``, transformers ``Conv1D`` and
    :class:`Int8Linear` except the output head and any whose weight is shared with an embedding (``kept``:
    :func:`_kept_float`, when already known)."""
    kept = _kept_float(model) if kept is None else kept
    conv1d = _conv1d_type()
    kinds = (torch.nn.Linear, Int8Linear, conv1d) if conv1d is not None else (torch.nn.Linear, Int8Linear)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, kinds) and id(module.weight) not in kept]


def quantize_model(model: torch.nn.Module, outlier_fraction: float = 0.01, refresh_every: int = 100,
                   blocksize: int = WEIGHT_BLOCKSIZE, seed: int = 0, stochastic: bool = True,
                   include_head: bool = False) -> int:
    """Replace every layer of :func:`matrix_layers` by an :class:`Int8Linear`, one at a time, so the float
    weight of each is freed as it goes, and with ``include_head`` the output head too (``model.int8.include_head``;
    refused for a head tied to the input embedding, which stays in ``model.dtype``). Returns how many.

    Raises ``UserError`` when a matrix weight outside embeddings and the output head would stay float: a layer
    type lowmem does not quantize (a model's own linear class), which would otherwise train in float silently.
    """
    from lowmem.errors import UserError

    if include_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is None or type(head) is not torch.nn.Linear:
            raise UserError(f"model.int8.include_head: the model's output head is a {type(head).__name__}, not a "
                            "torch.nn.Linear (set model.int8.include_head=false)")
        if embedding is not None and head.weight is embedding.weight:
            raise UserError("model.int8.include_head: the head is tied to the input embedding, which int8 weights "
                            "keep in model.dtype (set model.int8.include_head=false)")
    kept = _kept_float(model, include_head)
    targets = [(name, m) for name, m in matrix_layers(model, kept) if not isinstance(m, Int8Linear)]
    replaced = {id(module.weight) for _, module in targets}
    for name, param in model.named_parameters():
        if param.dim() >= 2 and id(param) not in replaced and id(param) not in kept:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            raise UserError(f"model.weight_format=int8: {name} ({type(owner).__name__}, shape {tuple(param.shape)}) "
                            "would stay float: lowmem stores nn.Linear and transformers Conv1D weights as int8 only "
                            "(use model.weight_format=float for this model)")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        setattr(parent, child, Int8Linear(layer, outlier_fraction=outlier_fraction, refresh_every=refresh_every,
                                          blocksize=blocksize, seed=weight_seed, stochastic=stochastic))
    return len(targets)


def int8_weights(model: torch.nn.Module) -> dict[str, Int8Weight]:
    """Name (as the HF weight it replaces, ``...q_proj.weight``) → :class:`Int8Weight`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Weight)}


def count_weights(model: torch.nn.Module) -> int:
    """Values of every weight of the model: parameters (a tied one once) and int8 weights."""
    return sum(p.numel() for p in model.parameters()) + sum(w.numel() for w in int8_weights(model).values())


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor | Int8Weight]:
    """What a strategy updates: parameters that require grad, and trainable int8 weights."""
    found: dict[str, torch.Tensor | Int8Weight] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    found.update({n: w for n, w in int8_weights(model).items() if w.requires_grad})
    return found


def dequantized_state_dict(model: torch.nn.Module, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The model's state dict with every int8 weight replaced by its float value: what an HF folder holds."""
    weights = int8_weights(model)
    prefixes = tuple(f"{name}." for name in weights)
    state = {k: v.to(device) for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    state.update({name: w.dequantize().to(device) for name, w in weights.items()})
    return state


def int8_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to resume int8 weights exactly: codes, scales, outliers and update counts (the rounding
    noise's counter; its key is the weight's seed) (flat name → CPU tensor, safetensors-ready)."""
    return {f"{name}.{key}": buffer.detach().cpu()
            for name, weight in int8_weights(model).items() for key, buffer in weight.named_buffers()}


def load_int8_state_dict(model: torch.nn.Module, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`int8_state_dict`. Checkpoints of format 2 and 3 also hold each weight's rounding generator
    state (``NAME.rounding_rng[.DEVICE]``): the noise is counter-based now, so those are read past and rounding
    continues from the saved update count."""
    weights = int8_weights(model)
    missing = [f"{n}.codes" for n in weights if f"{n}.codes" not in flat]
    if missing:
        raise ValueError(f"int8 weight state lacks {missing[0]} (and {len(missing) - 1} more)")
    for name, weight in weights.items():
        for key, buffer in weight.named_buffers():
            saved = flat[f"{name}.{key}"]
            if saved.shape != buffer.shape:
                raise ValueError(f"{name}.{key} has shape {tuple(saved.shape)}, the model expects {tuple(buffer.shape)}")
            buffer.copy_(saved)
        weight.host_updates = int(flat[f"{name}.updates"])
