"""The fused strategy (LOMO): the rule runs inside backward, on each parameter as soon as its gradient is
complete, and the gradient is freed at once, so no full set of gradients ever exists.

``Tensor.register_post_accumulate_grad_hook`` fires once per parameter per backward, after every
contribution has been summed into ``.grad`` (a tied weight has one accumulator, so it fires once, after both
uses). That avoids the reference LOMO's per-parameter hooks that scan all parameters (O(P²)).

Clipping (``update.clip_mode``):
    ``per_tensor`` (default): each gradient is clipped by its own norm; no extra pass.
    ``two_pass``: a first backward only measures the global norm (each gradient freed after its norm is
        taken), a second applies the updates with the clipping coefficient, as LOMO does (~2× backward).
Float16 weights use the two-pass mode with dynamic loss scaling: an overflow found in the first pass skips
the step before any weight changed, then the scale halves; it doubles again after enough good steps. That check
is the step's one host read (``lowmem.placement.host_sync``); clipping coefficients stay on the device. Without loss
scaling a non-finite norm is not checked inside the step (that would be a read too): the loss, checked at
each log step, stops the run.
Gradient accumulation is refused by the config check: a fused update keeps no gradient to accumulate.
The input embedding's rows are updated alone where that is exact (``lowmem.strategies.embedding_rows``): its lookup's
backward hands the batch's rows to :meth:`FusedStrategy._on_rows`, and no vocabulary-sized gradient exists.
"""

from __future__ import annotations

import weakref

import torch

from lowmem.distributed.shard import is_sharded, local
from lowmem.strategies import embedding_rows
from lowmem.errors import UserError
from lowmem.weights.int8 import trainable_tensors
from lowmem.weights.masks import GradientMasks
from lowmem.ops.update import math_dtype
from lowmem.strategies.state import (
    LossScaler,
    RuleState,
    apply_rule,
    clip_coefficient,
    load_strategy_state,
    norm_over_ranks,
    overflowed,
    stacked,
    strategy_state_dict,
)


