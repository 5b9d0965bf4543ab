"""PERP's retraining subsets (Zimmer et al. 2023): after pruning, train a tiny expressive part of the model.

``update.trainable``:
    all         every weight; pruned weights keep their zeros (``lowmem.weights.masks``).
    norms       the normalization layers' weights and every bias.
    norms+head  those and the output head (tied to the input embeddings, that trains the embeddings too).
    mask_lora   norms and biases, and on each prunable matrix W a rank-r adapter whose product is masked by the
                sparsity pattern:  W' = W + s·(BA ⊙ M),  s = lora.alpha / lora.rank,  B = 0 and A as LoRA's at start.
    scale_lora  norms and biases, and  W' = W ⊙ BA,  A = B = 1/√r at start (BA = 1): pruned entries stay zero.
As in PERP's code, the adapted layers are the matrices pruning touches (not the head), and their own weights W stay
frozen. M is the layer's stored mask (``lowmem.weights.masks``), or W ≠ 0 when the model came without one.

:class:`AdaptedLinear` computes  y = x·W'ᵀ + b  with a custom autograd function that saves only x (and the small
A, B): W' is rebuilt in backward, so no weight-sized tensor is kept per layer between forward and backward.
Merging (:meth:`AdaptedLinear.merged_weight`, written by ``lowmem.hf_folder``) writes W' into the weight, so the
exported model has no adapters and its pruned entries are exactly zero — a plain LoRA merge W + s·BA would fill them.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from lowmem.errors import UserError
from lowmem.weights.int8 import Int8Weight, count_weights, int8_weights, matrix_layers, trainable_tensors
from lowmem.weights.masks import MASK_BUFFER, attach_masks, mask_of, mask_rows
from lowmem.perp.prune import row_blocks, stored_transposed, weight_value

log = logging.getLogger("lowmem")

SUBSETS = ("all", "norms", "norms+head", "mask_lora", "scale_lora")
ADAPTERS = ("mask_lora", "scale_lora")
ADAPTER_KEYS = ("lora_A", "lora_B")
ADAPTERS_FILE = "adapters.safetensors"
MERGE_CHUNK_VALUES = 2**22  # values per block of rows a merge computes at once (16 MiB of float32 per temporary)


def _effective_weight(layer: "AdaptedLinear", dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W' in [out, in] layout, in ``dtype``."""
    w = layer.base_weight(dtype)
    w = w.T if layer.transposed else w
    product = b.to(dtype) @ a.to(dtype)
    if layer.kind == "scale_lora":
        return w * product
    return w + product.mul_(layer.mask(w.device, transposed=True)).mul_(layer.scale)


