"""Checkpoints of a distributed run, sharded with ``torch.distributed.checkpoint`` (DCP): each rank writes its own rows
of the weights (``model/``) and of the rule state (``optimizer/``) into its own safetensors file
(``HuggingFaceStorageWriter``: the offsets of each shard in the file's header, JSON; nothing is pickled, and reading
opens the files with safetensors only). Rank 0 adds the config, the tokenizer and ``trainer_state.json``; every rank
its generator states. The folder is written hidden and renamed into place by rank 0 once every rank has written, so
a checkpoint is whole or absent, as in one process.

DCP reads any layout back: each rank of another number of processes reads the rows it holds now, and one process
(no process group) reads whole tensors: :func:`lowmem.model.load_model` and
:func:`lowmem.checkpoint.load_strategy_state` read such a folder as a one-process checkpoint."""

from __future__ import annotations

import functools
import json
import math
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowmem import checkpoint as ckpt
from lowmem.distributed.shard import is_sharded, local, sharded_entry, state_layout, whole
from lowmem.distributed.world import World
from lowmem.errors import UserError

MODEL_DIR = "model"
STATE_DIR = "optimizer"


def is_sharded_checkpoint(folder) -> bool:
    """Whether ``folder`` is a distributed run's checkpoint (weights as shards in ``model/``)."""
    return (Path(folder) / MODEL_DIR).is_dir()


FILE_BYTES = 2 * 2**30  # about this much of one rank's shards per file: DCP holds a file's tensors and bytes at once


def _files(shares: dict[str, float]) -> list[list[str]]:
    """Names (sorted) cut into files of about :data:`FILE_BYTES` of each rank's part (``shares``: name → bytes of it a
    rank holds, from global sizes, so the cut is the same on every rank)."""
    files, size = [[]] if shares else [], 0.0
    for key in sorted(shares):
        if size and size + shares[key] > FILE_BYTES:
            files.append([])
            size = 0.0
        files[-1].append(key)
        size += shares[key]
    return files


def _write(entries: dict, shares: dict[str, float], folder: Path) -> None:
    """Each rank's part of ``entries`` (name → a tensor, or a function making it) into ``folder``: a DTensor's local
    shard, a plain tensor (the same on every rank) once. File by file (:func:`_files` of ``shares``; a collective
    each): a function is called for the names of one file only, so what it makes (the DTensor of a rule state kept in
    host memory lands on the device) exists for one file at a time, and DCP's writer holds one file's tensors and
    bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    for index, keys in enumerate(_files(shares), start=1):
        tensors = {key: entries[key] if isinstance(entries[key], torch.Tensor) else entries[key]() for key in keys}
        writer = HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=dict.fromkeys(keys, index),
                                          save_distributed=True)
        dcp.save(tensors, storage_writer=writer)
        del tensors


def _weight_entries(model, nproc: int) -> tuple[dict, dict[str, float]]:
    """The model's weights for :func:`_write` (a tied weight once), and each one's bytes a rank holds."""
    entries = {names[0]: tensor for names, tensor in _weights(model)}
    shares = {key: t.numel() * t.element_size() / (nproc if is_sharded(t) else 1) for key, t in entries.items()}
    return entries, shares


def _rule_state_entries(update, nproc: int) -> tuple[dict, dict[str, float]]:
    """The rule state's entries for :func:`_write` (a sharded entry as a function making the DTensor of the whole
    entry), and each one's bytes a rank holds (from the whole entry's size: the same on every rank)."""
    params, replicated = state_layout(update)
    entries, shares = {}, {}
    for key, tensor in update.state_dict().items():
        param = sharded_entry(key, tensor.dim(), params, replicated)
        if param is None:
            entries[key], shares[key] = tensor, tensor.numel() * tensor.element_size()
        else:  # a rank past the last rows holds none: the share comes from the whole entry's rows
            entries[key] = functools.partial(whole, tensor, param)
            shares[key] = param.shape[0] * math.prod(tensor.shape[1:]) * tensor.element_size() / nproc
    return entries, shares


def _weights(model) -> list[tuple[list[str], torch.Tensor]]:
    """The model's weights and buffers that checkpoints hold, each with all its names (a tied weight has two, in the
    state dict's order)."""
    names: dict[int, tuple[list[str], torch.Tensor]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), ([], tensor))[0].append(key)
    return list(names.values())


def _read(tensors: dict, folder: Path) -> None:
    """Fill ``tensors`` in place from the shards in ``folder``: a DTensor's local rows, a plain tensor whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    with warnings.catch_warnings():  # DCP warns that one process reads, even when told so
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist)


def _saved_entries(folder: Path) -> dict:
    """Name → DCP's metadata (whole size, dtype) of every tensor saved in ``folder``."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not folder.is_dir():
        return {}
    return HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata


def save_checkpoint(world: World, output_dir: Path, step: int, model, tokenizer, update, trainer_state: dict,
                    keep_last: int) -> Path:
    """``output_dir/checkpoint-STEP``, every rank writing its shards (a collective), atomically; all but the newest
    ``keep_last`` checkpoints deleted."""
    dest = output_dir / f"checkpoint-{step}"
    tmp = ckpt.named_temporary(dest, "sharded")  # the same folder on every rank
    if world.is_main:
        ckpt.new_temporary(dest, "sharded")
    world.barrier()

    def shards() -> None:
        ckpt.settle()
        _write(*_weight_entries(model, world.size), tmp / MODEL_DIR)
        _write(*_rule_state_entries(update, world.size), tmp / STATE_DIR)
        save_file(ckpt.rng_tensors(), tmp / ckpt.rng_file(world.rank))

    def publish() -> None:
        if world.is_main:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            ckpt.write_trainer_state(tmp, {**trainer_state, "world_size": world.size}, step)
            ckpt.put_in_place(tmp, dest)
            ckpt.keep_newest(output_dir, keep_last)

    try:
        _on_every_rank(world, shards, dest)
        _on_every_rank(world, publish, dest)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _on_every_rank(world: World, part, dest: Path) -> None:
    """Run ``part`` here, then agree with the other ranks (a sum of failures over the ranks): when any rank failed,
    every rank raises, so none waits in a later collective for one that gave up."""
    failure = None
    try:
        part()
    except Exception as err:  # noqa: BLE001 — raised below, after the others have heard of it
        failure = err
    (failed,) = world.sum_counts(int(failure is not None))
    if failure is not None:
        raise failure
    if failed:
        raise UserError(f"checkpoint {dest}: {failed} other rank(s) failed to write their part (their error is "
                        "printed above)")


def weights_folder(path) -> Path:
    """Where the safetensors of ``path``'s weights are: a sharded checkpoint's ``model/``, or the folder itself."""
    return Path(path) / MODEL_DIR if is_sharded_checkpoint(path) else Path(path)


def _named_as_saved(model, saved) -> tuple[dict, list[str]]:
    """The model's weights and buffers, each under the one of its names that ``saved`` holds (a tied weight has two:
    an HF folder holds one), and the first name of each that none of its names is saved under."""
    chosen, missing = {}, []
    for names, tensor in _weights(model):
        found = [name for name in names if name in saved]
        if found:
            chosen[found[0]] = tensor
        else:
            missing.append(names[0])
    return chosen, missing


def readable_by_rows(path, model) -> bool:
    """Whether each rank can read its rows of ``model``'s weights from ``path``: a sharded checkpoint, or a local
    folder of plain safetensors holding every weight once, under the model's own name and shape (``model`` may be on
    meta). Not: a quantized checkpoint, a model that keeps modules in float32 (both are loading work
    ``from_pretrained`` does), or a folder with safetensors its index does not list."""
    folder = weights_folder(path)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return False
    if getattr(model.config, "quantization_config", None) or getattr(model, "_keep_in_fp32_modules", None):
        return False
    if not is_sharded_checkpoint(path):
        index = folder / "model.safetensors.index.json"
        files = {f.name for f in folder.glob("*.safetensors")}
        if index.is_file() and set(json.loads(index.read_text())["weight_map"].values()) != files:
            return False
    saved = _saved_entries(folder)
    if not is_sharded_checkpoint(path) and any(len(entry.chunks) > 1 for entry in saved.values()):
        return False  # a name in two files
    if any(not entry.properties.dtype.is_floating_point for entry in saved.values()):
        return False
    chosen, missing = _named_as_saved(model, saved)
    return not missing and all(tuple(saved[k].size) == tuple(t.shape) for k, t in chosen.items())


def read_weights(model, path) -> None:
    """The weights saved in ``path`` (a sharded checkpoint, or a folder of HF safetensors), into ``model`` in place:
    a sharded model's ranks each read their rows, an unsharded one reads them whole."""
    folder = weights_folder(path)
    saved = _saved_entries(folder)
    tensors, missing = _named_as_saved(model, saved)
    if missing:
        raise UserError(f"{path} has no weight {missing[0]} (was it written for this model?)")
    for key, tensor in tensors.items():
        if tuple(saved[key].size) != tuple(tensor.shape):
            raise UserError(f"{path}: the weight {key} has shape {tuple(saved[key].size)}, the model's is "
                            f"{tuple(tensor.shape)} (was it written for this model?)")
    _read(tensors, folder)


def load_rule_state(checkpoint: Path, update=None) -> dict[str, torch.Tensor]:
    """The rule state of a sharded checkpoint (flat ``name::key`` → tensor): with ``update`` (a sharded run's), each
    entry of a sharded parameter in this rank's rows; without, every entry whole (one process)."""
    params, replicated = state_layout(update) if update is not None else ({}, ())
    nproc = torch.distributed.get_world_size() if update is not None else 1
    saved = _saved_entries(Path(checkpoint) / STATE_DIR)
    layout, shares = {}, {}
    for key, entry in saved.items():
        size, dtype = tuple(entry.size), entry.properties.dtype
        param = sharded_entry(key, len(size), params, replicated)
        if param is not None and size[0] != param.shape[0]:
            raise UserError(f"checkpoint {checkpoint}: the state {key} has {size[0]} rows, its weight "
                            f"{param.shape[0]} (was it written for this model?)")
        layout[key] = (size, dtype, param)
        shares[key] = math.prod(size) * dtype.itemsize / (nproc if param is not None else 1)
    out = {}
    # read in parts of about FILE_BYTES each, into host memory: a state the run keeps there (HiFT's offloaded groups)
    # never visits the device whole; the strategy moves the rest where it lives
    for keys in _files(shares):
        templates = {}
        for key in keys:
            size, dtype, param = layout[key]
            if param is None:
                templates[key] = torch.empty(size, dtype=dtype)
            else:
                templates[key] = whole(torch.empty((local(param).shape[0], *size[1:]), dtype=dtype), param)
        _read(templates, Path(checkpoint) / STATE_DIR)
        out.update({key: local(tensor).cpu() for key, tensor in templates.items()})
    return out
