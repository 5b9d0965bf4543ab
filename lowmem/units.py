"""HiFT's units, found generically in any HF decoder model: the input embeddings, each decoder layer, the
remaining parameters (final norm, and whatever else the model has), and the output head. No per-
architecture tables: the decoder stack is the ModuleList of same-class modules holding the most parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.int8_weights import Int8Weight, trainable_tensors


@dataclass
class Unit:
    name: str
    params: dict[str, torch.nn.Parameter | Int8Weight]  # name → trainable parameter or int8 weight
    module: torch.nn.Module | None = None  # the module holding them; None for the "norm" remainder

    @property
    def nbytes(self) -> int:
        return sum(p.stored_bytes() if isinstance(p, Int8Weight) else p.numel() * p.element_size()
                   for p in self.params.values())


def _weights_of(module: torch.nn.Module):
    """A module's parameters and int8 weights."""
    yield from module.parameters()
    yield from (m for m in module.modules() if isinstance(m, Int8Weight))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The ModuleList of same-class children with the most parameters (``model.model.layers`` for Llama)."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in _weights_of(module))
            if size > best_size:
                best, best_size = module, size
    return best


def discover_units(model: torch.nn.Module) -> list[Unit]:
    """Units bottom to top: embeddings, layers.0 … layers.N-1, norm (everything else), lm_head.

    Only parameters that require grad are placed; a tied weight belongs to the first unit that owns it
    (the embeddings), so an lm_head tied to them forms no unit of its own.
    """
    named = trainable_tensors(model)
    name_of = {id(p): n for n, p in named.items()}
    taken: set[str] = set()
    units: list[Unit] = []

    def add(name: str, module: torch.nn.Module | None) -> None:
        params = {}
        for p in _weights_of(module) if module is not None else []:
            n = name_of.get(id(p))
            if n is not None and n not in taken:
                params[n] = p
                taken.add(n)
        if params:
            units.append(Unit(name, params, module))

    head = model.get_output_embeddings()
    add("embeddings", model.get_input_embeddings())
    layers = decoder_layers(model)
    for i, layer in enumerate(layers if layers is not None else []):
        add(f"layers.{i}", layer)
    head_ids = {id(p) for p in _weights_of(head)} if head is not None else set()
    rest = {n: p for n, p in named.items() if n not in taken and id(p) not in head_ids}
    if rest:
        units.append(Unit("norm", rest))
        taken.update(rest)
    add("lm_head", head)
    missing = set(named) - taken
    if missing:  # cannot happen with the rules above; a silent gap would leave weights untrained
        raise AssertionError(f"parameters in no HiFT unit: {sorted(missing)[:5]}")
    return units


def make_groups(units: list[Unit], group_size: int, order: str, seed: int) -> list[list[Unit]]:
    """Consecutive units, ``group_size`` per group, visited bottom_up, top_down, or in a random order
    drawn once from ``seed``."""
    groups = [units[i : i + group_size] for i in range(0, len(units), group_size)]
    if order == "top_down":
        return groups[::-1]
    if order == "random":
        perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
        return [groups[i] for i in perm]
    return groups
