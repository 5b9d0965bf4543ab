"""Pruning (PERP's first half): choose which entries of each matrix weight to zero, zero them, and keep the masks.

Criteria (``prune.criterion``):
    magnitude  score |W|; the smallest ``sparsity`` share of each matrix is pruned (one threshold per matrix);
    wanda      score |W_ij|·‖x_j‖₂ (Sun et al. 2023), x_j the layer's input feature j over calibration tokens of the
               recipe's training data (sums of squares gathered by forward pre-hooks, in float32); pruned per
               output row, as in the Wanda paper.
Patterns (``prune.pattern``): ``unstructured``, or N:M (``2:4``, ``4:8``): in every group of M consecutive entries
along the input dimension the N highest-scoring are kept (sparsity is then (M−N)/M).

Pruned are the layers int8 weights would quantize (``nn.Linear`` and transformers' ``Conv1D`` outside embeddings
and output head); the output head too with ``prune.include_head``. Embeddings never are. Weights are read and
written in the layer's stored layout, float or int8 (dequantized, pruned, requantized: code 128 is exactly zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowmem.errors import UserError
from lowmem.int8_weights import Int8Weight, count_weights, matrix_layers
from lowmem.masks import attach_masks

log = logging.getLogger("lowmem")

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


@dataclass
class LayerSparsity:
    name: str
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class PruneReport:
    layers: list[LayerSparsity]
    total_params: int  # every weight of the model (int8 weights counted by their values)

    @property
    def pruned_numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Zeros over the pruned matrices' entries."""
        return self.zeros / max(self.pruned_numel, 1)

    @property
    def model_sparsity(self) -> float:
        """Zeros of the pruned matrices over every weight of the model."""
        return self.zeros / max(self.total_params, 1)

    def table(self) -> str:
        width = max((len(layer.name) for layer in self.layers), default=5)
        lines = [f"{'layer':<{width}}  {'entries':>12}  sparsity"]
        lines += [f"{layer.name:<{width}}  {layer.numel:>12,}  {layer.sparsity:8.4f}" for layer in self.layers]
        lines.append(f"{'pruned matrices':<{width}}  {self.pruned_numel:>12,}  {self.sparsity:8.4f}")
        lines.append(f"{'whole model':<{width}}  {self.total_params:>12,}  {self.model_sparsity:8.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "model_sparsity": self.model_sparsity, "total_params": self.total_params,
                "layers": {layer.name: {"sparsity": layer.sparsity, "numel": layer.numel} for layer in self.layers}}


# ----------------------------------------------------------------------------------------------- which layers


