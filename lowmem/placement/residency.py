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
unit's weights are used below it (``lowmem.placement.units``), so backward stops at the lowest active unit. A unit with
several modules (GPT-2's embeddings: ``wte`` and ``wpe``) streams each module's tensors for that module's forward.

CUDA streams and the caching allocator (DESIGN §4a). The device operations are a mover's (``lowmem.placement.movers``:
:class:`~lowmem.placement.movers.CudaMover` on a GPU; none on a CPU, where host and device are one memory and the
moves are bookkeeping). Every move follows these rules:

1. Host memory is pinned, and every copy between host and device is non-blocking: from pageable memory a copy is
   synchronous, and would wait for everything queued on the device.
2. Everything copied in is allocated on the default stream, so one pool caches it: a state moved out frees its blocks
   to the pool the next group's state is then allocated from (on the H200, states allocated on a side stream lived
   in that stream's pool too, and HiFT with offloading reserved 71 GiB for 36 GiB allocated).
3. A prefetch (the next group's state after the update; the next streamed module while one computes) is copied on a
   side stream that first waits for the default stream, so the blocks' last users there, and the device-to-host
   copies that wrote the host buffers, have run. The default stream waits for every such copy before it uses the
   destination, or drops it unused, so a destination lives and dies on the default stream: no ``record_stream``,
   which would hold a freed block until the side stream's later copies ran (the host runs ahead of the device
   inside a forward, so each streamed module would take a new block).
4. The default stream waits on an event recorded after the copies it needs (before backward: the prefetched state;
   before a streamed module's forward: that module's weights), never on a whole side stream. States and weights
   have a side stream each, so a forward does not wait behind a state prefetch.