class _AdaptedLinearFunction(torch.autograd.Function):
    """y = x·W'ᵀ + b with W' of :func:`_effective_weight`; saves x, A and B only, rebuilds W' in backward."""

    @staticmethod
    def forward(ctx, x, a, b, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, a, b)
        return F.linear(x, _effective_weight(layer, x.dtype, a, b), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b = ctx.saved_tensors
        layer: AdaptedLinear = ctx.layer
        dtype = grad_out.dtype
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _effective_weight(layer, dtype, a, b)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_bias = flat_out.sum(0)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dL/dW' = gᵀx, then through W' = W + s·(BA ⊙ M) or W ⊙ BA to dL/d(BA), then to B and A
            grad_w = flat_out.T @ x.reshape(-1, x.shape[-1])
            if layer.kind == "scale_lora":
                w = layer.base_weight(dtype)
                grad_product = grad_w.mul_(w.T if layer.transposed else w)
            else:
                grad_product = grad_w.mul_(layer.mask(grad_w.device, transposed=True)).mul_(layer.scale)
            grad_b = (grad_product @ a.to(dtype).T).to(b.dtype)
            grad_a = (b.to(dtype).T @ grad_product).to(a.dtype)
        return grad_x, grad_a, grad_b, grad_bias, None


class AdaptedLinear(torch.nn.Module):
    """A prunable layer (``nn.Linear``, ``Conv1D`` or :class:`Int8Linear`) with a PERP adapter. It keeps the layer's
    ``weight`` and ``bias`` under their own names (and its mask buffer), so the state dict's HF keys are unchanged;
    ``lora_A`` [r, in] and ``lora_B`` [out, r] are added beside them."""

    def __init__(self, layer: torch.nn.Module, kind: str, rank: int, alpha: float):
        super().__init__()
        self.kind = kind
        self.transposed = stored_transposed(layer)
        self.weight = layer.weight
        self.bias = layer.bias
        bits = getattr(layer, MASK_BUFFER, None)
        if bits is not None:
            self.register_buffer(MASK_BUFFER, bits, persistent=False)
        shape = self.weight.shape
        in_features, out_features = (shape[0], shape[1]) if self.transposed else (shape[1], shape[0])
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        # float32 whatever the model's dtype: the adapters are tiny, and in bfloat16 an update below ~1% of a value
        # (scale_lora's start is 1/√r) would round away; the function casts them to the compute dtype
        device = self.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = torch.nn.Parameter(torch.empty(out_features, rank, dtype=torch.float32, device=device))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        if self.kind == "scale_lora":  # BA = 1: W' = W at start
            self.lora_A.fill_(1 / math.sqrt(self.rank))
            self.lora_B.fill_(1 / math.sqrt(self.rank))
        else:  # LoRA's start: A as nn.Linear's default, B = 0, so W' = W
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in its stored layout, in ``dtype`` (int8 weights dequantized)."""
        if isinstance(self.weight, Int8Weight):
            return self.weight.dequantize(dtype)
        return self.weight.to(dtype)

    def mask(self, device: torch.device, transposed: bool = False) -> torch.Tensor:
        """The sparsity mask (stored layout; [out, in] with ``transposed`` for a Conv1D layout)."""
        m = mask_of(self, device)
        return m.T if transposed and self.transposed else m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AdaptedLinearFunction.apply(x, self.lora_A, self.lora_B, self.bias, self)

    def base_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start`` to ``stop`` of W in its stored layout, in ``dtype`` (a view when nothing converts: never
        write to it)."""
        if isinstance(self.weight, Int8Weight):
            return self.weight.dequantize_rows(start, stop, dtype)
        return self.weight[start:stop].to(dtype)

    @torch.no_grad()
    def merged_weight(self, chunk_values: int | None = None) -> torch.Tensor:
        """W' in the stored layout and the weight's dtype (math in float32, or float64 for float64 weights), computed
        a block of stored rows at a time: the merge holds its result, one matrix, and one block's temporaries (the
        base weight's rows, the rows of B·A, the mask's rows), never float copies of the whole matrix."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        rows, cols = self.weight.shape
        a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)  # r × in, out × r: small
        out = torch.empty((rows, cols), dtype=self.weight.dtype, device=self.lora_A.device)
        for start, stop in row_blocks(rows, cols, chunk_values or MERGE_CHUNK_VALUES):
            # rows of B·A in the stored layout: output rows (Linear), or input rows of its transpose (Conv1D)
            product = a[:, start:stop].T @ b.T if self.transposed else b[start:stop] @ a
            w = self.base_rows(start, stop, dtype)
            if self.kind == "scale_lora":
                product.mul_(w)
            else:
                product.mul_(mask_rows(self, start, stop, product.device)).mul_(self.scale).add_(w)
            out[start:stop] = product
        return out

    def extra_repr(self) -> str:
        return (f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------- subsets


def _is_norm(module: torch.nn.Module) -> bool:
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    return isinstance(module, norm_types) or type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))


def norm_and_bias_names(model: torch.nn.Module) -> set[str]:
    """Weights of normalization layers, and every bias."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if _is_norm(module):
            names |= {f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)}
        bias = module._parameters.get("bias")
        if bias is not None:
            names.add(f"{prefix}bias")
    return names


