"""HiFT's units, found generically in any HF decoder model, bottom to top in the order the forward uses them:

    embeddings   the input embeddings and every weight used before the first decoder layer (GPT-2's ``wpe``,
                 OPT's ``embed_positions`` and ``project_in``);
    layers.i     decoder layer i (and any weight first used inside it or just before it);
    norm         every weight used after the last layer that is not the output head (the final norm, OPT's
                 ``project_out``);
    lm_head      the output head, unless it is tied to the input embeddings.

No per-architecture tables: the decoder stack is the ModuleList of same-class modules holding the most
parameters, and where each other weight is used comes from one forward of a two-token input under a fake
tensor mode (no compute, no memory): a module is placed by the first time the forward calls it. A unit's
weights are then never used below it, so training it needs no backward below it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lowmem.weights.int8 import Int8Weight, trainable_tensors

log = logging.getLogger("lowmem")


@dataclass
class Unit:
    name: str
    params: dict[str, torch.nn.Parameter | Int8Weight]  # name → trainable parameter or int8 weight
    # The modules whose forwards use these weights, in forward order; each one's tensors belong to this unit and
    # are used only inside its forward. Empty when some weight's use could not be tied to a module: the unit then
    # cannot be streamed.
    modules: list[torch.nn.Module] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of its weights this process holds (FSDP2: its shards)."""
        from lowmem.distributed.shard import local

        return sum(p.stored_bytes() if isinstance(p, Int8Weight) else local(p).nbytes for p in self.params.values())


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


BEFORE_LAYERS = -0.5