5. A host copy made by a non-blocking device-to-host copy is read on the host only after :meth:`synchronize`
   (checkpoints call it). A pinned host buffer is kept per tensor and rewritten on the default stream only: the side
   streams' reads of it are ordered before by rule 3.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from lowmem.placement.units import Unit

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
        self.mover = None
        self.real = False
        self.state_stream = self.weight_stream = None
        if device.type == "cuda":
            from lowmem.placement.movers import CudaMover

            self.attach(CudaMover(device))
        self.offload_states = offload_states
        self.offload_frozen_weights = offload_frozen_weights
        self.state_location: dict[str, str] = {}
        self.weight_location: dict[str, str] = {u.name: DEVICE for u in units}
        self._hooks = []
        self.last_plan: list[Move] = []
        self._host_state: dict[str, dict[str, torch.Tensor]] = {}  # pinned host buffer per state tensor
        self._states_copied = None  # the event after the last state prefetch's copies (rule 4)
        # pinned host copies of a unit's tensors, module by module (one list per module of ``unit.modules``)
        self._host_weights: dict[str, list[list[torch.Tensor]]] = {}
        self._stale_host_weights: set[str] = {u.name for u in units}  # units trained since their host copy
        # device copies prefetched for (unit, module j), and the event after their copies
        self._streamed_in: dict[tuple[str, int], tuple[list[torch.Tensor], object]] = {}
        self.pinned_units = self._units_used_outside(model) if model is not None else set()
        for name in sorted(self.pinned_units):
            log.info("residency: unit %s stays on the device: its weights are also used outside it (tied)", name)

    def attach(self, mover) -> None:
        """Move tensors with ``mover`` (``lowmem.placement.movers``), with a side stream each for states and weights."""
        self.mover, self.real = mover, True
        self.state_stream, self.weight_stream = mover.stream(), mover.stream()

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
                    self._host_weights[unit.name] = [[self.mover.pin(t.data) for t in _own_tensors(m)]
                                                     for m in unit.modules]
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
        # (synchronous: the model is placed once, before the first step)

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
                        buffers[key] = self.mover.pin(tensor)
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
        """Before backward: the default stream waits for the prefetched state's copies (rule 4)."""
        if self._states_copied is not None:
            self.mover.wait_event(self.mover.current(), self._states_copied)
            self._states_copied = None

    def synchronize(self) -> None:
        """Wait until every copy queued here has landed, so host copies may be read (checkpoints)."""
        if self.real:
            self.mover.synchronize()

    def _apply(self, moves: list[Move]) -> None:
        prefetching = [m for m in moves if m.kind == "state" and m.prefetch]
        for move in moves:
            if move.kind == "state" and not move.prefetch:
                self._move_state(move)
            elif move.kind == "weights":
                self._move_weights(move)
        if prefetching and self.real:
            self._prefetch_states(prefetching)
        for move in moves:
            location = self.state_location if move.kind == "state" else self.weight_location
            location[move.name] = move.dst

    def _move_state(self, move: Move) -> None:
        """Move one parameter's state on the default stream (rules 1, 2): out after its update (the device tensors
        are dropped at once: their blocks return to the default stream's pool, reused only after these copies), or
        in where the plan needs it and nothing prefetched it."""
        if not self.real:
            return
        state = self.rule_state.by_param.get(move.name, {})
        current = self.mover.current()
        if move.dst == HOST:
            buffers = self._host_state.setdefault(move.name, {})
            for key, tensor in state.items():
                host = buffers.get(key)
                if host is None:
                    host = buffers[key] = self.mover.pinned_empty(tensor)
                self.mover.copy(host, tensor, current)
                state[key] = host
            return
        for key, host in state.items():
            on_device = self.mover.empty_like(host)
            self.mover.copy(on_device, host, current)
            state[key] = on_device

    def _prefetch_states(self, moves: list[Move]) -> None:
        """The next group's states, copied in on the state stream while the next forward runs (rules 2–4)."""
        current = self.mover.current()
        targets = [(state, key, host, self.mover.empty_like(host))  # allocated on the default stream
                   for state in (self.rule_state.by_param.get(m.name, {}) for m in moves) for key, host in state.items()]
        self.mover.wait_stream(self.state_stream, current)  # after the allocations and the outgoing copies
        for state, key, host, on_device in targets:
            self.mover.copy(on_device, host, self.state_stream)
            state[key] = on_device
        self._states_copied = self.mover.event(self.state_stream)

    def _move_weights(self, move: Move) -> None:
        if not self.real:
            return
        unit = self.units[self.unit_index[move.name]]
        current = self.mover.current()
        if move.dst == HOST:
            if unit.name not in self._host_weights:
                self._host_weights[unit.name] = [[self.mover.pinned_empty(t) for t in _own_tensors(m)]
                                                 for m in unit.modules]
            stale = unit.name in self._stale_host_weights
            for t, host in self._with_hosts(unit):
                if stale:
                    self.mover.copy(host, t.data, current)
                t.data = host
            self._stale_host_weights.discard(unit.name)
        else:
            self._stream_for_forward(unit.name, enabled=False)
            for t, host in self._with_hosts(unit):
                on_device = self.mover.empty_like(host)
                self.mover.copy(on_device, host, current)
                t.data = on_device
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
            prefetched = self._streamed_in.pop((name, j), None)
            if prefetched is not None:  # dropped unused: the default stream waits for its copy first (rule 3)
                self.mover.wait_event(self.mover.current(), prefetched[1])
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
            current = self.mover.current()
            prefetched = self._streamed_in.pop(piece, None)
            if prefetched is None:
                copies = []
                for host in self._piece_hosts(piece):
                    copies.append(self.mover.empty_like(host))
                    self.mover.copy(copies[-1], host, current)
            else:
                copies, copied = prefetched
                self.mover.wait_event(current, copied)  # rule 4: this piece's copies, not the whole stream
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
        """The next streamed module's weights, copied in on the weight stream while this one computes (rules 2–4)."""
        if piece is None or piece in self._streamed_in:
            return
        hosts = self._piece_hosts(piece)
        copies = [self.mover.empty_like(host) for host in hosts]  # allocated on the default stream
        self.mover.wait_stream(self.weight_stream, self.mover.current())
        for on_device, host in zip(copies, hosts):
            self.mover.copy(on_device, host, self.weight_stream)
        self._streamed_in[piece] = (copies, self.mover.event(self.weight_stream))

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
