"""Writing a model as an HF folder shard by shard (lowmem/hf_folder.py): what it holds in memory while exporting a PERP
model (merged adapters) and an int8 model, counted by the storage accountant; what it writes (the same tensors, keys
and config as save_pretrained, sharded with an index, tied weights once); the row-block pieces it is built from."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowmem import assets
from lowmem.weights.adapters import adapted_layers, select_trainable
from lowmem.hf_folder import INDEX_NAME, hf_entries, write_hf_folder
from lowmem.weights.int8 import Int8Weight, int8_weights, quantize_model
from lowmem.weights.masks import attach_masks, mask_of, mask_rows
from lowmem.model import load_model
from lowmem.planner.plan import StorageAccountant
from lowmem.perp.prune import prune_model

SHARD = 64 * 1024


def mask_lora_model(path):
    model = load_model(path, "float32")
    prune_model(model, "magnitude", 0.5, "2:4")
    select_trainable(model, "mask_lora", 4, 8.0)
    with torch.no_grad():  # away from the identity start, so the merge changes every adapted weight
        for layer in adapted_layers(model).values():
            layer.lora_B.normal_()
    return model


def int8_model(path):
    model = load_model(path, "float32")
    quantize_model(model)
    return model


def export_peak(model, folder, merge):
    """Peak live tensor bytes while ``model`` is written (its own tensors counted from the start), and what those
    were."""
    accountant = StorageAccountant()
    own = sum(accountant.track(t) for t in [*model.parameters(), *model.buffers()])
    with accountant:
        write_hf_folder(model, folder, merge=merge, shard_bytes=SHARD)
    return accountant.peak, own


@pytest.mark.parametrize("make,merge", [(mask_lora_model, True), (int8_model, False)], ids=["mask-lora", "int8"])
def test_export_holds_the_model_one_matrix_and_one_shard(make, merge, micro_model_path, tmp_path, monkeypatch):
    # before: every merged (or dequantized) matrix existed at once beside the model, and the whole folder's tensors
    # in host memory: at 8B, 13 GiB more on the device for a PERP model, 16 GB on the host for an int8 one
    import lowmem.weights.adapters

    # row blocks as small, beside these matrices, as 4M values are beside an 8B model's
    monkeypatch.setattr(lowmem.weights.adapters, "MERGE_CHUNK_VALUES", 512)
    model = make(micro_model_path)

    peak, own = export_peak(model, tmp_path / "out", merge)
    matrices = [e.nbytes for e in hf_entries(model, merge) if e.key.endswith(".weight") and "layers." in e.key]
    made = sum(matrices)  # what the export makes: every merged or dequantized matrix
    largest = max(matrices)
    # on a CPU the device and the host are one memory: the model, the shard being written (made tensors only: the
    # model's own are written without a copy; the matrix being made is one of them), and a merge's row block
    assert peak - own <= SHARD + largest, (peak - own, SHARD, largest)
    assert made > 2 * (SHARD + largest)  # all at once would not fit the bound
    assert (tmp_path / "out" / INDEX_NAME).is_file()


@pytest.mark.parametrize("make,merge", [(mask_lora_model, True), (int8_model, False)], ids=["mask-lora", "int8"])
def test_the_sharded_folder_loads_with_the_exported_values(make, merge, micro_model_path, tmp_path):
    model = make(micro_model_path).eval()
    write_hf_folder(model, tmp_path / "out", merge=merge, shard_bytes=SHARD)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(name.startswith("model-") for name in shards)
    written = {k: v for name in shards for k, v in load_file(tmp_path / "out" / name).items()}
    assert set(written) == set(index["weight_map"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not int8_weights(loaded) and not adapted_layers(loaded)
    for name, layer in adapted_layers(model).items():  # merged, pruned zeros kept
        assert torch.equal(written[f"{name}.weight"], layer.merged_weight())
        assert (written[f"{name}.weight"][~mask_of(layer)] == 0).all()
    for name, weight in int8_weights(model).items():
        assert torch.equal(written[name], weight.dequantize())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same values, run by the same operations
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_plain_model_is_written_as_save_pretrained_writes_it(tmp_path):
    model = load_model(str(assets.tiny_model("micro-llama-tied")), "float32")
    model.save_pretrained(tmp_path / "hf")
    write_hf_folder(model, tmp_path / "ours", shard_bytes=SHARD)
    theirs = load_file(tmp_path / "hf" / "model.safetensors")
    index = json.loads((tmp_path / "ours" / INDEX_NAME).read_text())
    ours = {k: v for name in set(index["weight_map"].values()) for k, v in load_file(tmp_path / "ours" / name).items()}
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)  # tied head once
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in theirs.values())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())
    write_hf_folder(model, tmp_path / "one")  # under the default shard size: one file, no index
    assert (tmp_path / "one" / "model.safetensors").is_file() and not (tmp_path / "one" / INDEX_NAME).exists()


@pytest.mark.parametrize("shape,blocksize", [((7, 129), 256), ((64, 300), 64), ((5, 1000), 256)])
def test_int8_rows_dequantize_as_the_whole_weight_does(shape, blocksize):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = Int8Weight(weight, outlier_fraction=0.02, blocksize=blocksize)
    whole = q.dequantize(torch.float32)
    for start, stop in [(0, 1), (1, 4), (3, shape[0]), (0, shape[0]), (shape[0] - 1, shape[0])]:
        assert torch.equal(q.dequantize_rows(start, stop, torch.float32), whole[start:stop]), (start, stop)


def test_mask_rows_are_the_rows_of_the_mask():
    layer = torch.nn.Linear(37, 11)
    mask = torch.rand(11, 37, generator=torch.Generator().manual_seed(1)) > 0.5
    attach_masks(torch.nn.ModuleDict({"l": layer}), {"l.weight": mask})
    for start, stop in [(0, 1), (2, 5), (5, 11), (0, 11)]:
        assert torch.equal(mask_rows(layer, start, stop), mask[start:stop])
