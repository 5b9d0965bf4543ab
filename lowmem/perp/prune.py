"""Pruning (PERP's first half): choose which entries of each matrix weight to zero, zero them, and keep the masks.

Criteria (``prune.criterion``):
    magnitude  score |W|; the smallest ``sparsity`` share of each matrix is pruned (one threshold per matrix);
    wanda      score |W_ij|·‖x_j‖₂ (Sun et al. 2023), x_j the layer's input feature j over calibration tokens of the
               recipe's training data, measured layer by layer on the outputs of the already-pruned layers below
               (``lowmem.perp.calibration``, as Wanda's reference implementation does); pruned per output row.
Patterns (``prune.pattern``): ``unstructured``, or N:M (``2:4``, ``4:8``): in every group of M consecutive entries
along the input dimension the N highest-scoring are kept (sparsity is then (M−N)/M).

Pruned are the layers int8 weights would quantize (``nn.Linear`` and transformers' ``Conv1D`` outside embeddings
and output head); the output head too with ``prune.include_head``. Embeddings never are. Weights are read and
written in the layer's stored layout, float or int8 (a pruned code becomes code 128, exactly zero; a pruned outlier
0.0). Memory: a block of rows of scores at a time (``CHUNK_VALUES``) and one layer's mask at 1 byte an entry, where
sorting a whole matrix took ~20 bytes an entry (a float32 copy, its magnitudes, int64 sort indices: ~10 GiB more
for Llama-3's 525M-entry head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowmem.perp.calibration import prune_layer_by_layer
from lowmem.errors import UserError
from lowmem.weights.int8 import ZERO_CODE, Int8Weight, count_weights, matrix_layers
from lowmem.weights.masks import attach_masks

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


def _rows_in_out(layer: torch.nn.Module):
    """(rows, cols, rows(a, b)): the weight as an [out, in] matrix, read a block of output rows at a time in float32
    (float64 for a float64 model), without a float copy of the whole matrix. A transformers Conv1D layout stores
    [in, out], so its output rows are stored columns: an int8 one is dequantized whole once (``whole``)."""
    weight = layer.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if not stored_transposed(layer):
        rows, cols = weight.shape
        if isinstance(weight, Int8Weight):
            return rows, cols, lambda a, b: weight.dequantize_rows(a, b, dtype)
        return rows, cols, lambda a, b: weight.detach()[a:b].to(dtype)
    cols, rows = weight.shape
    if isinstance(weight, Int8Weight):
        whole = weight.dequantize(dtype)
        return rows, cols, lambda a, b: whole[:, a:b].T
    return rows, cols, lambda a, b: weight.detach()[:, a:b].T.to(dtype)


@torch.no_grad()
def zero_pruned(layer: torch.nn.Module, kept: torch.Tensor) -> None:
    """Set the weight's entries outside ``kept`` (stored layout) to exactly zero, in place, a block of rows at a time:
    an int8 weight's pruned codes become the zero code and its pruned outliers 0.0; nothing else is requantized."""
    weight = layer.weight
    rows, cols = weight.shape
    for start, stop in row_blocks(rows, cols):
        pruned = ~kept[start:stop]
        if isinstance(weight, Int8Weight):
            weight.codes[start * cols: stop * cols].masked_fill_(pruned.reshape(-1), ZERO_CODE)
        else:
            weight.data[start:stop].masked_fill_(pruned, 0)
    if isinstance(weight, Int8Weight) and weight.n_outliers:
        weight.outlier_value.masked_fill_(~kept.reshape(-1)[weight.outlier_index.long()], 0.0)


# ----------------------------------------------------------------------------------------------- scores and masks

CHUNK_VALUES = 2**22  # scores chosen from at a time: their temporaries (~21 bytes a value) stay under 100 MiB


