"""A model's weights written as an HF folder shard by shard, with bounded memory.

``model.save_pretrained(folder, state_dict=...)`` needs every tensor at once: an int8 model's dequantized weights (a
whole float copy, 16 GB for an 8B model in bfloat16) or a PERP model's merged matrices beside the model's own (13 GiB
more on the device at 8B). Here each value is made only when its shard is written and dropped after it:

    on the device   the model, plus the one matrix being made (an int8 weight dequantized, an adapted layer's W'
                    merged a block of rows at a time) until it is copied to the host;
    in host memory  one shard (at most ``shard_bytes``, or one tensor when it alone is larger) and its serialized
                    bytes, which ``safetensors`` builds before writing.

What is written is what ``save_pretrained`` writes: the HF state dict (a tied weight once, under the name transformers
keeps; ``_keys_to_ignore_on_save`` left out; transformers' weight renamings reverted, per shard, as it does itself
for offloaded models), ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` with their index, the config with
the model's dtype and class, and the generation config. Int8 weights are written dequantized in the model's dtype;
adapters are left out, or merged into their weights with ``merge`` (pruned entries stay exactly zero).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from lowmem.distributed.shard import is_sharded
from lowmem.weights.adapters import ADAPTER_KEYS, adapted_layers
from lowmem.weights.int8 import int8_weights

SHARD_BYTES = 2 * 2**30  # host memory one shard may take (safetensors builds its bytes beside it: twice that at peak)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Entry:
    """One tensor of the HF folder: its key, its size, and how to make it (on the model's device)."""

    key: str
    nbytes: int
    make: Callable[[], torch.Tensor]


def hf_entries(model: torch.nn.Module, merge: bool = False) -> list[Entry]:
    """The tensors an HF folder of ``model`` holds, in state-dict order, each made on demand."""
    weights = int8_weights(model)
    adapted = adapted_layers(model)
    int8_prefixes = tuple(f"{name}." for name in weights)
    state = model.state_dict(keep_vars=True)
    # the tensors themselves, by key, so tied ones are found by their shared storage; an int8 weight stands in by its
    # codes (never shared: embeddings and the head stay float)
    refs = {k: v for k, v in state.items()
            if not k.startswith(int8_prefixes) and k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    refs.update({name: weight.codes for name, weight in weights.items()})
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():  # as save_pretrained: before untying
        refs.pop(key, None)
    order = {k: i for i, k in enumerate(state)}
    order.update({name: order[f"{name}.codes"] for name in weights})
    keys = sorted(_untied(refs, model), key=order.__getitem__)
    entries = []
    for key in keys:
        layer = adapted.get(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None
        if merge and layer is not None:
            entries.append(Entry(key, _nbytes(layer.weight), layer.merged_weight))
        elif key in weights:
            entries.append(Entry(key, _nbytes(weights[key]), weights[key].dequantize))
        else:
            tensor = state[key].detach()
            entries.append(Entry(key, _nbytes(tensor), lambda tensor=tensor: tensor))
    return entries


def _nbytes(tensor) -> int:
    """Bytes of ``tensor`` (or of an int8 weight's value in its float dtype)."""
    return tensor.numel() * tensor.dtype.itemsize


def _untied(refs: dict[str, torch.Tensor], model) -> list[str]:
    """The keys left after transformers' own removal of tied weights."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return list(remove_tied_weights_from_state_dict(dict(refs), model))


def shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries, at most ``shard_bytes`` each (a tensor larger than that alone), as huggingface_hub
    splits."""
    out: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not out or (size + entry.nbytes > shard_bytes and out[-1]):
            out.append([])
            size = 0
        out[-1].append(entry)
        size += entry.nbytes
    return out


def write_hf_folder(model, folder: Path, merge: bool = False, shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``model``'s weights, config and generation config into ``folder`` as ``save_pretrained`` would (see the
    module docstring for what is written and what it holds in memory)."""
    from transformers.core_model_loading import revert_weight_conversion

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = shards(hf_entries(model, merge), shard_bytes)
    names = [WEIGHTS_NAME] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total, count = {}, 0, 0
    for name, group in zip(names, groups):
        tensors = {}
        for entry in group:
            value = entry.make()  # on the model's device: one matrix more there, until it is on the host
            if is_sharded(value):  # FSDP2: gathered whole from every rank (each takes part: lowmem.distributed)
                value = value.full_tensor()
            tensors[entry.key] = value.detach().to("cpu").contiguous()
            del value
        tensors = revert_weight_conversion(model, tensors)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        count += sum(t.numel() for t in tensors.values())
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total, "total_parameters": count}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(model, folder)


def _write_configs(model, folder: Path) -> None:
    """The config as ``save_pretrained`` writes it (the model's dtype and class recorded), and the generation config."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