class FusedStrategy:
    name = "fused"

    def __init__(self, model: torch.nn.Module, rule, update_config, row_sparse_embeddings: bool = True,
                 offload_embeddings: bool = False):
        self.rule = rule
        self.clip_grad_norm = update_config.clip_grad_norm
        self.scaler = LossScaler.for_model(model, update_config)
        self.two_pass = self.scaler.enabled or (update_config.clip_mode == "two_pass" and self.clip_grad_norm is not None)
        self.params = trainable_tensors(model)
        # FSDP2 (lowmem.distributed): the hooks fire on each rank's shard of the reduced gradient; norms sum over ranks
        self.sharded = any(is_sharded(p) for p in self.params.values())
        self.masks = GradientMasks(model, self.params)  # pruned weights (PERP): updates keep their zeros
        self.state = RuleState(rule)
        self.lr = 0.0
        self._measuring = False
        self._grad_scale = 1.0
        self._sq_norms: list[torch.Tensor] = []
        self._live_grad_bytes = 0
        self._peak_grad_bytes = 0
        self._skipped = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook_for(n)) for n, p in self.params.items()]
        self._model = weakref.ref(model)
        self._rows_name = None  # the parameter updated from its rows, whose (empty) gradient hook is passed over
        if self.sharded:
            self.embedding_gradient = "dense gradient, sharded (FSDP2: the row-sparse lookup is not sharded)"
        elif row_sparse_embeddings:
            self._rows_name, self.embedding_gradient = embedding_rows.install(model, self.params, rule, self.masks,
                                                                              self._rows_for)
        else:
            self.embedding_gradient = "dense gradient (memory.row_sparse_embeddings=false)"
        self.host_embedding = None
        if offload_embeddings:
            self._offload_embedding(model)

    def _offload_embedding(self, model: torch.nn.Module) -> None:
        """``memory.offload_embeddings``: the input embedding's weight and rule state in host memory, its rows looked
        up and updated there (``lowmem.placement.host_embedding``); only where its rows alone can be updated."""
        if self._rows_name is None:
            raise UserError(f"memory.offload_embeddings updates the input embedding from its rows on the host, which "
                            f"is not exact here: {self.embedding_gradient}")
        name = self._rows_name
        param = self.params[name]
        device = next((p.device for n, p in self.params.items() if n != name), param.device)
        from lowmem.placement.host_embedding import HostEmbedding  # it imports this package's embedding_rows

        self.host_embedding = HostEmbedding(model.get_input_embeddings(), device, self._rows_for(name, param))
        self.embedding_gradient = "row-sparse updates in host memory (memory.offload_embeddings)"

    def feed(self, host_batch: dict[str, torch.Tensor]) -> None:
        """The next micro-batch as it is on the host, before it moved: its token ids for a host lookup."""
        if self.host_embedding is not None:
            self.host_embedding.feed(host_batch["input_ids"])

    def flush(self) -> None:
        """Finish every update still running (the host embedding's): before weights are read or saved."""
        if self.host_embedding is not None:
            self.host_embedding.flush()

    def _hook_for(self, name: str):
        # The hook holds the strategy weakly. A tensor's hooks are out of sight of Python's cycle collector, so a
        # strong reference (parameter → hook → strategy → parameter) kept the whole model alive after both were
        # dropped: a second run in the same process (a notebook, a sweep) still held the first one's in memory.
        strategy = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            live = strategy()
            if live is not None:
                live._on_grad(name, param)

        return hook

    def _rows_for(self, name: str, param: torch.Tensor):
        strategy = weakref.ref(self)  # held by the embedding's lookup: weakly, as the hooks hold it

        def sink(rows: torch.Tensor, values: torch.Tensor) -> None:
            live = strategy()
            if live is not None:
                live._on_rows(name, param, rows, values)

        return sink

    def _on_rows(self, name: str, param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """The input embedding's gradient as its batch's rows (``lowmem.strategies.embedding_rows``): measured and
        applied as :meth:`_on_grad` does a dense gradient (the rows' norm is the dense gradient's). With the embedding
        in host memory the update runs there once the rows have arrived (``HostEmbedding.update_on_host``), with this
        step's lr and the rule state that lives there."""
        state, lr = self.state.get(name, param), self.lr

        def update(r: torch.Tensor, v: torch.Tensor, scale) -> None:
            self.rule.update_rows(param, r, v, state, lr, scale)

        def apply(scale) -> None:
            if self.host_embedding is not None:
                self.host_embedding.update_on_host(rows, values, scale, update)
            else:
                update(rows, values, scale)

        nbytes = values.numel() * values.element_size() + rows.numel() * rows.element_size()
        self._measure_and_apply(values, nbytes, apply)

    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        """One parameter's gradient is complete: mask, measure, update, free."""
        grad = param.grad
        if name == self._rows_name and grad is None:  # its lookup's backward handed it no gradient: updated by rows
            return
        # masked before its norm is taken or the rule sees it (see lowmem.weights.masks)
        mask = self.masks.mask_grad_(name, grad) if self.masks else None
        grad = local(grad)
        self._measure_and_apply(grad, grad.numel() * grad.element_size(), lambda scale: apply_rule(
            self.rule, param, grad, self.state.get(name, param), self.lr, scale, mask))
        param.grad = None

    def _measure_and_apply(self, grad: torch.Tensor, nbytes: int, apply) -> None:
        """Count ``grad``'s bytes as live, take its norm when clipping or the first pass needs it (one more pass over
        it), and unless measuring call ``apply(scale)`` under no_grad with the gradient scale (per-tensor clipping:
        computed on the device)."""
        self._live_grad_bytes += nbytes
        self._peak_grad_bytes = max(self._peak_grad_bytes, self._live_grad_bytes)
        norm = None
        if self._measuring or self.clip_grad_norm is not None:
            norm = torch.linalg.vector_norm(grad, 2, dtype=math_dtype(grad.dtype))
            self._sq_norms.append(norm.square())  # this rank's share (sharded): summed over the ranks once a step
        if not self._measuring:
            scale = self._grad_scale
            if not self.two_pass and self.clip_grad_norm is not None:
                if self.sharded:  # the tensor's own norm, from its shards on every rank
                    norm = norm_over_ranks(norm)
                scale = clip_coefficient(norm, self.clip_grad_norm)
            with torch.no_grad():
                apply(scale)
        self._live_grad_bytes -= nbytes

    def prepare(self, lr: float) -> None:
        self.lr = lr
        self._sq_norms = []
        self._peak_grad_bytes = 0
        self._skipped = False

    def backward(self, loss: torch.Tensor) -> None:
        if not self.two_pass:
            self._measuring, self._grad_scale = False, 1.0
            loss.backward()
            return
        scaled = loss * self.scaler.scale if self.scaler.enabled else loss
        self._measuring = True
        scaled.backward(retain_graph=True)
        norm = self._global_norm()
        self._sq_norms = []
        if self.scaler.enabled:
            norm = norm / self.scaler.scale
            if overflowed(norm):
                self._skipped = True  # nothing was applied yet: skipping leaves the weights untouched
                self.scaler.update(found_inf=True)
                return
        self._measuring = False
        self._grad_scale = clip_coefficient(norm, self.clip_grad_norm)
        if self.scaler.enabled:
            self._grad_scale = self._grad_scale / self.scaler.scale
        self._measured_norm = norm
        scaled.backward()
        self.scaler.update(found_inf=False)

    def _global_norm(self) -> torch.Tensor:
        total = stacked(self._sq_norms).sum() if self._sq_norms else torch.zeros(())
        if self.sharded:
            torch.distributed.all_reduce(total)
        return total.sqrt()

    def step(self) -> dict[str, float | torch.Tensor]:
        stats = {"grad_bytes_peak": self._peak_grad_bytes, "state_bytes": self.state.nbytes()}
        if self.two_pass:
            stats["grad_norm"] = float("nan") if self._skipped else self._measured_norm
        elif self.clip_grad_norm is not None:
            stats["grad_norm"] = self._global_norm()  # pre-clipping norm of all gradients
        if self.scaler.enabled:
            stats.update(loss_scale=self.scaler.scale, skipped=int(self._skipped))
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        return strategy_state_dict(self.state, self.scaler)

    def load_state_dict(self, flat: dict[str, torch.Tensor], keep_on_host: bool = False) -> None:
        self.flush()
        load_strategy_state(flat, self.state, self.scaler, self.params, keep_on_host)

    def state_bytes(self) -> int:
        return self.state.nbytes()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.host_embedding is not None:
            self.host_embedding.close()
        model = self._model()
        if model is not None:
            embedding_rows.uninstall(model)
