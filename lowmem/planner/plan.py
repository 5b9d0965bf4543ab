"""The memory plan by simulation (DESIGN §4b): run the recipe's real training step on fake tensors and count.

``simulate(config)`` builds the model from its ``config.json`` on the ``meta`` device, turns every parameter and
buffer into a fake CPU tensor (shape, dtype, no data; sizes do not depend on the device), and runs the trainer's own
objects on it under ``FakeTensorMode``: int8 weights, gradient checkpointing, the chunked loss, token elimination,
the rule and the strategy (standard, fused, hift), for ``steps`` steps of ``train.batch_size`` ×
``data.max_seq_len`` tokens (HiFT: a whole cycle). A :class:`StorageAccountant` counts the live bytes of every
tensor storage as the run would hold them and records the peak, split by component at the peak:

    weights <dtype|int8>   parameters and buffers (int8 weights: codes, scales, outliers)
    gradients              ``.grad`` of parameters (under ``fused`` the live per-tensor gradients)
    rule state             the rule's per-parameter state
    activations            storages the forward made that are still alive (saved for backward, checkpointed inputs)
    pruning                what pruning holds before the first step (``prune.criterion``: scores, masks, wanda's
                           calibration hidden states), when that is the peak
    sparsity masks         packed masks of a pruned model (pruned now, or stored beside its weights)
    temporaries            everything else alive at the peak (backward and update intermediates)

What fake execution cannot see is added as modeled terms for a CUDA device, calibrated on an H200 (2026-11-26,
``benchmarks/bench_gpu.py``): the CUDA context, the caching allocator's cached blocks, and library workspaces.
Under HiFT with ``memory.offload_states`` / ``offload_frozen_weights`` the states and frozen units its residency
plan keeps in host memory move to the host column.

The same accountant counts a real CPU run (``simulate(config, fake=False)``); the tests require the two to agree.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.config import with_overrides
from lowmem.distributed.shard import device_mesh, local, shard_model
from lowmem.errors import UserError
from lowmem.placement.tensor_cache import cached_tensors, clear_tensor_caches

GiB = 2**30
MiB = 2**20

# Modeled terms for a CUDA device, which fake execution cannot see (DESIGN §4b). Calibrated 2026-11-26 on an NVIDIA
# H200 (torch 2.11.0+cu130, driver 580.159.04) by benchmarks/bench_gpu.py, each provider in a fresh process:
CUDA_CONTEXT_BYTES = 768 * MiB  # device memory outside torch's allocator (total - free - reserved): 767 MiB measured
WORKSPACE_BYTES = 64 * MiB  # cuBLAS/cuBLASLt workspaces: max_memory_allocated exceeded the count by 63-67 MB
# The caching allocator keeps freed blocks for reuse; max_memory_reserved exceeded max_memory_allocated by 1.2-2.1
# times the largest storage the step makes (a 128k-vocabulary row of logits or embedding gradient) in four of the
# five single-stream runs measured (LOMO, AdaLomo, int8 + Lion8bit at 1B and 7B/8B), 3.5 times in the fifth.
CACHED_LARGEST_BLOCKS = 2


class StorageAccountant(TorchDispatchMode):
    """Live bytes of tensor storages: the ones :meth:`track`-ed, and every storage an op makes inside the ``with``
    block, until it is freed. ``peak`` is the most that was ever live together outside host memory (storages named
    by :meth:`set_host` are not counted in it); ``at_peak`` is what ``classify(live, host_keys)`` returned for the
    live set at (within 0.1% of) that moment; ``largest_made`` is the largest storage an op made."""

    def __init__(self, classify=None, inputs: bool = False):
        """``inputs``: also count each storage an op reads the first time it is seen (a run whose weights, batches and
        states were made before the count began: the trainer counted step by step)."""
        super().__init__()
        self.inputs = inputs
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) → (bytes, phase it was made in)
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0  # current: every live storage; peak: of current − host_bytes
        self.host_keys: set[int] = set()
        self.host_bytes = 0
        self.phase = "setup"
        self.classify = classify
        self.at_peak: dict[str, int] = {}
        self._classified_total = 0
        self.largest_made = 0

    def set_host(self, keys: set[int]) -> None:
        """The storages that live in host memory from now on (HiFT's offloaded states and frozen units)."""
        self.host_keys = keys
        self.host_bytes = sum(self.live[k][0] for k in keys if k in self.live)

    def track(self, tensor: torch.Tensor, phase: str | None = None) -> int:
        """Count ``tensor``'s storage from now until it is freed; returns its bytes, or 0 if it was counted already."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return 0
        nbytes = storage.nbytes()
        self.live[key] = (nbytes, phase or self.phase)
        self.current += nbytes

        def freed(_, key=key):
            entry = self.live.pop(key, None)
            self._refs.pop(key, None)
            if entry is not None:
                self.current -= entry[0]
                if key in self.host_keys:
                    self.host_bytes -= entry[0]

        self._refs[key] = weakref.ref(storage, freed)
        self._note_peak()
        return nbytes

    def resized(self, tensor: torch.Tensor) -> None:
        """``tensor``'s storage was resized in place (FSDP2 frees and re-allocates its gathered parameters so):
        count its bytes now."""
        storage = tensor.untyped_storage()
        entry = self.live.get(id(storage))
        if entry is None:
            self.track(tensor)
            return
        nbytes = storage.nbytes()
        self.live[id(storage)] = (nbytes, entry[1] if nbytes else self.phase)
        self.current += nbytes - entry[0]
        if id(storage) in self.host_keys:
            self.host_bytes += nbytes - entry[0]
        self._note_peak()

    def _note_peak(self) -> None:
        device = self.current - self.host_bytes
        if device <= self.peak:
            return
        self.peak = device
        if self.classify is not None and device > self._classified_total * 1.001:
            self._classified_total = device
            self.at_peak = self.classify(self.live, self.host_keys)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inputs:
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.track(t, "inputs")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest_made = max(self.largest_made, self.track(t))
        return out


@dataclass
class Plan:
    """Predicted peak bytes on the device, by component (counted, then modeled), and in host memory."""

    device: dict[str, int]  # counted components at the peak
    modeled: dict[str, int]  # what fake execution cannot see
    host: dict[str, int]
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    flops_per_step: float = 0.0  # matmul FLOPs of a step, averaged over the steps simulated (with count_flops)

    @property
    def counted_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def device_bytes(self) -> int:
        return self.counted_bytes + sum(self.modeled.values())

    def fits(self, budget_bytes: int) -> bool:
        return self.device_bytes <= budget_bytes

    def table(self) -> str:
        rows = [("component", "device", "host")]
        names = list(self.device) + [n for n in self.host if n not in self.device]
        for name in names:
            rows.append((name, _gib(self.device.get(name, 0)), _gib(self.host[name]) if name in self.host else ""))
        rows.append(("counted peak", _gib(self.counted_bytes), _gib(sum(self.host.values()))))
        for name, n in self.modeled.items():
            rows.append((f"modeled: {name}", _gib(n), ""))
        rows.append(("planned peak", _gib(self.device_bytes), _gib(sum(self.host.values()))))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_bytes(text: str) -> int:
    """``24GB``/``24GiB``/``24`` (GiB) → bytes. GB is read as GiB, as GPU memory is sold and reported."""
    s = text.strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", GiB), ("GB", GiB), ("G", GiB), ("MIB", MiB), ("MB", MiB), ("M", MiB)):
        if s.endswith(suffix):
            s, unit = s[: -len(suffix)], scale
            break
    else:
        unit = GiB
    try:
        value = float(s)
    except ValueError:
        raise UserError(f"budget '{text}' is not a size (write e.g. 24GB or 16GiB)") from None
    if value <= 0:
        raise UserError(f"budget '{text}' must be positive")
    return int(value * unit)


# ----------------------------------------------------------------------------------------------- the model


def _fake_model(config, mode):
    """The recipe's model built from its config.json on the meta device, every parameter and buffer a fake CPU
    tensor (tied weights stay tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem import assets
    from lowmem.model import DTYPES

    try:
        hf_config = AutoConfig.from_pretrained(assets.resolve(config.model.path))
    except (OSError, ValueError) as err:
        raise UserError(f"model.path '{config.model.path}': no config.json to plan from "
                        f"({str(err).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[config.model.dtype])
    converted: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in converted:
                    converted[id(param)] = torch.nn.Parameter(fake(param.data), requires_grad=param.requires_grad)
                module._parameters[name] = converted[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = fake(buffer)
    return model


def _prepare(model, config) -> None:
    """What ``load_model`` does after loading: int8 weights, no KV cache, checkpointing, training mode."""
    from lowmem.model import enable_gradient_checkpointing

    if config.model.weight_format == "int8":
        from lowmem.weights.int8 import quantize_model

        int8 = config.model.int8
        quantize_model(model, int8.outlier_fraction, int8.refresh_every, int8.blocksize, config.train.seed,
                       int8.stochastic_rounding, include_head=int8.include_head)
    model.config.use_cache = False
    if config.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()


def _retraining(model, config, mode, track) -> None:
    """PERP's part of the run, by the trainer's own code (``lowmem.perp.prepare``) on a fresh run of ``model.path``:
    pruning when ``prune.criterion`` is set (wanda on ``prune.calibration_batches`` batches like the step's, each
    counted by ``track`` as it is made), else the masks stored beside the weights; then ``update.trainable``'s subset
    and adapters."""
    from lowmem.perp.retrain import prepare

    def calibration():
        batches = []
        for _ in range(config.prune.calibration_batches):
            batch = _held_batch(config, model.config.vocab_size, mode, labels=False)
            for tensor in batch.values():
                track(tensor)
            batches.append(_model_inputs(config, batch))
        return batches

    prepare(model, config, config.model.path, None, calibration, report=False)


def _batch(config, vocab_size: int) -> dict[str, torch.Tensor]:
    """A training batch of full-length sequences, as the trainer holds it (ids, labels, padding mask). Packed text has
    no padding: its mask is all ones, which transformers reads and then builds no 4-D mask, so :func:`_model_inputs`
    leaves it out of the forward (fake tensors cannot be read); other formats pad, so their batches carry a padded
    mask, from which it builds one."""
    shape = (config.train.batch_size, config.data.max_seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if config.data.format != "text":
        batch["attention_mask"][-1, -1] = 0
    return batch


def _held_batch(config, vocab_size: int, mode, labels: bool = True) -> dict[str, torch.Tensor]:
    """A :func:`_batch` (without its labels unless ``labels``) as the run holds it: made real, even inside ``mode``,
    then converted once into ``mode``'s fake tensors when there is one (a real tensor would be converted anew, and
    counted again, by each fake op)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        batch = _batch(config, vocab_size)
    if not labels:
        del batch["labels"]
    return {k: mode.from_tensor(v) for k, v in batch.items()} if mode is not None else batch


def _model_inputs(config, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the forward is given of a :func:`_batch`: packed text's all-ones mask acts as none (see there)."""
    return {k: v for k, v in batch.items() if k != "attention_mask" or config.data.format != "text"}


# ----------------------------------------------------------------------------------------------- simulate


def default_steps(config, strategy) -> int:
    """Enough steps to see every peak: two (the first creates the rule state), or HiFT's whole cycle plus one."""
    groups = getattr(strategy, "groups", None)
    return len(groups) + 1 if groups else 2


def _register_cpu_attention_flops() -> None:
    """torch counts the FLOPs of its CUDA attention kernels but not of the CPU one that fake CPU tensors dispatch to:
    give it the same formulas (the full, non-causal count, as torch does for the CUDA kernels)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def forward_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


class MatmulFlops(TorchDispatchMode):
    """Matrix FLOPs of the ops that run, by torch's own formulas (``torch.utils.flop_counter.flop_registry``), without
    changing what runs. ``FlopCounterMode`` decomposes every op it has no formula for and tracks modules through
    autograd functions of its own: beside a storage accountant it changed the storages counted, so ``--fit`` planned
    each candidate above the same plan made alone (HiFT at 1B by 2.3×, fused AdaLomo at 8B 19.05 GiB for 15.14)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class PeerAdamW8bit:
    """A baseline for comparison, run like a strategy: bitsandbytes' ``AdamW8bit`` in the plain loop (backward, step,
    zero_grad), its two moments as uint8 blocks of 256 with float32 absmax (tensors under 4096 values in float32)."""

    name = "bnb AdamW8bit"

    def __init__(self, model, lr: float):
        import bitsandbytes as bnb

        # made outside fake mode: its code maps are built from values
        self.optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr)

    def prepare(self, lr: float) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {}

    def state_tensors(self) -> list[torch.Tensor]:
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


PEERS = {"bnb-adamw8bit": PeerAdamW8bit}


def simulate(config, steps: int | None = None, fake: bool = True, model=None, target: str = "cuda",
             count_flops: bool = False, peer: str | None = None, nproc: int = 1) -> Plan:
    """Run ``steps`` training steps of ``config`` (on fake tensors unless ``fake`` is False, for comparison; then
    ``model`` is the real model to run, or it is loaded from ``model.path``) and return the plan for a ``target``
    device (``cuda`` adds the modeled terms). ``count_flops`` also counts the matrix FLOPs the steps run
    (:class:`MatmulFlops`; recomputation, two-pass clipping and HiFT's shorter backward included, as they
    run, attention included). ``peer`` runs a baseline of :data:`PEERS` instead of the recipe's strategy and rule.
    ``nproc`` > 1: the plan of rank 0 of a distributed run (``lowmem train --nproc``): the model is sharded by FSDP2
    itself over a fake process group of ``nproc`` ranks (collectives do nothing, shapes are as in the run), so its
    shards, its gathered layers in flight and its buffers are counted as the run makes them."""
    if nproc > 1:
        if not fake or peer:
            raise UserError("plan: several processes are planned on fake tensors, with lowmem's strategies only")
        with fake_process_group(nproc):
            return _simulate(config, steps, fake, model, target, count_flops, peer, nproc)
    return _simulate(config, steps, fake, model, target, count_flops, peer, 1)


@contextlib.contextmanager
def counted_resizes(accountant: StorageAccountant):
    """FSDP2 gathers a layer into storages it keeps and resizes (to the whole parameter, then to nothing): report
    each resize to ``accountant``, which otherwise sees a storage's bytes only when it is made."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def counted(resize):
        def run(tensor: torch.Tensor) -> None:
            resize(tensor)
            accountant.resized(tensor)

        return run

    _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = counted(alloc)
    _fsdp_param.free_storage = counted(free)
    try:
        yield
    finally:
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = alloc
        _fsdp_param.free_storage = free


@contextlib.contextmanager
def fake_process_group(nproc: int):
    """A process group of ``nproc`` ranks in this one process, as rank 0 (torch's fake backend: collectives return at
    once); a run's own group, when one exists, is refused."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("plan: several processes are planned outside a distributed run (call it before joining one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _simulate(config, steps, fake, model, target, count_flops, peer, nproc) -> Plan:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from lowmem.activations.loss import check_chunked_head, chunk_tokens_for, loss_sum
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy
    from lowmem.activations.tokens import TokenEliminator

    start = time.perf_counter()
    # The cached constants (code maps, scalars) are made, and counted, by whichever run asks for them first: made
    # anew here, every plan counts them as a run in a fresh process holds them, whatever was planned before it.
    clear_tensor_caches()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    prepared = model is not None  # a model handed in is ready; one built here gets PERP's part in the count below
    if fake:
        model = _fake_model(config, mode)
        mesh = device_mesh(torch.device("cpu")) if nproc > 1 else None  # made outside: it reads its ranks' ids
        with mode:
            _prepare(model, config)
            if nproc > 1:  # as the trainer does it: sharded before anything else is made
                from lowmem.distributed.support import check_supported

                check_supported(config, config.model.path, planning=True)
                chunked = chunk_tokens_for(config.memory.loss_chunk_tokens, model.config.vocab_size) > 0
                shard_model(model, torch.device("cpu"), mesh, head_in_root=chunked)
    elif model is None:
        from lowmem.model import load_model

        int8 = config.model.int8 if config.model.weight_format == "int8" else None
        model = load_model(config.model.path, config.model.dtype, "cpu", config.model.gradient_checkpointing, int8,
                           config.train.seed)
    notes = []
    chunk = chunk_tokens_for(config.memory.loss_chunk_tokens, model.config.vocab_size)
    if chunk and not fake:  # the trainer's probe compares values, which fake tensors do not have
        try:
            check_chunked_head(model)
        except UserError:
            chunk = 0
    elif chunk:
        notes.append(f"loss chunked by {chunk} positions, assuming the model's head passes the trainer's probe")
    state_holder: dict = {}
    accountant = StorageAccountant(lambda live, host: _components(live, host, model, state_holder))
    for tensor in [*model.parameters(), *model.buffers(), *cached_tensors()]:  # and constants its making left
        accountant.track(local(tensor), "weights")  # a sharded parameter: this rank's shard
    context = mode if fake else contextlib.nullcontext()
    unpacked = _UnpackedPositions() if fake else contextlib.nullcontext()
    device = torch.device("cpu")
    accum = config.train.gradient_accumulation_steps
    batches = []  # the step's micro-batches, all on the device through the step as the trainer holds them
    for _ in range(accum):
        batch = _held_batch(config, model.config.vocab_size, mode)
        for tensor in batch.values():
            accountant.track(tensor, "forward")
        batches.append(batch)
    inputs = [_model_inputs(config, batch) for batch in batches]
    if count_flops:
        _register_cpu_attention_flops()
    flops = MatmulFlops() if count_flops else contextlib.nullcontext()
    baseline = PEERS[peer](model, config.update.lr) if peer else None
    resizes = counted_resizes(accountant) if nproc > 1 else contextlib.nullcontext()
    with unpacked, context, accountant, flops, resizes:
        if not prepared:  # pruning runs on the device before the first step: its peak is part of the run's
            accountant.phase = "prune"
            _retraining(model, config, mode, accountant.track)
            for tensor in [*model.parameters(), *model.buffers()]:  # adapters; masks loaded from a file
                accountant.track(local(tensor), "weights")
        if baseline is None:
            strategy = make_strategy(config.update.strategy, model, make_rule(config.update), config.update, config,
                                     device)
        else:
            strategy = baseline
        state_holder["strategy"] = strategy
        if config.tokens.eliminate:
            t = config.tokens
            eliminator = TokenEliminator(model, t.keep_ratio, t.dense_layers, t.block_size, t.predictor,
                                         t.refresh_every)
        else:
            eliminator = None
        n_steps = steps if steps is not None else default_steps(config, strategy)
        label_tokens = max(1, config.train.batch_size * (config.data.max_seq_len - 1) * accum)
        for step in range(n_steps):
            accountant.phase = "update"
            strategy.prepare(config.update.lr)
            accountant.set_host(_host_keys(strategy))
            if eliminator is not None:
                eliminator.start_step(step)
            step_loss = None  # as the trainer's loop keeps it: the step's loss, and its stats, to the log point
            for micro_batch in inputs:
                accountant.phase = "forward"
                loss = loss_sum(model, micro_batch, chunk) / label_tokens
                accountant.phase = "backward"
                strategy.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            accountant.phase = "update"
            stats = strategy.step()  # noqa: F841  (held to the next step, as a loop that logs every step holds it)
            accountant.set_host(_host_keys(strategy))
    device_bytes, host_bytes = _split_host(accountant)
    modeled = {}
    if target == "cuda":
        modeled = {"CUDA context": CUDA_CONTEXT_BYTES,
                   f"allocator: {CACHED_LARGEST_BLOCKS} of the largest blocks cached": CACHED_LARGEST_BLOCKS *
                   accountant.largest_made, "cuBLAS workspaces": WORKSPACE_BYTES}
        if getattr(state_holder["strategy"], "residency", None) is not None and config.memory.offload_frozen_weights:
            in_flight = _streamed_piece_bytes(state_holder["strategy"])
            if in_flight:
                modeled["streamed frozen weights in flight (2 pieces)"] = in_flight
    return Plan(device=device_bytes, modeled=modeled, host=host_bytes, steps=n_steps,
                seconds=time.perf_counter() - start, notes=notes,
                flops_per_step=flops.total / n_steps if count_flops else 0.0)


class _UnpackedPositions:
    """transformers decides whether a batch packs several sequences per row by reading its position ids on the
    host; on fake tensors it cannot, assumes they might, and builds a full 4-D mask the real run never makes. lowmem
    passes no position ids (each row is one sequence, positions 0..T-1), for which the real answer is "not packed"
    (None): give that answer while simulating."""

    def __enter__(self):
        import transformers.masking_utils as masking

        self._masking, self._saved = masking, masking.find_packed_sequence_indices
        masking.find_packed_sequence_indices = lambda position_ids: None
        return self

    def __exit__(self, *exc):
        self._masking.find_packed_sequence_indices = self._saved
        return False


def _rule_state(strategy):
    inner = getattr(strategy, "inner", strategy)
    return getattr(inner, "state", None)


def _weight_labels(model) -> dict[int, str]:
    from lowmem.weights.adapters import adapted_layers
    from lowmem.weights.int8 import int8_weights
    from lowmem.weights.masks import MASK_BUFFER, masked_layers

    labels = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        labels[id(local(tensor).untyped_storage())] = f"weights {str(tensor.dtype).removeprefix('torch.')}"
    for fsdp_param in _fsdp_params(model):  # a gathered module's parameters are its whole ones: its shards are here
        tensor = fsdp_param.sharded_param
        labels[id(local(tensor).untyped_storage())] = f"weights {str(tensor.dtype).removeprefix('torch.')}"
    for tensor in _gathered_weights(model):
        labels[id(tensor.untyped_storage())] = "gathered layers (FSDP2)"
    for weight in int8_weights(model).values():
        for tensor in weight.buffers(recurse=False):
            labels[id(tensor.untyped_storage())] = "weights int8"
    for layer in masked_layers(model).values():
        labels[id(getattr(layer, MASK_BUFFER).untyped_storage())] = "sparsity masks"
    for layer in adapted_layers(model).values():
        for tensor in (layer.lora_A, layer.lora_B):
            labels[id(tensor.untyped_storage())] = f"adapters {str(tensor.dtype).removeprefix('torch.')}"
    return labels



def _fsdp_params(model) -> list:
    """FSDP2's records of the model's parameters (each with its shard and, while gathered, its whole tensor)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            out.extend(group.fsdp_params if group is not None else ())
    return out


def _gathered_weights(model) -> list[torch.Tensor]:
    """FSDP2's whole parameters and all-gather buffers of the layers gathered now (lowmem.distributed)."""
    out = []
    for fsdp_param in _fsdp_params(model):
        for name in ("_unsharded_param", "_unsharded_inner_tensors", "all_gather_outputs"):
            value = getattr(fsdp_param, name, None)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                    out.append(tensor)
    return out


def _components(live: dict[int, tuple[int, str]], host: set[int], model, holder: dict) -> dict[str, int]:
    """The live storages by component (the module docstring's names); those in ``host`` marked as in host memory."""
    weights = _weight_labels(model)
    grads = {id(local(p.grad).untyped_storage()) for p in model.parameters() if p.grad is not None}
    state = set()
    strategy = holder.get("strategy")
    rule_state = _rule_state(strategy) if strategy is not None else None
    if rule_state is not None:
        state = {id(t.untyped_storage()) for s in rule_state.by_param.values() for t in s.values()}
    elif hasattr(strategy, "state_tensors"):
        state = {id(t.untyped_storage()) for t in strategy.state_tensors()}
    out: dict[str, int] = {}
    for key, (nbytes, phase) in live.items():
        if key in weights:
            name = weights[key]
        elif key in grads:
            name = "gradients"
        elif key in state:
            name = "rule state"
        elif phase == "forward":
            name = "activations"
        elif phase == "prune":
            name = "pruning"
        else:
            name = "temporaries"
        name = f"{name} {HOST_MARK}" if key in host else name
        out[name] = out.get(name, 0) + nbytes
    return out


HOST_MARK = "(host)"


def _host_keys(strategy) -> set[int]:
    """Storages kept in host memory now: HiFT's offloaded states and frozen units' weights (its residency plan), or
    the input embedding's weight and rule state (``memory.offload_embeddings``)."""
    host_embedding = getattr(strategy, "host_embedding", None)
    if host_embedding is not None:
        weight = host_embedding.embedding.weight
        name = next(n for n, p in strategy.params.items() if p is weight)
        tensors = [weight, *strategy.state.by_param.get(name, {}).values()]
        return {id(t.untyped_storage()) for t in tensors}
    residency = getattr(strategy, "residency", None)
    if residency is None:
        return set()
    from lowmem.placement.residency import HOST, _own_tensors

    keys = set()
    for name, where in residency.state_location.items():
        if where == HOST:
            keys.update(id(t.untyped_storage()) for t in residency.rule_state.by_param.get(name, {}).values())
    for unit in residency.units:
        if residency.weight_location.get(unit.name) == HOST:
            keys.update(id(t.untyped_storage()) for module in unit.modules for t in _own_tensors(module))
    return keys


def _split_host(accountant: StorageAccountant) -> tuple[dict[str, int], dict[str, int]]:
    """The peak's components on the device, and those in host memory at that moment (HiFT's offloading)."""
    device, host = {}, {}
    for name, n in accountant.at_peak.items():
        if name.endswith(HOST_MARK):
            host[name.removesuffix(HOST_MARK).strip()] = n
        else:
            device[name] = n
    residual = accountant.peak - sum(device.values())  # the peak is at most 0.1% above the last classified live set
    if residual > 0:
        device["temporaries"] = device.get("temporaries", 0) + residual
    return {k: v for k, v in device.items() if v}, host


def _streamed_piece_bytes(strategy) -> int:
    """Two of the largest modules a HiFT run streams in for their forward (one computing, one prefetched), counted as
    the residency scheduler moves them: parameters and buffers (an int8 weight is buffers: codes, scales, outliers)."""
    from lowmem.placement.residency import _own_tensors

    residency = strategy.residency
    highest = max(residency.lowest_active(group) for group in strategy.groups)  # units below it stream at times
    sizes = []
    for unit in residency.units[:highest]:
        if residency.offloadable(unit):
            for module in unit.modules:
                sizes.append(sum(t.numel() * t.element_size() for t in _own_tensors(module)))
    return sum(sorted(sizes)[-2:])


def suggestion_line(config, plan: Plan, budget: int, target: str = "cuda") -> str:
    """One line naming the knob changes (tried by simulation, in order) that make the run fit, or saying none does."""
    over = plan.device_bytes - budget
    for overrides in candidate_changes(config):
        try:
            candidate = with_overrides(config, overrides)  # validated: a combination the config refuses is skipped
            if simulate(candidate, target=target).fits(budget):
                return (f"plan: needs {plan.device_bytes / GiB:.2f} GiB, {over / GiB:.2f} GiB over the "
                        f"{budget / GiB:.2f} GiB budget; fits with {' '.join(overrides)}")
        except UserError:
            continue
    return (f"plan: needs {plan.device_bytes / GiB:.2f} GiB, {over / GiB:.2f} GiB over the {budget / GiB:.2f} GiB "
            "budget; no single change of strategy, rule, checkpointing, int8 weights, chunked loss or token "
            "elimination fits it (try a smaller model, data.max_seq_len or train.batch_size)")


def candidate_changes(config) -> list[list[str]]:
    """Knob changes to try, cheapest in speed and quality first; only those that change something."""
    c = config
    out = []
    if not c.model.gradient_checkpointing:
        out.append(["model.gradient_checkpointing=true"])
    if c.memory.loss_chunk_tokens == 0:
        out.append(["memory.loss_chunk_tokens=512"])
    if c.update.strategy != "fused" or c.update.rule in ("adamw", "lion"):
        out.append(strategy_change(c, "fused", "adalomo"))
        out.append(strategy_change(c, "fused", "lion8bit"))
    if c.model.weight_format != "int8":
        out.append(["model.weight_format=int8"])  # the recipe's own rule first: AdaLomo at 9B fits 24 GB with it
        out.append(["model.weight_format=int8", *strategy_change(c, "fused", "lion8bit")])
    if not c.tokens.eliminate:
        out.append(["tokens.eliminate=true", "tokens.predictor=true"])
    if c.update.strategy != "hift":
        out.append(["update.strategy=hift", "memory.offload_states=true", "memory.offload_frozen_weights=true"])
    if not c.model.gradient_checkpointing:
        out.append(["model.gradient_checkpointing=true", *strategy_change(c, "fused", "adalomo")])
    seen, unique = set(), []
    for overrides in out:
        if tuple(overrides) not in seen:
            seen.add(tuple(overrides))
            unique.append(overrides)
    return unique


# ----------------------------------------------------------------------------------------------- --fit


@dataclass
class Candidate:
    overrides: list[str]
    plan: Plan
    tokens_per_step: int

    @property
    def flops_per_token(self) -> float:
        return self.plan.flops_per_step / max(1, self.tokens_per_step)


def strategy_change(config, strategy: str, rule: str) -> list[str]:
    """Overrides that switch to ``strategy`` + ``rule``, turning off what only HiFT has (its offloading) when leaving
    it; under a fused update, no gradient accumulation (the micro-batch grows to keep the effective batch)."""
    out = [f"update.strategy={strategy}", f"update.rule={rule}"]
    if strategy != "hift":
        out += ["memory.offload_states=false", "memory.offload_frozen_weights=false"]
    accum = config.train.gradient_accumulation_steps
    if strategy == "fused" and accum > 1:
        out += [f"train.batch_size={config.train.batch_size * accum}", "train.gradient_accumulation_steps=1"]
    return out


def families(config) -> list[list[str]]:
    """Strategy and rule combinations to search: the recipe's own first, then lowmem's leaner ones."""
    out = [[f"update.strategy={config.update.strategy}", f"update.rule={config.update.rule}"]]
    for strategy, rule in (("fused", config.update.rule), ("fused", "adalomo"), ("fused", "lion8bit"),
                           ("hift", config.update.rule)):
        choice = strategy_change(config, strategy, rule)
        if choice[:2] not in [f[:2] for f in out]:
            out.append(choice)
    return out


def savings_ladder(config) -> list[list[str]]:
    """Memory-saving changes in order of what they cost in speed or quality, each level adding to the one before:
    chunked loss, checkpointing, token elimination, int8 weights, then halving the micro-batch (accumulating more,
    so the effective batch is the same; not under a fused update, which cannot accumulate)."""
    levels: list[list[str]] = [[]]

    def add(*overrides: str) -> None:
        levels.append(levels[-1] + list(overrides))

    if config.memory.loss_chunk_tokens == 0:
        add("memory.loss_chunk_tokens=512")
    if not config.model.gradient_checkpointing:
        add("model.gradient_checkpointing=true")
    if not config.tokens.eliminate and config.data.max_seq_len >= 1024:
        add("tokens.eliminate=true", "tokens.predictor=true")
    if config.model.weight_format != "int8":
        add("model.weight_format=int8")
    batch, accum = config.train.batch_size, config.train.gradient_accumulation_steps
    fused = config.update.strategy == "fused" or (config.update.strategy == "hift" and config.hift.fused)
    while not fused and batch > 1 and batch % 2 == 0:  # a fused update cannot accumulate gradients
        batch, accum = batch // 2, accum * 2
        add(f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accum}")
    return levels


def _final(overrides: list[str]) -> list[str]:
    """Later settings of a key replace earlier ones."""
    by_key: dict[str, str] = {}
    for item in overrides:
        by_key[item.split("=", 1)[0]] = item
    return list(by_key.values())


def fit(config, budget: int, target: str = "cuda", progress=None) -> list[Candidate]:
    """For each strategy/rule family, the least memory-saving level of :func:`savings_ladder` that fits ``budget``
    (tried in order, cheapest first), ranked by matrix FLOPs per token, fastest first. Each candidate is planned as it
    would be alone (its plan equals ``lowmem plan`` of its recipe)."""
    found = []
    for family in families(config):
        base = _final(family)
        ladder = savings_ladder(with_overrides(config, base))

        def attempt(level: int) -> Candidate | None | bool:
            """The candidate at ``level`` if it fits, None if it does not, False if it is refused."""
            overrides = _final(base + ladder[level])
            try:
                candidate_config = with_overrides(config, overrides)
                plan = simulate(candidate_config, target=target, count_flops=True)
            except UserError as err:  # a combination the model or the config refuses
                if progress:
                    progress(f"  {' '.join(overrides)}: refused ({err})")
                return False
            if progress:
                progress(f"  {' '.join(overrides)}: {plan.device_bytes / GiB:.2f} GiB")
            if not plan.fits(budget):
                return None
            tokens = (candidate_config.train.batch_size * candidate_config.data.max_seq_len
                      * candidate_config.train.gradient_accumulation_steps)
            return Candidate(overrides, plan, tokens)

        # The least saving level that fits, level by level: a level need not save more than the one before (token
        # elimination under checkpointing saves nothing and costs bookkeeping), so no search may assume it does.
        for level in range(len(ladder)):
            result = attempt(level)
            if result:
                found.append(result)
                break
    return sorted(found, key=lambda c: (c.flops_per_token, -_micro_batch(c)))


def _micro_batch(candidate: Candidate) -> int:
    sizes = [int(o.split("=", 1)[1]) for o in candidate.overrides if o.startswith("train.batch_size=")]
    return sizes[-1] if sizes else 0
