"""What a run shows and records: peak memory, the progress bar, and ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path

import torch

log = logging.getLogger("lowmem")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process peak RSS on CPU (what the user sees)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_record(device: torch.device) -> dict[str, int]:
    """What ``metrics.jsonl`` records of memory: ``peak_mem_bytes`` (:func:`peak_memory_bytes`) and, on a GPU,
    ``peak_reserved_bytes``: ``max_memory_reserved``, what the caching allocator holds, which is what runs out."""
    record = {"peak_mem_bytes": peak_memory_bytes(device)}
    if device.type == "cuda":
        record["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return record


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class SavedTensorBytes:
    """Bytes of the distinct tensor storages autograd saves for backward inside the ``with`` block.

    This is the activation memory a forward leaves for backward: storages of ``params`` (weights saved by
    reference, or views of them) are excluded. Frozen layers below every trainable one save nothing,
    which this makes visible. (FSDP2: a parameter's local shard is excluded, and so is any parameter saved by
    reference: its gathered whole parameters.)
    """

    def __init__(self, params=()):
        from lowmem.distributed.shard import local

        self.nbytes = 0
        self._seen: set[int] = {local(p).untyped_storage().data_ptr() for p in params}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # a parameter (or a view of one) saved by reference: FSDP2's gathered whole parameters, which it frees after
        # the layer's forward and gathers again for its backward, are weights, not activations
        gathered = isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)
        if tensor.device.type != "meta" and not gathered:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.nbytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class LiveTensorBytes:
    """Bytes of the distinct storages made inside the ``with`` block that are still alive when it ends.

    Around a forward this is everything the forward leaves for backward, counted exactly and whatever holds it:
    tensors autograd saved, the inputs activation checkpointing keeps, the loss. (:class:`SavedTensorBytes` sees
    only what autograd's saved-tensor hooks see, and activation checkpointing keeps its inputs outside them.)
    """

    def __init__(self, exclude=()):
        """``exclude``: tensors whose storage is not counted (parameters: their transposes and other views are made
        inside the block and saved for backward)."""
        self.nbytes = 0
        self._made: list = []
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def __enter__(self) -> "LiveTensorBytes":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        made = self._made

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        made.append(weakref.ref(t))
                return out

        self._mode = Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        storages = {}
        for ref in self._made:
            t = ref()
            if t is not None:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._excluded:
                    storages[storage.data_ptr()] = storage.nbytes()
        self.nbytes = sum(storages.values())
        self._made = []


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    On resume, records after the resumed step are dropped first, so the file reads as one run.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line, path) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str, path: Path) -> float:
    """The step of a metrics line; a line cut short by a kill mid-write (or empty) counts as after every step, so
    the resume drops it."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        if line.strip():
            log.warning("%s: dropping an incomplete line (a run killed while writing it): %.60s", path, line)
        return math.inf


class Progress:
    """A tqdm bar with loss, tokens/s, peak memory and ETA; plain log lines when disabled or not a TTY."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs stay readable).
        self.bar = tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step",
                        dynamic_ncols=True, desc="train")
        self.active = not self.bar.disable

    def update(self, record: dict | None) -> None:
        """One step done; ``record`` is its metrics at a log point (None between log points, whose values
        are not read from the device)."""
        if self.active:
            if record is not None:
                self.bar.set_postfix_str(
                    f"loss {record['loss']:.4f} | {record['tokens_per_s']:.0f} tok/s | "
                    f"mem {format_bytes(record['peak_mem_bytes'])}", refresh=False
                )
            self.bar.update(1)
        elif record is not None:
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  mem %s", record["step"], self.bar.total,
                     record["loss"], record["lr"], record["tokens_per_s"], format_bytes(record["peak_mem_bytes"]))

    def message(self, text: str) -> None:
        if self.active:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        self.bar.close()