def row_blocks(rows: int, cols: int, values: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of the consecutive blocks of rows of a [rows, cols] matrix, ``values`` entries each (default
    :data:`CHUNK_VALUES`), at least one row."""
    step = max(1, (values or CHUNK_VALUES) // cols)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """The entries to keep of an [out, in] score matrix: per N:M group along ``in``, per output row (``per_row``),
    or over the whole matrix. Exactly ``round(sparsity · n)`` entries of each row or matrix are pruned; ties go to
    the lower index. (:func:`select_kept` on a matrix already in memory.)"""
    return select_kept(lambda a, b: scores[a:b], *scores.shape, sparsity, pattern, per_row, scores.device)


def select_kept(score_rows, rows: int, cols: int, sparsity: float, pattern: str, per_row: bool,
                device: torch.device) -> torch.Tensor:
    """:func:`keep_mask` of the [rows, cols] scores that ``score_rows(a, b)`` gives a block of rows at a time, with
    bounded memory: the result (1 byte an entry) and one block's temporaries. A row's k-th smallest score is its
    ``kthvalue``; the whole matrix's is found by a radix select over the scores' bits (two passes, 2 × 65536 counts),
    and the entries equal to it are pruned in index order across the blocks. Nothing is read on the host."""
    kept = torch.empty((rows, cols), dtype=torch.bool, device=device)
    blocks = row_blocks(rows, cols)
    nm = PATTERNS[pattern]
    whole = nm is None and not per_row
    n_prune = round(sparsity * (rows * cols if whole else cols))
    if whole and n_prune:
        threshold, need = _kth_smallest(score_rows, blocks, n_prune, device)
        carry = torch.zeros((), dtype=torch.int64, device=device)
    for start, stop in blocks:
        if nm is not None:
            n, m = nm
            groups = score_rows(start, stop).reshape(stop - start, cols // m, m)
            chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2, sorted=False).indices,
                                                                          True)
            kept[start:stop] = chosen.view(stop - start, cols)
        elif n_prune == 0:
            kept[start:stop] = True
        elif per_row:
            kept[start:stop] = _keep_per_row(score_rows(start, stop), n_prune)
        else:
            scores = score_rows(start, stop).to(torch.float32).contiguous()  # a Conv1D layout's rows are a view
            equal = scores == threshold
            order = equal.view(-1).cumsum(0).view_as(equal) + carry
            kept[start:stop] = ~((scores < threshold) | (equal & (order <= need)))
            carry = carry + equal.sum()
    return kept


def _keep_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k lowest scores pruned (among equal ones the lower index first)."""
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < threshold
    need = k - below.sum(dim=1, keepdim=True)
    equal = scores == threshold
    return ~(below | (equal & (equal.cumsum(dim=1) <= need)))


def _kth_smallest(score_rows, blocks: list[tuple[int, int]], k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th smallest of the non-negative scores (as float32, whose bits order like their values), exactly, and
    how many of the k smallest equal it: the top 16 bits' histogram finds its bin, the low 16 bits' histogram of
    that bin's values its value."""
    target = torch.full((1,), k, dtype=torch.int64, device=device)
    cumulative = _bit_counts(score_rows, blocks, device).cumsum_(0)
    top = torch.searchsorted(cumulative, target)  # the first bin whose cumulative count reaches k
    below = torch.where(top > 0, cumulative[(top - 1).clamp_min(0)], 0)
    del cumulative  # one set of 65536 counts (512 KiB) at a time
    cumulative = _bit_counts(score_rows, blocks, device, within=top).cumsum_(0)
    bottom = torch.searchsorted(cumulative, target - below)
    below = below + torch.where(bottom > 0, cumulative[(bottom - 1).clamp_min(0)], 0)
    threshold = (top * 65536 + bottom).to(torch.int32).view(torch.float32)
    return threshold, k - below


def _bit_counts(score_rows, blocks: list[tuple[int, int]], device, within: torch.Tensor | None = None) -> torch.Tensor:
    """65536 counts of the scores' top 16 bits, or, ``within`` a top-bits bin, of their low 16 bits."""
    counts = torch.zeros(65536, dtype=torch.int64, device=device)
    for start, stop in blocks:
        bits = score_rows(start, stop).to(torch.float32).contiguous().view(torch.int32).reshape(-1)
        if within is None:
            counts.scatter_add_(0, (bits >> 16).long(), torch.ones_like(bits, dtype=torch.int64))
        else:
            counts.scatter_add_(0, (bits & 0xFFFF).long(), ((bits >> 16) == within).long())
    return counts


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖x_j‖₂ for an [out, in] weight and the per-input-feature sums of squares of its inputs."""
    return weight.abs() * input_sq_sums.sqrt().unsqueeze(0)


def check_pattern(layers: list[tuple[str, torch.nn.Module]], pattern: str) -> None:
    nm = PATTERNS[pattern]
    if nm is None:
        return
    for name, layer in layers:
        in_features = layer.weight.shape[0] if stored_transposed(layer) else layer.weight.shape[1]
        if in_features % nm[1]:
            raise UserError(f"prune.pattern={pattern}: {name} has {in_features} inputs, not a multiple of {nm[1]} "
                            "(use prune.pattern=unstructured)")


def prune_layer(model: torch.nn.Module, name: str, layer: torch.nn.Module, sparsity: float, pattern: str,
                input_sq_sums: torch.Tensor | None = None) -> None:
    """Prune one layer: magnitude scores, or wanda's with its inputs' ``input_sq_sums``; zero the pruned entries and
    attach the (packed) mask."""
    rows, cols, weight_rows = _rows_in_out(layer)
    device = layer.weight.device
    if input_sq_sums is None:
        score_rows = lambda a, b: weight_rows(a, b).abs()  # noqa: E731
    else:
        norms = input_sq_sums.to(device)
        score_rows = lambda a, b: wanda_scores(weight_rows(a, b), norms)  # noqa: E731
    kept = select_kept(score_rows, rows, cols, sparsity, pattern, input_sq_sums is not None, device)
    if stored_transposed(layer):
        kept = kept.T.contiguous()
    zero_pruned(layer, kept)
    attach_masks(model, {f"{name}.weight": kept})


def prune_model(model: torch.nn.Module, criterion: str, sparsity: float, pattern: str = "unstructured",
                include_head: bool = False, calibration=None) -> dict[str, torch.nn.Module]:
    """Prune ``model`` in place; returns weight name → its layer, which holds the packed mask (``lowmem.weights.masks``:
    ``mask_of(layer)`` unpacks it). Memory: one layer's mask (1 byte an entry; 2 while a Conv1D layout's is
    transposed to its stored layout) and one block of its scores at a time.

    ``calibration``: an iterable of batches (``input_ids``, ``attention_mask``) for ``wanda``, which is calibrated layer
    by layer, each layer on the outputs of the pruned layers below it (``lowmem.perp.calibration``)."""
    layers = prunable_layers(model, include_head)
    check_pattern(layers, pattern)
    if criterion == "magnitude":
        for name, layer in layers:
            prune_layer(model, name, layer, sparsity, pattern)
    elif criterion == "wanda":
        if calibration is None:
            raise UserError("prune.criterion=wanda needs calibration batches of the recipe's data")
        prune_layer_by_layer(model, layers, calibration,
                             lambda name, layer, norms: prune_layer(model, name, layer, sparsity, pattern, norms))
    else:
        raise UserError(f"prune.criterion '{criterion}' is not one of magnitude, wanda")
    return {f"{name}.weight": layer for name, layer in layers}


@torch.no_grad()
def count_zeros(layer: torch.nn.Module) -> int:
    """Zeros present in the layer's weight, counted a block of rows at a time (read on the host once)."""
    rows, cols, weight_rows = _rows_in_out(layer)
    return int(sum((weight_rows(start, stop) == 0).sum() for start, stop in row_blocks(rows, cols)))


def sparsity_report(model: torch.nn.Module, masks) -> PruneReport:
    """Zeros actually present in each masked weight (read back from the weights, not from the masks)."""
    total = count_weights(model)
    layers = []
    for name in masks:
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        layers.append(LayerSparsity(name, count_zeros(layer), layer.weight.numel()))
    return PruneReport(layers, total)