def select_trainable(model: torch.nn.Module, subset: str, rank: int = 16, alpha: float | None = None) -> dict[str, int]:
    """Set what trains for ``update.trainable`` (adding adapters for the LoRA kinds) before the strategy is built;
    returns ``{"trainable": n, "total": n}`` in values (total: the model's own weights, adapters excluded).
    ``alpha`` (``lora.alpha``): None is 2 × ``rank``."""
    if subset not in SUBSETS:
        raise UserError(f"update.trainable '{subset}' is not one of {', '.join(SUBSETS)}")
    alpha = alpha if alpha is not None else 2.0 * rank
    total = count_weights(model)
    if subset != "all":
        keep = norm_and_bias_names(model)
        if subset == "norms+head":
            head = model.get_output_embeddings()
            if head is None:
                raise UserError("update.trainable=norms+head: the model has no output head (use norms)")
            head_name = next(n for n, m in model.named_modules() if m is head)
            keep |= {f"{head_name}.{n}" for n, _ in head.named_parameters(recurse=False)}
            if head.weight is model.get_input_embeddings().weight:
                log.warning("update.trainable=norms+head: the head is tied to the input embeddings, which train too")
        if not keep and subset not in ADAPTERS:
            raise UserError(f"update.trainable={subset}: the model has no normalization weights or biases to train")
        # by identity: a tied weight is listed once, under its first name (the embeddings'), yet "lm_head.weight"
        # names it too
        keep_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in keep}
        for param in model.parameters():
            param.requires_grad_(id(param) in keep_ids)
        for weight in int8_weights(model).values():
            weight.requires_grad_(False)
        if subset in ADAPTERS:
            add_adapters(model, subset, rank, alpha)
    # counted once per tensor: a tied weight is one parameter
    trainable = sum(t.numel() for t in trainable_tensors(model).values())
    return {"trainable": trainable, "total": total}


def add_adapters(model: torch.nn.Module, kind: str, rank: int, alpha: float) -> int:
    """Replace every prunable matrix layer by an :class:`AdaptedLinear`; a layer without a mask gets W ≠ 0."""
    layers = matrix_layers(model)
    if kind == "mask_lora":
        derived = 0
        for name, layer in layers:  # one layer's unpacked mask at a time
            if getattr(layer, MASK_BUFFER, None) is None:
                attach_masks(model, {f"{name}.weight": _nonzero(layer)})
                derived += 1
        if derived:
            log.info("mask_lora: %d layers have no stored mask; their mask is W != 0", derived)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        adapted = AdaptedLinear(layer, kind, rank, alpha)
        adapted.weight.requires_grad_(False)
        setattr(model.get_submodule(parent_name), child, adapted)
    return len(layers)


def _nonzero(layer: torch.nn.Module) -> torch.Tensor:
    return weight_value(layer) != 0


def adapted_layers(model: torch.nn.Module) -> dict[str, AdaptedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``NAME.lora_A`` / ``NAME.lora_B`` → CPU tensors (safetensors-ready)."""
    return {f"{name}.{key}": getattr(layer, key).detach().cpu()
            for name, layer in adapted_layers(model).items() for key in ADAPTER_KEYS}


def load_adapter_state_dict(model: torch.nn.Module, flat: dict[str, torch.Tensor]) -> None:
    layers = adapted_layers(model)
    expected = {f"{n}.{k}" for n in layers for k in ADAPTER_KEYS}
    if set(flat) != expected:
        missing = sorted(expected - set(flat)) or sorted(set(flat) - expected)
        raise ValueError(f"adapter weights do not match the model's adapters ({missing[0]})")
    with torch.no_grad():
        for key, tensor in flat.items():
            name, attr = key.rsplit(".", 1)
            target = getattr(layers[name], attr)
            if target.shape != tensor.shape:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the model's {tuple(target.shape)} "
                                 "(resume with the lora.rank it was written with)")
            target.copy_(tensor)