def prunable_layers(model: torch.nn.Module, include_head: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """(module name, layer) of the matrices to prune: :func:`matrix_layers`, plus the untied output head."""
    layers = matrix_layers(model)
    if include_head:
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        if head is None:
            raise UserError("prune.include_head: the model has no output head")
        if head.weight is embed.weight:
            raise UserError("prune.include_head: the output head is tied to the input embeddings, which are never "
                            "pruned (set prune.include_head=false)")
        name = next(n for n, m in model.named_modules() if m is head)
        layers.append((name, head))
    return layers


def stored_transposed(layer: torch.nn.Module) -> bool:
    """Whether the stored weight is [in, out] (transformers' Conv1D, or an int8/adapted layer replacing one)."""
    return getattr(layer, "transposed", not isinstance(layer, torch.nn.Linear) and type(layer).__name__ == "Conv1D")


def weight_value(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as float32 in its stored layout (a copy for int8 weights, a view otherwise)."""
    weight = layer.weight
    if isinstance(weight, Int8Weight):
        return weight.dequantize(torch.float32)
    return weight.detach().float()


def zero_pruned(layer: torch.nn.Module, mask: torch.Tensor) -> None:
    """Set the weight's entries outside ``mask`` to exactly zero (int8: requantized with fresh scales)."""
    weight = layer.weight
    with torch.no_grad():
        if isinstance(weight, Int8Weight):
            value = weight.dequantize(torch.float32).mul_(mask)
            weight._store(value.view(-1), rescale=True, stochastic=False)
        else:
            weight.mul_(mask)


# ----------------------------------------------------------------------------------------------- scores and masks


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """The entries to keep of an [out, in] score matrix: per N:M group along ``in``, per output row (``per_row``),
    or over the whole matrix. Exactly ``round(sparsity · n)`` entries of each row or matrix are pruned; ties go to
    the lower index."""
    out_features, in_features = scores.shape
    nm = PATTERNS[pattern]
    if nm is not None:
        n, m = nm
        groups = scores.reshape(out_features, in_features // m, m)
        kept = torch.zeros_like(groups, dtype=torch.bool)
        kept.scatter_(2, groups.topk(n, dim=2, sorted=False).indices, True)
        return kept.view(out_features, in_features)
    rows = scores if per_row else scores.reshape(1, -1)
    n_prune = round(sparsity * rows.shape[1])
    kept = torch.ones_like(rows, dtype=torch.bool)
    if n_prune:
        # stable sort: among equal scores the lower index is pruned first, so the count is exact and reproducible
        order = rows.argsort(dim=1, stable=True)[:, :n_prune]
        kept.scatter_(1, order, False)
    return kept.view(out_features, in_features)


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖x_j‖₂ for an [out, in] weight and the per-input-feature sums of squares of its inputs."""
    return weight.abs() * input_sq_sums.sqrt().unsqueeze(0)


@torch.no_grad()
def input_norms(model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], batches) -> dict[str, torch.Tensor]:
    """Per layer, the sum over every calibration token (padding excluded) of each input feature's square (float32,
    [in])."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    real = [None]  # the current batch's non-padding positions, flattened: padding is not calibration data

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if real[0] is not None and real[0].numel() == x.shape[0]:
                x = x[real[0]]
            total = x.float().square().sum(dim=0)
            sums[name] = total if name not in sums else sums[name].add_(total)

        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            real[0] = mask.reshape(-1).bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name, _ in layers if name not in sums]
    if missing:
        raise UserError(f"prune.criterion=wanda: {missing[0]} saw no calibration input (is it used by the forward?)")
    return sums


def check_pattern(layers: list[tuple[str, torch.nn.Module]], pattern: str) -> None:
    nm = PATTERNS[pattern]
    if nm is None:
        return
    for name, layer in layers:
        in_features = layer.weight.shape[0] if stored_transposed(layer) else layer.weight.shape[1]
        if in_features % nm[1]:
            raise UserError(f"prune.pattern={pattern}: {name} has {in_features} inputs, not a multiple of {nm[1]} "
                            "(use prune.pattern=unstructured)")


def prune_model(model: torch.nn.Module, criterion: str, sparsity: float, pattern: str = "unstructured",
                include_head: bool = False, calibration=None) -> dict[str, torch.nn.Module]:
    """Prune ``model`` in place; returns weight name → its layer, which holds the packed mask (``lowmem.masks``:
    ``mask_of(layer)`` unpacks it). Each layer's mask is packed as soon as it is chosen, so one unpacked mask exists
    at a time.

    ``calibration``: an iterable of batches (``input_ids``, ``attention_mask``) for ``wanda``."""
    layers = prunable_layers(model, include_head)
    check_pattern(layers, pattern)
    norms = None
    if criterion == "wanda":
        if calibration is None:
            raise UserError("prune.criterion=wanda needs calibration batches of the recipe's data")
        norms = input_norms(model, layers, calibration)
    masks = {}
    for name, layer in layers:
        stored = weight_value(layer)
        weight = stored.T if stored_transposed(layer) else stored  # [out, in]
        if criterion == "magnitude":
            scores, per_row = weight.abs(), False
        elif criterion == "wanda":
            scores, per_row = wanda_scores(weight, norms[name].to(weight.device)), True
        else:
            raise UserError(f"prune.criterion '{criterion}' is not one of magnitude, wanda")
        kept = keep_mask(scores, sparsity, pattern, per_row)
        kept = kept.T.contiguous() if stored_transposed(layer) else kept
        zero_pruned(layer, kept)
        attach_masks(model, {f"{name}.weight": kept})
        masks[f"{name}.weight"] = layer
        del stored, weight, scores, kept
    return masks


def sparsity_report(model: torch.nn.Module, masks) -> PruneReport:
    """Zeros actually present in each masked weight (read back from the weights, not from the masks)."""
    total = count_weights(model)
    layers = []
    for name in masks:
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        value = weight_value(layer)
        layers.append(LayerSparsity(name, int((value == 0).sum()), value.numel()))
    return PruneReport(layers, total)
