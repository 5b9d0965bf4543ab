"""The HiFT strategy (Liu et al. 2024): each optimizer step trains one group of units; the rest are frozen.

Units are found generically (``lowmem.placement.units``); ``hift.group_size`` units form a group, visited
bottom_up, top_down or in an order drawn once at random. Only the active group has ``requires_grad``:

* its gradients are the only ones that exist, and rule state is needed for it alone (the residency
  scheduler keeps the others in host memory);
* the group advances per optimizer step, never per micro-batch, so gradient accumulation is exact (the
  reference rotates per micro-batch, so with accumulation only some groups ever train);
* layers below the lowest trainable unit get inputs and weights that need no gradient, so autograd
  records no graph and saves no activations for them: backward stops at the active group;
* the learning rate is held for a full cycle, so every group of a cycle trains at the same lr: the value the
  plain schedule over all steps reaches at the cycle's last step (``schedule_step``). So warmup and decay span
  the whole run, and with two groups or more no group trains at lr 0: a schedule's position 0 is lr 0 under
  warmup, and a schedule counted in cycles would spend the whole first cycle there (k steps that change nothing).
  With one group HiFT is the plain loop and follows the plain schedule, whose first warmup step is lr 0 as in
  transformers.

The per-step update is delegated to the ``standard`` strategy, or to ``fused`` with ``hift.fused``.
"""

from __future__ import annotations

import logging

import torch

from lowmem.errors import UserError
from lowmem.placement.residency import ResidencyScheduler
from lowmem.strategies.fused import FusedStrategy
from lowmem.strategies.standard import StandardStrategy
from lowmem.placement.units import discover_units, make_groups

POSITION_KEY = "__hift__::position"
log = logging.getLogger("lowmem")


class HiftStrategy:
    name = "hift"

    def __init__(self, model: torch.nn.Module, rule, update_config, config, device: torch.device | None = None):
        """``device``: where training runs (default: where the model is). A model loaded in host memory for
        ``memory.offload_frozen_weights`` is put in place by :meth:`place`."""
        hift, memory = config.hift, config.memory
        self.units = discover_units(model)
        if hift.group_size > len(self.units):
            raise UserError(f"hift.group_size {hift.group_size} is more than the model's {len(self.units)} HiFT units "
                            f"({self.units[0].name} … {self.units[-1].name}): every step would train everything; use "
                            f"hift.group_size={len(self.units)} or less, or update.strategy=standard")
        self.groups = make_groups(self.units, hift.group_size, hift.order, config.train.seed)
        if len(self.groups) == 1:
            log.warning("hift: one group of all %d units: every step trains the whole model, as update.strategy="
                        "standard does", len(self.units))
        log.info("hift: %d units in %d groups: %s", len(self.units), len(self.groups),
                 " | ".join("+".join(u.name for u in g) for g in self.groups))
        # The inner strategy is built while every unit is trainable, so it knows (and hooks) all of them.
        # (the input embedding keeps its dense gradient here: row-sparse updates are the fused strategy's alone)
        self.inner = (FusedStrategy(model, rule, update_config, row_sparse_embeddings=False) if hift.fused
                      else StandardStrategy(model, rule, update_config))
        self.position = 0  # optimizer steps taken: the active group is groups[position % k]
        device = device if device is not None else next(model.parameters()).device
        self.residency = ResidencyScheduler(self.units, self.inner.state, device, memory.offload_states,
                                            memory.offload_frozen_weights, model)
        self._activate(self.groups[0])

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every unit's trainable tensors, by name (the inner strategy's)."""
        return self.inner.params

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def active(self):
        return self.groups[self.position % self.n_groups]

    def _activate(self, group) -> None:
        active = {n for unit in group for n in unit.params}
        for unit in self.units:
            for name, param in unit.params.items():
                param.requires_grad_(name in active)

    def schedule_step(self, step: int, total_steps: int) -> tuple[int, int]:
        """The delayed schedule: the plain schedule's position for the last step of ``step``'s cycle."""
        k = self.n_groups
        return min((step // k + 1) * k, total_steps) - 1, total_steps

    def prepare(self, lr: float) -> None:
        self._activate(self.active)
        self.residency.before_step(self.active)
        self.inner.prepare(lr)

    def backward(self, loss: torch.Tensor) -> None:
        self.residency.states_ready()  # the forward overlapped the state prefetch; backward's updates need it
        self.inner.backward(loss)

    def step(self) -> dict[str, float]:
        group = self.active
        stats = self.inner.step()
        self.position += 1
        self.residency.after_step(group, self.active)
        stats.update(
            hift_group=(self.position - 1) % self.n_groups,
            hift_units=f"{group[0].name}..{group[-1].name}" if len(group) > 1 else group[0].name,
            device_resident_bytes=self.residency.device_resident_bytes(),
            moved_bytes=sum(m.nbytes for m in self.residency.last_plan),
        )
        return stats

    def place(self, model: torch.nn.Module) -> None:
        """Move a model loaded in host memory to where the plan of the next step wants each unit."""
        self.residency.place(model, self.active)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.residency.synchronize()  # offloaded states are written by copies that may still be queued
        return {**self.inner.state_dict(), POSITION_KEY: torch.tensor(self.position, dtype=torch.int64)}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        flat = dict(flat)
        self.position = int(flat.pop(POSITION_KEY, torch.tensor(0)))
        # Loaded into host memory; the plan then brings the active group's state to the device and keeps the
        # others where it keeps them, before the first step (not every group's state on the device at once).
        self.inner.load_state_dict(flat, keep_on_host=True)
        self.residency.place_states(self.active)
        self._activate(self.active)

    def state_bytes(self) -> int:
        return self.inner.state_bytes()
