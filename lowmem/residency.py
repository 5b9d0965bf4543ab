"""The residency scheduler: which parameters and rule states live on the compute device each step.

Under HiFT only the active group updates, so only its rule state is needed on the device. Per step:

    before the step   the active group's state is on the device (prefetched during the previous step);
    after the update  its state goes to host memory (pinned), and the next group's state is prefetched
                      on a side stream while the next forward runs, which needs no state;
    frozen weights    with ``offload_frozen_weights``, units below the lowest trainable one (no backward
                      passes through them) live in host memory and stream to the device unit by unit for
                      the forward only.

So at most one group's state is on the device. Every decision is a :class:`Move` with its bytes; the plan is
logged at debug level and ``device_resident_bytes`` counts what the plan keeps on the device. On a CPU-only
machine host and device are the same memory: the moves are no-ops, while the plan and the counts still run.
"""

from __future__ import annotations

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
                 offload_frozen_weights: bool):
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

    # ------------------------------------------------------------------------------------------- plan

    def plan_before(self, active: list[Unit]) -> list[Move]:
        """Moves before the step of ``active``: its states to the device; frozen weights per the plan."""
        moves = []
        for unit in active:
            for name in unit.params:
                if self.state_location.get(name, DEVICE) == HOST:
                    moves.append(Move("state", name, DEVICE, self._state_bytes(name)))
        if self.offload_frozen_weights:
            lowest = min(self.unit_index[u.name] for u in active)
            for i, unit in enumerate(self.units):
                want = HOST if i < lowest and unit.module is not None else DEVICE
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

    def before_step(self, active: list[Unit]) -> list[Move]:
        moves = self.plan_before(active)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)  # prefetches have landed
        self._apply(moves)
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

    def _apply(self, moves: list[Move]) -> None:
        for move in moves:
            if move.kind == "state":
                self._move_state(move)
                self.state_location[move.name] = move.dst
            else:
                self._move_weights(move)
                self.weight_location[move.name] = move.dst

    def _move_state(self, move: Move) -> None:
        if not self.real:
            return
        state = self.rule_state.by_param.get(move.name, {})
        if move.dst == HOST:
            for key, tensor in state.items():
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                state[key] = host
        else:
            with torch.cuda.stream(self.stream):
                for key, tensor in state.items():
                    state[key] = tensor.to(self.device, non_blocking=True)

    def _move_weights(self, move: Move) -> None:
        if not self.real:
            return
        module = self.units[self.unit_index[move.name]].module
        target = self.device if move.dst == DEVICE else torch.device("cpu")
        for tensor in _tensors_of(module):
            tensor.data = tensor.data.to(target)
        self._stream_for_forward(move.name, module, enabled=move.dst == HOST)

    def _stream_for_forward(self, name: str, module: torch.nn.Module, enabled: bool) -> None:
        """A host-resident unit visits the device for its forward only (it has no backward: it is frozen and
        below every trainable unit)."""
        kept = []
        for owner, handle in self._hooks:
            if owner == name:
                handle.remove()
            else:
                kept.append((owner, handle))
        self._hooks = kept
        if not enabled:
            return

        def to_device(mod, args):
            for t in _tensors_of(mod):
                t.data = t.data.to(self.device, non_blocking=True)

        def to_host(mod, args, output):
            for t in _tensors_of(mod):
                t.data = t.data.to("cpu")

        self._hooks.append((name, module.register_forward_pre_hook(to_device)))
        self._hooks.append((name, module.register_forward_hook(to_host)))

    # ----------------------------------------------------------------------------------------- count

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


def _tensors_of(module: torch.nn.Module):
    """What a weight move carries: parameters and buffers (int8 weights are buffers)."""
    yield from module.parameters()
    yield from module.buffers()
