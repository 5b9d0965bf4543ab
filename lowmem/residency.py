"""The residency scheduler: which parameters and rule states live on the compute device each step.

Under HiFT only the active group updates, so only its rule state is needed on the device. Per step:

    before the step   the active group's state is on the device (prefetched during the previous step);
    after the update  its state goes to host memory (pinned), and the next group's state is prefetched
                      on a side stream while the next forward runs, which needs no state;
    frozen weights    with ``offload_frozen_weights``, units below the lowest trainable one (no backward
                      passes through them) live in pinned host memory and visit the device for their forward
                      only: each is copied in without blocking while the unit before it computes, and its device
                      copy is dropped after its forward. Frozen weights never change, so nothing is copied back;
                      a unit's host copy is refreshed only when it leaves the device after it was trained.

So at most one group's state is on the device. Every decision is a :class:`Move` with its bytes; the plan is
logged at debug level and ``device_resident_bytes`` counts what the plan keeps on the device. On a CPU-only
machine host and device are the same memory: the moves are no-ops, while the plan and the counts still run.

A unit whose weights are also used outside its modules stays on the device: a tied output head runs after every
layer, on the embeddings' weight (Llama-3.2-1B/3B, Gemma, small Qwen models). Units are in forward order and no
unit's weights are used below it (``lowmem.units``), so backward stops at the lowest active unit. A unit with
several modules (GPT-2's embeddings: ``wte`` and ``wpe``) streams each module's tensors for that module's forward.

CUDA streams and the caching allocator (DESIGN §4a). The allocator gives a freed block back to the stream that
allocated it and may hand it out again at once, so these rules hold for every copy here:

1. Host memory is pinned, and every copy between host and device is ``non_blocking``: from pageable memory a copy
   is synchronous, and would wait for everything queued on the device.
2. Before the side stream reads what the default stream wrote, it waits for it: for a state's host copy, on the
   event recorded after the device-to-host copy that wrote it (so the next group's state comes in while this
   group's update and outgoing copies run); for weights, ``side.wait_stream(current)``.
3. A tensor allocated on the side stream and used on the default stream is ``record_stream(current)``-ed when it
   is made, so when it is dropped its block is not reused before the default-stream kernels that read it ran.
4. Before the default stream uses what the side stream copied in, it waits for it: ``current.wait_stream(side)``
   before backward (prefetched state: the forward, which needs none, overlaps the copy) or before the unit's
   forward (streamed weights).
5. A host copy made by a non-blocking device-to-host copy is read on the host only after :meth:`synchronize`
   (checkpoints call it). A pinned host buffer is kept per tensor and rewritten on the default stream only: the
   side stream's reads of it are ordered before by rule 4.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from lowmem.units import Unit

log = logging.getLogger("lowmem")

DEVICE, HOST = "device", "host"


@dataclass
class Move:
    kind: str  # "state" or "weights"
    name: str  # parameter (state) or unit (weights)
    dst: str  # DEVICE or HOST
    nbytes: int
    prefetch: bool = False


class ResidencyScheduler:
    def __init__(self, units: list[Unit], rule_state, device: torch.device, offload_states: bool,
                 offload_frozen_weights: bool, model: torch.nn.Module | None = None):
        self.units = units
        self.unit_index = {u.name: i for i, u in enumerate(units)}
        self.rule_state = rule_state
        self.device = device
        self.real = device.type == "cuda"
        self.offload_states = offload_states
        self.offload_frozen_weights = offload_frozen_weights
        self.state_location: dict[str, str] = {}
        self.weight_location: dict[str, str] = {u.name: DEVICE for u in units}
        self.stream = torch.cuda.Stream(device) if self.real else None
        self._hooks = []
        self.last_plan: list[Move] = []
        self._host_state: dict[str, dict[str, torch.Tensor]] = {}  # pinned host buffer per state tensor
        self._written: dict[str, torch.cuda.Event] = {}  # per parameter: its state's last device-to-host copy
        # pinned host copies of a unit's tensors, module by module (one list per module of ``unit.modules``)
        self._host_weights: dict[str, list[list[torch.Tensor]]] = {}
        self._stale_host_weights: set[str] = {u.name for u in units}  # units trained since their host copy
        self._streamed_in: dict[tuple[str, int], list[torch.Tensor]] = {}  # device copies prefetched for (unit, module j)
        self.pinned_units = self._units_used_outside(model) if model is not None else set()
        for name in sorted(self.pinned_units):
            log.info("residency: unit %s stays on the device: its weights are also used outside it (tied)", name)

    # ------------------------------------------------------------------------------------------- plan

    def offloadable(self, unit: Unit) -> bool:
        """Whether a frozen unit may leave the device: its weights are used inside its modules' forwards only."""
        return bool(unit.modules) and unit.name not in self.pinned_units

    def lowest_active(self, active: list[Unit]) -> int:
        """The first unit backward passes through: the lowest active one (no unit's weights are used below it)."""
        return min(self.unit_index[u.name] for u in active)

    def planned_weight_location(self, index: int, lowest_active: int) -> str:
        unit = self.units[index]
        if self.offload_frozen_weights and index < lowest_active and self.offloadable(unit):
            return HOST
        return DEVICE

    def plan_before(self, active: list[Unit]) -> list[Move]:
        """Moves before the step of ``active``: its states to the device; frozen weights per the plan."""
        moves = []
        for unit in active:
            for name in unit.params:
                if self.state_location.get(name, DEVICE) == HOST:
                    moves.append(Move("state", name, DEVICE, self._state_bytes(name)))
        if self.offload_frozen_weights:
            lowest = self.lowest_active(active)
            for i, unit in enumerate(self.units):
                want = self.planned_weight_location(i, lowest)
                if self.weight_location[unit.name] != want:
                    moves.append(Move("weights", unit.name, want, unit.nbytes))
        return moves

    def plan_after(self, active: list[Unit], upcoming: list[Unit]) -> list[Move]:
        """Moves after the update: the active states out, the next group's states in (prefetched)."""
        if not self.offload_states:
            return []
        upcoming_names = {n for u in upcoming for n in u.params}
        moves = []
        for unit in active:
            for name in unit.params:
                if name in self.rule_state.by_param and name not in upcoming_names:
                    moves.append(Move("state", name, HOST, self._state_bytes(name)))
        for unit in upcoming:
            for name in unit.params:
                if self.state_location.get(name) == HOST:
                    moves.append(Move("state", name, DEVICE, self._state_bytes(name), prefetch=True))
        return moves

    # ------------------------------------------------------------------------------------------ apply

    def place(self, model: torch.nn.Module, active: list[Unit]) -> None:
        """Put a model loaded in host memory where the plan for the step of ``active`` wants it: units planned
        off the device are pinned where they are (the full model never visits the device), everything else
        moves to the device. Then the plan's next moves are none."""
        lowest = self.lowest_active(active)
        on_host = set()
        for i, unit in enumerate(self.units):
            if self.planned_weight_location(i, lowest) == HOST:
                on_host.update(id(t) for t in _unit_tensors(unit))
                self.weight_location[unit.name] = HOST
                if self.real:
                    self._host_weights[unit.name] = [[_pin(t.data) for t in _own_tensors(m)] for m in unit.modules]
                    for t, host in self._with_hosts(unit):
                        t.data = host
                    self._stale_host_weights.discard(unit.name)
                    self._stream_for_forward(unit.name, enabled=True)
        for module in model.modules():
            for t in _direct_tensors(module):
                if id(t) not in on_host and t.device != self.device:
                    on_host.add(id(t))  # a tied weight is seen twice: move it once
                    self._to_device(t)
        moved = sum(self.units[self.unit_index[n]].nbytes for n, where in self.weight_location.items() if where == HOST)
        log.info("residency: model placed; %d bytes of frozen units kept in host memory", moved)

    def _to_device(self, tensor: torch.Tensor) -> None:
        tensor.data = tensor.data.to(self.device)  # in place: hooks and optimizers keep the same tensor

    def place_states(self, active: list[Unit]) -> None:
        """After resume, with every loaded state in host memory: the active group's on the device, the others where
        the plan keeps them (host memory with ``offload_states``), before the first step."""
        active_names = {n for u in active for n in u.params}
        for name, state in self.rule_state.by_param.items():
            if self.offload_states and name not in active_names:
                self.state_location[name] = HOST
                if self.real:
                    buffers = self._host_state.setdefault(name, {})
                    for key, tensor in state.items():
                        buffers[key] = _pin(tensor)
                        state[key] = buffers[key]
            else:
                self.state_location[name] = DEVICE
                for key, tensor in state.items():
                    state[key] = tensor.to(self.device, non_blocking=self.real and tensor.is_pinned())

    def before_step(self, active: list[Unit]) -> list[Move]:
        moves = self.plan_before(active)
        self._apply(moves)
        self._stale_host_weights.update(u.name for u in active)  # their weights change in this step
        self.last_plan = moves
        return moves

    def after_step(self, active: list[Unit], upcoming: list[Unit]) -> list[Move]:
        moves = self.plan_after(active, upcoming)
        self._apply(moves)
        self.last_plan = self.last_plan + moves
        if moves:
            moved_in = sum(m.nbytes for m in moves if m.dst == DEVICE)
            moved_out = sum(m.nbytes for m in moves if m.dst == HOST)
            log.debug("residency: states out %d B, prefetch in %d B, device resident %d B", moved_out, moved_in,
                      self.device_resident_bytes())
        return moves

    def states_ready(self) -> None:
        """Before backward: the default stream waits for the state prefetched on the side stream (rule 4)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def synchronize(self) -> None:
        """Wait until every copy queued here has landed, so host copies may be read (checkpoints)."""
        if self.real:
            torch.cuda.synchronize(self.device)

    def _apply(self, moves: list[Move]) -> None:
        prefetching = [m for m in moves if m.kind == "state" and m.prefetch]
        for move in moves:
            if move.kind == "state" and not move.prefetch:
                self._move_state(move)
            elif move.kind == "weights":
                self._move_weights(move)
        if prefetching and self.real:
            current = torch.cuda.current_stream(self.device)
            for move in prefetching:  # rule 2: the copies that wrote these host buffers have run
                if move.name in self._written:
                    self.stream.wait_event(self._written[move.name])
            with torch.cuda.stream(self.stream):
                for move in prefetching:
                    self._move_state(move, user=current)
        for move in moves:
            location = self.state_location if move.kind == "state" else self.weight_location
            location[move.name] = move.dst

    def _move_state(self, move: Move, user: torch.cuda.Stream | None = None) -> None:
        """Move one parameter's state; ``user``: the stream that will use a prefetched copy (this runs on the side
        stream then, where ``torch.cuda.current_stream`` is the side stream itself)."""
        if not self.real:
            return
        state = self.rule_state.by_param.get(move.name, {})
        if move.dst == HOST:
            buffers = self._host_state.setdefault(move.name, {})
            for key, tensor in state.items():
                host = buffers.get(key)
                if host is None:
                    host = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)  # rule 1; the device tensor is dropped after this
                state[key] = host
            self._written[move.name] = torch.cuda.Event()
            self._written[move.name].record(torch.cuda.current_stream(self.device))
            return
        for key, tensor in state.items():
            on_device = tensor.to(self.device, non_blocking=True)
            if user is not None:
                on_device.record_stream(user)  # rule 3: made on the side stream, used on the default one
            state[key] = on_device

    def _move_weights(self, move: Move) -> None:
        if not self.real:
            return
        unit = self.units[self.unit_index[move.name]]
        if move.dst == HOST:
            if unit.name not in self._host_weights:
                self._host_weights[unit.name] = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                                  for t in _own_tensors(m)] for m in unit.modules]
            stale = unit.name in self._stale_host_weights
            for t, host in self._with_hosts(unit):
                if stale:
                    host.copy_(t.data, non_blocking=True)
                t.data = host
            self._stale_host_weights.discard(unit.name)
        else:
            self._stream_for_forward(unit.name, enabled=False)
            for t, host in self._with_hosts(unit):
                t.data = host.to(self.device, non_blocking=True)
            return
        self._stream_for_forward(unit.name, enabled=True)

    def _with_hosts(self, unit: Unit):
        """(tensor, its pinned host copy) for every tensor of ``unit``'s modules."""
        for module, hosts in zip(unit.modules, self._host_weights[unit.name], strict=True):
            yield from zip(_own_tensors(module), hosts, strict=True)

    # ------------------------------------------------------------------------------ weight streaming

    def _stream_for_forward(self, name: str, enabled: bool) -> None:
        """A host-resident unit visits the device for its forward only (it has no backward: it is frozen and
        below every trainable unit), module by module, prefetching the next host-resident module meanwhile."""
        kept = []
        for owner, handle in self._hooks:
            if owner == name:
                handle.remove()
            else:
                kept.append((owner, handle))
        self._hooks = kept
        unit = self.units[self.unit_index[name]]
        for j in range(len(unit.modules)):
            self._streamed_in.pop((name, j), None)
        if not enabled:
            return
        for j, module in enumerate(unit.modules):
            # prepend: the weights are in before any other pre-hook (token elimination scores with them)
            self._hooks.append((name, module.register_forward_pre_hook(self._bring_in_hook((name, j)), with_kwargs=True,
                                                                       prepend=True)))
            # always_call: a forward that raises still leaves the weights in host memory, as the plan says
            self._hooks.append((name, module.register_forward_hook(self._send_back_hook((name, j)), always_call=True)))

    def _piece_hosts(self, piece: tuple[str, int]) -> list[torch.Tensor]:
        """The pinned host copies of module j of a unit."""
        name, j = piece
        return self._host_weights[name][j]

    def _bring_in_hook(self, piece: tuple[str, int]):
        def to_device(mod, args, kwargs):
            if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                               for a in (*args, *kwargs.values())):
                raise RuntimeError(f"residency: unit {piece[0]} is streamed for its forward only, but its input "
                                   "requires grad, so backward would pass through it (a lowmem bug: please report)")
            current = torch.cuda.current_stream(self.device)
            copies = self._streamed_in.pop(piece, None)
            if copies is None:
                copies = [host.to(self.device, non_blocking=True) for host in self._piece_hosts(piece)]
            else:
                current.wait_stream(self.stream)  # rule 4
            for t, on_device in zip(_own_tensors(mod), copies, strict=True):
                t.data = on_device
            self._prefetch_weights(self._next_host_piece(piece))

        return to_device

    def _send_back_hook(self, piece: tuple[str, int]):
        def to_host(mod, args, output):
            for t, host in zip(_own_tensors(mod), self._piece_hosts(piece), strict=True):
                t.data = host  # the device copy is dropped; never copied back: frozen weights did not change

        return to_host

    def _next_host_piece(self, piece: tuple[str, int]) -> tuple[str, int] | None:
        name, j = piece
        index = self.unit_index[name]
        if j + 1 < len(self.units[index].modules):
            return name, j + 1
        following = index + 1
        if following < len(self.units) and self.weight_location[self.units[following].name] == HOST:
            return self.units[following].name, 0
        return None

    def _prefetch_weights(self, piece: tuple[str, int] | None) -> None:
        if piece is None or piece in self._streamed_in:
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # rule 2: the host copies may have been written by a queued copy
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for host in self._piece_hosts(piece)]
        for on_device in copies:
            on_device.record_stream(current)  # rule 3
        self._streamed_in[piece] = copies

    # ----------------------------------------------------------------------------------------- count

    def _units_used_outside(self, model: torch.nn.Module) -> set[str]:
        """Units whose weights another module outside the unit's modules also uses (a tied output head)."""
        shared = set()
        for unit in self.units:
            if not unit.modules:
                continue
            inside = {id(m) for module in unit.modules for m in module.modules()}
            own = {id(t) for t in _unit_tensors(unit)}
            for module in model.modules():
                if id(module) in inside:
                    continue
                if any(id(t) in own for t in _direct_tensors(module)):
                    shared.add(unit.name)
                    break
        return shared

    def _state_bytes(self, name: str) -> int:
        return sum(t.numel() * t.element_size() for t in self.rule_state.by_param.get(name, {}).values())

    def states_on_device(self) -> set[str]:
        """Parameter names whose rule state the plan keeps on the device."""
        return {n for n in self.rule_state.by_param if self.state_location.get(n, DEVICE) == DEVICE}

    def device_resident_bytes(self) -> int:
        """Weights and rule states that the plan keeps on the device (bytes)."""
        weights = sum(u.nbytes for u in self.units if self.weight_location[u.name] == DEVICE)
        states = sum(self._state_bytes(n) for n in self.states_on_device())
        return weights + states


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a weight move carries for one module: its parameters and buffers (int8 weights are buffers)."""
    return [*module.parameters(), *module.buffers()]


def _unit_tensors(unit: Unit) -> list[torch.Tensor]:
    """A unit's modules' tensors, module by module in forward order."""
    return [t for module in unit.modules for t in _own_tensors(module)]


def _direct_tensors(module: torch.nn.Module):
    """A module's own parameters and buffers, not its children's."""
    return itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned host memory (itself if it already is)."""
    if tensor.device.type == "cpu" and tensor.is_pinned():
        return tensor
    return tensor.detach().to("cpu").pin_memory()