def forward_stages(model: torch.nn.Module, layers) -> dict[str, tuple[float, int]]:
    """Module name → (where the forward first calls it: ``i`` inside decoder layer i, ``i + 0.5`` after layer i
    and before the next, ``-0.5`` before the first; the order of that first call among all modules). One forward
    of two tokens under ``FakeTensorMode``: shapes only, nothing computed or allocated; in eval mode, so no
    dropout draws from the real generator. A model sharded by FSDP2 cannot run that forward (its hooks would gather
    fake shards): its stages are the ones :func:`trace_forward_stages` kept before it was sharded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kept = getattr(model, STAGES_ATTRIBUTE, None)
    if kept is not None:
        return kept
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise RuntimeError("the model is sharded by FSDP2 and its forward was not traced before")

    stage = [BEFORE_LAYERS]
    first: dict[str, tuple[float, int]] = {}
    handles = []
    for i, layer in enumerate(layers if layers is not None else []):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=i: stage.__setitem__(0, float(i)), prepend=True))
        handles.append(layer.register_forward_hook(lambda *_, i=i: stage.__setitem__(0, i + 0.5)))

    def record(name):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the inputs
            first.setdefault(name, (stage[0], len(first)))
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(record(name)))
    was_training = model.training
    device = model.get_input_embeddings().weight.device
    try:
        model.eval()
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return first


STAGES_ATTRIBUTE = "_lowmem_forward_stages"


def trace_forward_stages(model: torch.nn.Module) -> None:
    """Trace :func:`forward_stages` now and keep it on the model, for HiFT on a model about to be sharded. A model the
    fake mode cannot run keeps nothing: :func:`discover_units` then places its weights conservatively, as it does
    unsharded."""
    try:
        stages = forward_stages(model, decoder_layers(model))
    except Exception:  # noqa: BLE001 — discover_units warns when it needs the stages
        return
    setattr(model, STAGES_ATTRIBUTE, stages)


def discover_units(model: torch.nn.Module) -> list[Unit]:
    """Units bottom to top: embeddings, layers.0 … layers.N-1, norm, lm_head (see the module docstring).

    Only parameters that require grad are placed; a tied weight belongs to the first unit that owns it
    (the embeddings), so an lm_head tied to them forms no unit of its own.
    """
    named = trainable_tensors(model)
    modules = dict(model.named_modules())
    path_of = {id(m): n for n, m in modules.items()}
    layers = decoder_layers(model)
    n_layers = len(layers) if layers is not None else 0
    layer_paths = [path_of[id(layer)] for layer in (layers if layers is not None else [])]
    embed_path = path_of[id(model.get_input_embeddings())]
    head = model.get_output_embeddings()
    head_path = path_of.get(id(head)) if head is not None else None

    try:
        stages = forward_stages(model, layers)
    except Exception as err:  # noqa: BLE001 — a model the fake mode cannot run still trains, placed conservatively
        log.warning("hift: the forward could not be traced (%s: %s); weights outside the embeddings, the layers "
                    "and the head are trained with the embeddings", type(err).__name__, str(err).splitlines()[0])
        stages = {}

    def inside(path: str, root: str | None) -> bool:
        return root is not None and (root == "" or path == root or path.startswith(root + "."))

    stack_ancestors = {p.rsplit(".", 1)[0] if "." in p else "" for p in layer_paths}
    stack_ancestors |= {a for p in stack_ancestors for a in _ancestors(p)}

    def placement(name: str) -> tuple[str, str | None]:
        """(unit, module path whose forward uses the weight, or None when unknown)."""
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if inside(owner, embed_path):
            return "embeddings", embed_path
        for i, path in enumerate(layer_paths):
            if inside(owner, path):
                return f"layers.{i}", path
        if inside(owner, head_path):
            return "lm_head", head_path
        # Elsewhere: the nearest module the forward called that does not contain the decoder stack.
        for path in [owner, *_ancestors(owner)]:
            if path in stack_ancestors:
                break
            if path in stages:
                return _unit_at(stages[path][0], n_layers), path
        return "embeddings", None  # used who knows where: lowest, so no backward ever stops above it

    order = ["embeddings", *(f"layers.{i}" for i in range(n_layers)), "norm", "lm_head"]
    params: dict[str, dict] = {u: {} for u in order}
    roots: dict[str, list[str]] = {"embeddings": [embed_path], "lm_head": [head_path] if head_path is not None else []}
    roots.update({f"layers.{i}": [p] for i, p in enumerate(layer_paths)})
    unstreamable: set[str] = set()
    for name, tensor in named.items():
        unit, path = placement(name)
        params[unit][name] = tensor
        if path is None:
            unstreamable.add(unit)
        elif path not in roots.setdefault(unit, []):
            roots[unit].append(path)
    all_roots = [(u, p) for u in order if params[u] for p in roots.get(u, [])]
    for unit, path in all_roots:
        # a module holding another unit's module would move that unit's weights too; a module the forward never
        # called (its weights read directly) would never bring them in
        nested = any(other != path and (inside(other, path) or inside(path, other)) for _, other in all_roots)
        if nested or (stages and path not in stages):
            unstreamable.add(unit)
    units = []
    for unit in order:
        if not params[unit]:
            continue
        paths = sorted(roots.get(unit, []), key=lambda p: stages.get(p, (0.0, 0)))  # the order the forward calls
        mods = [] if unit in unstreamable else [modules[p] for p in paths]
        units.append(Unit(unit, params[unit], mods))
    placed = {n for u in units for n in u.params}
    if placed != set(named):  # cannot happen with the rules above; a silent gap would leave weights untrained
        raise AssertionError(f"parameters in no HiFT unit: {sorted(set(named) - placed)[:5]}")
    return units


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` → ``a.b``, ``a``, ``""`` (the model)."""
    out = []
    while path:
        path = path.rsplit(".", 1)[0] if "." in path else ""
        out.append(path)
    return out


def _unit_at(stage: float, n_layers: int) -> str:
    """The unit of a weight first used at ``stage``: inside layer i or just before it → layers.i."""
    if stage < 0:
        return "embeddings"
    if stage > n_layers - 1:
        return "norm"
    return f"layers.{int(-(-stage // 1))}"


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
