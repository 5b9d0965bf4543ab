"""PERP: pruning (magnitude, wanda, N:M), masked retraining under every strategy and rule, the retraining subsets and
their adapters, sparsity-preserving export, resume, and the prune / eval commands."""

import json

import pytest
import torch
from safetensors.torch import load_file

from float_error import SUM64
from lowmem.weights.adapters import AdaptedLinear, _AdaptedLinearFunction, select_trainable
from lowmem.errors import ConfigError, UserError
from lowmem.weights.masks import MASKS_FILE, attach_masks, mask_of, pack_bits, unpack_bits
from lowmem.perp.prune import keep_mask, prune_model, wanda_scores
from lowmem.trainer import train
from test_trainer import EVERY_STRATEGY, assert_resume_is_exact, make_config, weights

SUBSETS = ["all", "norms", "norms+head", "mask_lora", "scale_lora"]


def micro(micro_model_path, **kwargs):
    from lowmem.model import load_model

    return load_model(micro_model_path, **kwargs)


# ----------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (64, 129), (2, 3, 11)])
def test_packed_masks_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(bits, mask.shape), mask)


# ----------------------------------------------------------------------------------------------- pruning


def test_magnitude_prunes_the_smallest_share_of_each_matrix_exactly():
    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(1))
    kept = keep_mask(scores, 0.3, "unstructured", per_row=False)
    assert int((~kept).sum()) == 18
    assert scores[~kept].max() < scores[kept].min()  # one threshold over the whole matrix


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_pattern_holds_in_every_group_along_the_input(micro_model_path, pattern, n, m):
    model = micro(micro_model_path)
    before = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    layers = prune_model(model, "magnitude", 0.5, pattern)
    for name, layer in layers.items():
        mask = mask_of(layer)
        groups = mask.view(mask.shape[0], -1, m)  # [out, in] weights: groups of m along the input
        assert (groups.sum(-1) == n).all(), name
        assert torch.equal(layer.weight == 0, ~mask)
        # the kept entries of each group are its largest magnitudes before pruning
        w = before[name].view_as(groups.float())
        assert (w.masked_fill(~groups, float("inf")).amin(-1) >= w.masked_fill(groups, -1).amax(-1)).all()


def calibration_data(micro_model_path, text_data, tokenizer, n=3):
    from lowmem.config import DataConfig
    from lowmem.data import build_datasets, eval_batches

    data = build_datasets(DataConfig(path=text_data, max_seq_len=48, val_fraction=0.0), tokenizer, 0)
    batches = list(eval_batches(data.train, 2, tokenizer.pad_token_id, n))
    # one padded row (as chat formats have): padding positions are not calibration data
    batches[0]["attention_mask"][1, 30:] = 0
    batches[0]["input_ids"][1, 30:] = tokenizer.pad_token_id
    return batches


def reference_wanda(model, batches, sparsity, layer_by_layer=True):
    """Wanda by hand, as its reference implementation prunes (``prune_wanda``): for each decoder layer in order, the
    inputs of its linear layers captured by a whole forward of the model, whose lower layers are already pruned
    (``layer_by_layer``; otherwise all from the dense model); norms over the real tokens; |W|·‖x‖ per output row, the
    lowest ``sparsity`` of each row pruned (a stable sort: among equal scores the lower index first)."""
    from lowmem.perp.prune import prunable_layers

    layers = prunable_layers(model)
    masks = {}
    dense_inputs = None
    for i in range(len(model.model.layers)):
        block = [(n, m) for n, m in layers if n.startswith(f"model.layers.{i}.")]
        if dense_inputs is None or layer_by_layer:
            inputs = {n: [] for n, _ in layers}
            handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs[n].append(args[0].detach()))
                       for n, m in layers]
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for handle in handles:
                handle.remove()
            dense_inputs = inputs
        for name, layer in block:
            x = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(dense_inputs[name], batches)])
            scores = layer.weight.detach().abs() * torch.linalg.vector_norm(x, dim=0)
            k = round(sparsity * scores.shape[1])
            kept = torch.ones_like(scores, dtype=torch.bool)
            kept.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], False)
            masks[f"{name}.weight"] = kept
            with torch.no_grad():
                layer.weight.mul_(kept)
    return masks


def test_wanda_prunes_layer_by_layer_on_the_outputs_of_the_pruned_layers_below(micro_model_path, text_data, tokenizer):
    # float64, so that a score's rank cannot turn on the order of a float32 sum (tests/float_error.py)
    model = micro(micro_model_path, dtype="float64")
    batches = calibration_data(micro_model_path, text_data, tokenizer)
    expected = reference_wanda(micro(micro_model_path, dtype="float64"), batches, 0.4)
    masks = prune_model(model, "wanda", 0.4, calibration=batches)
    assert set(masks) == set(expected)
    for name, layer in masks.items():
        assert torch.equal(mask_of(layer), expected[name]), name
        assert (layer.weight[~expected[name]] == 0).all()
    # and it matters: measured on the dense model (the earlier one-pass calibration), the second layer's masks differ
    dense = reference_wanda(micro(micro_model_path, dtype="float64"), batches, 0.4, layer_by_layer=False)
    assert all(torch.equal(dense[n], expected[n]) for n in expected if ".layers.0." in n)
    assert not all(torch.equal(dense[n], expected[n]) for n in expected if ".layers.1." in n)


def test_wanda_scores_are_the_weight_magnitudes_times_the_input_norms():
    weight = torch.randn(5, 7, dtype=torch.float64)
    x = torch.randn(30, 7, dtype=torch.float64)
    # float64 both ways: sums of 30 squares, n·u₆₄ relative (tests/float_error.py)
    torch.testing.assert_close(wanda_scores(weight, x.square().sum(0)), weight.abs() * torch.linalg.vector_norm(x, dim=0),
                               rtol=SUM64, atol=0)


@pytest.mark.parametrize("per_row", [False, True], ids=["matrix", "rows"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_the_bounded_selection_equals_a_stable_sort(monkeypatch, per_row, ties):
    # blocks of 3 rows (the last shorter) where a matrix took a stable argsort of all its scores (~20 bytes an entry)
    import lowmem.perp.prune

    monkeypatch.setattr(lowmem.perp.prune, "CHUNK_VALUES", 3 * 37)
    generator = torch.Generator().manual_seed(4)
    scores = torch.rand(11, 37, generator=generator)
    if ties:  # many equal scores, zeros too: the k-th smallest falls inside a run of equal ones
        scores = (scores * 4).floor() / 4
    rows = scores if per_row else scores.reshape(1, -1)
    k = round(0.45 * rows.shape[1])
    expected = torch.ones_like(rows, dtype=torch.bool)
    expected.scatter_(1, rows.argsort(dim=1, stable=True)[:, :k], False)
    assert torch.equal(keep_mask(scores, 0.45, "unstructured", per_row), expected.view(11, 37))


def test_pruning_leaves_embeddings_and_head_unless_asked(micro_model_path):
    model = micro(micro_model_path)
    masks = prune_model(model, "magnitude", 0.5)
    assert not any("embed" in n or "lm_head" in n for n in masks) and len(masks) == 14
    assert (model.lm_head.weight != 0).all()
    with_head = prune_model(micro(micro_model_path), "magnitude", 0.5, include_head=True)
    assert "lm_head.weight" in with_head


def test_pruning_int8_weights_zeroes_them_exactly(micro_model_path):
    from lowmem.config import Int8WeightConfig

    model = micro(micro_model_path, int8=Int8WeightConfig())
    masks = prune_model(model, "magnitude", 0.5)
    value = model.model.layers[0].self_attn.q_proj.weight.dequantize(torch.float32)
    assert torch.equal(value == 0, ~mask_of(masks["model.layers.0.self_attn.q_proj.weight"]))


# ----------------------------------------------------------------------------------------------- adapters


def naive(kind, w, a, b, mask, scale, x, bias):
    """The adapted layer by plain autograd on the paper's formulas ([out, in] weights)."""
    product = b @ a
    effective = w + scale * (product * mask) if kind == "mask_lora" else w * product
    return torch.nn.functional.linear(x, effective, bias)


@pytest.mark.parametrize("kind", ["mask_lora", "scale_lora"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_adapted_layer_matches_autograd_of_the_formula(kind, layout):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    out_f, in_f = 6, 10
    base = torch.nn.Linear(in_f, out_f).double() if layout == "linear" else Conv1D(out_f, in_f).double()
    with torch.no_grad():
        base.weight.normal_()
    stored_mask = torch.rand(base.weight.shape) > 0.4
    base.weight.data.mul_(stored_mask)
    attach_masks(torch.nn.ModuleDict({"l": base}), {"l.weight": stored_mask})
    layer = AdaptedLinear(base, kind, rank=3, alpha=5.0).double()
    with torch.no_grad():  # away from the identity start, so every term is exercised
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    w = base.weight.detach() if layout == "linear" else base.weight.detach().T
    mask = stored_mask if layout == "linear" else stored_mask.T
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    bias = base.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = naive(kind, w, a, b, mask.double(), 5.0 / 3, x2, bias)
    # float64 throughout, sums of at most 10 products: torch's float64 defaults (rtol 10⁻⁷) are 10⁹ of its roundoff
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)
    assert torch.autograd.gradcheck(lambda inp, la, lb, bi: _AdaptedLinearFunction.apply(inp, la, lb, bi, layer),
                                    (x.detach().requires_grad_(), a, b, bias))
    # the merge writes exactly the effective weight, and keeps the pruned zeros
    merged = layer.merged_weight()
    eff = (w + 5.0 / 3 * (b @ a) * mask) if kind == "mask_lora" else w * (b @ a)
    torch.testing.assert_close(merged, (eff if layout == "linear" else eff.T).detach())
    assert (merged[~stored_mask] == 0).all()
    # a plain LoRA merge W + s·BA would fill them
    plain = base.weight.detach() + 5.0 / 3 * ((b @ a) if layout == "linear" else (b @ a).T).detach()
    assert (plain[~stored_mask] != 0).all()


def test_adapters_start_as_the_identity_and_leave_int8_weights_frozen(micro_model_path):
    from lowmem.config import Int8WeightConfig

    x = torch.randint(0, 1000, (1, 12))
    for int8 in (None, Int8WeightConfig()):
        model = micro(micro_model_path, int8=int8)
        prune_model(model, "magnitude", 0.5)
        with torch.no_grad():
            before = model(input_ids=x).logits
        for kind in ("mask_lora", "scale_lora"):
            adapted = micro(micro_model_path, int8=int8)
            prune_model(adapted, "magnitude", 0.5)
            select_trainable(adapted, kind, 4, 8.0)
            with torch.no_grad():  # exactly: B = 0 makes the LoRA term 0; rank 4 makes A = B = 1/2, so BA = 1
                assert torch.equal(adapted(input_ids=x).logits, before), kind
            from lowmem.weights.int8 import trainable_tensors

            names = set(trainable_tensors(adapted))
            assert names and all(n.endswith(("lora_A", "lora_B", "norm.weight", "layernorm.weight")) for n in names)


def test_trainable_fractions_are_counted_by_hand(micro_model_path):
    hidden, vocab, layers = 64, 1024, 2
    norms = (2 * layers + 1) * hidden
    total = sum(p.numel() for p in micro(micro_model_path).parameters())
    assert select_trainable(micro(micro_model_path), "all") == {"trainable": total, "total": total}
    assert select_trainable(micro(micro_model_path), "norms")["trainable"] == norms
    assert select_trainable(micro(micro_model_path), "norms+head")["trainable"] == norms + vocab * hidden
    # per layer: q, k, v, o (64 → 64), gate, up (64 → 128), down (128 → 64); rank r adds r·(in + out) each
    r = 4
    per_layer = 4 * r * (64 + 64) + 3 * r * (64 + 128)
    for kind in ("mask_lora", "scale_lora"):
        counts = select_trainable(micro(micro_model_path), kind, r, 8.0)
        assert counts == {"trainable": norms + layers * per_layer, "total": total}
    # a tied head is the embeddings' tensor, listed once under their name: norms+head trains it all the same
    from lowmem import assets

    tied = micro(str(assets.tiny_model("micro-llama-tied")))
    assert select_trainable(tied, "norms+head")["trainable"] == norms + vocab * hidden
    assert tied.lm_head.weight.requires_grad and tied.lm_head.weight is tied.model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------- retraining


def masks_of(folder):
    from lowmem.model import load_model

    packed = load_file(folder / MASKS_FILE)
    shapes = {n: p.shape for n, p in load_model(str(folder)).named_parameters()}
    return {name: unpack_bits(bits, shapes[name]) for name, bits in packed.items()}


@pytest.mark.parametrize("strategy", list(EVERY_STRATEGY))
@pytest.mark.parametrize("subset", SUBSETS)
def test_pruned_weights_stay_zero_through_retraining_and_export(tmp_path, micro_model_path, text_data, subset,
                                                                strategy):
    config = make_config(tmp_path, micro_model_path, text_data, *EVERY_STRATEGY[strategy], "prune.criterion=magnitude",
                         f"update.trainable={subset}", "train.max_steps=3", "train.eval_every_n_steps=null",
                         *(["lora.rank=4"] if subset.endswith("lora") else []),
                         *(["update.weight_decay=0"] if subset == "scale_lora" else []))
    result = train(config)
    final, last = result.final_dir, result.output_dir / "checkpoint-3"
    masks = masks_of(final)
    assert len(masks) == 14 and all(abs((~m).float().mean() - 0.5) < 0.01 for m in masks.values())
    exported, saved = weights(final), weights(last)
    for name, mask in masks.items():
        assert (exported[name][~mask] == 0).all(), name  # merged: adapters folded in, zeros kept
        assert (saved[name][~mask] == 0).all(), name
    # what was meant to train moved, and only that
    pruned = {k: v.clone() for k, v in initial_pruned(config).items()}
    moved = {k for k in exported if not torch.equal(exported[k], pruned[k])}
    norms = {k for k in exported if k.endswith("norm.weight")}
    expected = {"all": set(exported), "norms": norms, "norms+head": norms | {"lm_head.weight"},
                "mask_lora": norms | set(masks), "scale_lora": norms | set(masks)}[subset]
    # (hift: the trainable units make at most 3 groups of 2, so 3 steps visit every one)
    assert moved == expected, sorted(moved ^ expected)[:4]
    assert result.retraining.fraction <= 1.0


@pytest.mark.parametrize("strategy", ["standard", "fused"])
@pytest.mark.parametrize("rule", ["sgd", "adamw", "adafactor", "adalomo", "lion", "lion8bit"])
def test_every_rule_keeps_the_zeros_of_full_retraining(tmp_path, micro_model_path, text_data, rule, strategy):
    config = make_config(tmp_path, micro_model_path, text_data, f"update.strategy={strategy}", f"update.rule={rule}",
                         "prune.criterion=magnitude", "prune.pattern=4:8", "train.max_steps=2",
                         "train.eval_every_n_steps=null", "update.lion.min_8bit_size=1024")
    result = train(config)
    masks, exported, start = masks_of(result.final_dir), weights(result.final_dir), initial_pruned(config)
    for name, mask in masks.items():
        assert (exported[name][~mask] == 0).all(), name
        assert not torch.equal(exported[name], start[name]), name  # and the kept entries trained


def initial_pruned(config):
    """The weights a run of ``config`` starts retraining from: loaded (int8: quantized) and pruned."""
    from lowmem.weights.int8 import dequantized_state_dict
    from lowmem.model import load_model

    int8 = config.model.int8 if config.model.weight_format == "int8" else None
    model = load_model(config.model.path, config.model.dtype, int8=int8, seed=config.train.seed)
    prune_model(model, config.prune.criterion, config.prune.sparsity, config.prune.pattern)
    return dequantized_state_dict(model)


@pytest.mark.parametrize("overrides,frozen", [
    (["update.trainable=mask_lora", "lora.rank=4", "prune.criterion=wanda", "prune.calibration_batches=2"],
     ["model.embed_tokens.weight", "lm_head.weight"]),
    (["update.trainable=all", "prune.criterion=magnitude", "prune.pattern=2:4", *EVERY_STRATEGY["int8"]], []),
], ids=["mask_lora", "all-int8"])
def test_resume_is_exact(tmp_path, micro_model_path, text_data, overrides, frozen):
    second = assert_resume_is_exact(tmp_path, micro_model_path, text_data, *overrides, frozen=frozen)
    assert (second.output_dir / "checkpoint-4" / MASKS_FILE).is_file()


def test_a_pruned_folder_retrains_with_its_masks(tmp_path, micro_model_path, text_data):
    """lowmem prune's folder as model.path: its masks.safetensors holds the zeros under update.trainable=all."""
    from click.testing import CliRunner

    from lowmem.cli import main

    recipe = tmp_path / "recipe.yaml"
    make_config(tmp_path, micro_model_path, text_data)  # writes recipe.yaml
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", str(recipe), "prune.criterion=wanda", "prune.pattern=4:8",
                                       "prune.calibration_batches=2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # 2 layers of 4 64×64 and 3 64×128 matrices, half of them zero, over those, 2 of 1024×64 and 5 norms of 64
    assert summary["sparsity"] == 0.5
    assert summary["model_sparsity"] == round(40960 / (81920 + 2 * 65536 + 320), 6)
    assert "whole model" in result.output and (out / "prune_report.json").is_file()
    retrained = train(make_config(tmp_path, str(out), text_data, "train.max_steps=3", name="retrain"))
    masks = masks_of(out)
    exported = weights(retrained.final_dir)
    for name, mask in masks.items():
        assert (exported[name][~mask] == 0).all() and (exported[name][mask] != 0).all(), name
    # lowmem eval compares the three on the recipe's held-out split
    result = CliRunner().invoke(main, ["eval", micro_model_path, str(out), str(retrained.final_dir), "--recipe",
                                       str(recipe), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["model"] for r in rows] == [micro_model_path, str(out), str(retrained.final_dir)]
    assert len({r["tokens"] for r in rows}) == 1 and all(r["perplexity"] > 1 for r in rows)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides,message", [
    (["prune.pattern=3:4"], "prune.pattern '3:4' is not one of"),
    (["prune.sparsity=1.5"], "prune.sparsity must be in (0, 1)"),
    (["prune.pattern=2:4", "prune.sparsity=0.3"], "prune.sparsity=0.3 would be ignored"),
    (["prune.criterion=random"], "prune.criterion 'random' is not one of"),
    (["prune.calibration_batches=0"], "prune.calibration_batches must be positive"),
    (["lora.rank=8"], "lora.* is set but update.trainable is all"),
    (["update.trainable=scale_lora", "update.weight_decay=0", "lora.alpha=4"], "scale_lora (W ⊙ BA) has no scale"),
    (["update.trainable=mask_lora", "lora.rank=0"], "lora.rank must be positive"),
    (["update.trainable=some"], "update.trainable 'some' is not one of"),
    (["prune.pattern=2:4"], "prune.pattern is set but prune.criterion is none"),
    (["prune.criterion=magnitude", "prune.calibration_batches=4"], "magnitude pruning reads no data"),
    (["update.trainable=scale_lora", "update.weight_decay=0.01"], "set update.weight_decay=0"),
    (["update.trainable=norms", "update.strategy=hift", "memory.offload_frozen_weights=true"],
     "the frozen matrices belong to none"),
])
def test_bad_prune_and_lora_values_get_one_line_errors(tmp_path, micro_model_path, text_data, overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, micro_model_path, text_data, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unquoted_n_m_pattern_in_yaml_is_read_as_written(tmp_path, micro_model_path, text_data):
    config = make_config(tmp_path, micro_model_path, text_data, "prune.criterion=magnitude",
                         "prune.pattern=2:4")  # YAML's 124
    assert config.prune.pattern == "2:4"


def test_pattern_that_does_not_divide_the_inputs_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(12, 6))
    with pytest.raises(UserError, match=r"^prune.pattern=4:8: 0 has 12 inputs, not a multiple of 8"):
        prune_model(model, "magnitude", 0.5, "4:8")


def test_prune_command_refuses_without_a_criterion(tmp_path, micro_model_path, text_data):
    from click.testing import CliRunner

    from lowmem.cli import main

    make_config(tmp_path, micro_model_path, text_data)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2 and "prune.criterion is none" in result.output


@pytest.mark.parametrize("criterion,pattern", [("magnitude", "unstructured"), ("magnitude", "2:4"),
                                               ("wanda", "unstructured")])
def test_pruning_holds_one_mask_and_one_block_of_scores(micro_model_path, text_data, tokenizer, monkeypatch, criterion,
                                                        pattern):
    # before: a float32 copy of the matrix, its magnitudes and a stable argsort with int64 indices (~20 bytes an
    # entry: ~10 GiB more for Llama-3's 525M-entry head); now the bool mask (1 byte an entry), the packed one (1/8),
    # one block of scores with its temporaries (counted generously at 64 bytes a value), and a whole matrix's
    # threshold's 65536 counts (512 KiB, whatever the matrix's size)
    import lowmem.weights.masks
    import lowmem.perp.prune
    from lowmem.planner.plan import StorageAccountant

    monkeypatch.setattr(lowmem.perp.prune, "CHUNK_VALUES", 1024)
    monkeypatch.setattr(lowmem.weights.masks, "PACK_BLOCK", 1024)
    model = micro(micro_model_path)
    batches = calibration_data(micro_model_path, text_data, tokenizer, n=1) if criterion == "wanda" else None
    accountant = StorageAccountant()
    own = sum(accountant.track(t) for t in [*model.parameters(), *model.buffers()])
    with accountant:
        prune_model(model, criterion, 0.5, pattern, include_head=criterion == "magnitude", calibration=batches)
    largest = max(p.numel() for n, p in model.named_parameters() if "layers." in n or "lm_head" in n)
    masks = sum(-(-p.numel() // 8) for n, p in model.named_parameters() if "layers." in n or "lm_head" in n)
    calibration = 0
    if batches is not None:  # wanda holds one layer's inputs per batch, and a layer's forward of them
        tokens = sum(b["input_ids"].numel() for b in batches)
        calibration = 8 * tokens * model.config.intermediate_size * 4
    counts = 65536 * 8 if (criterion, pattern) == ("magnitude", "unstructured") else 0
    bound = masks + largest * (1 + 1 / 8) + 64 * 1024 + counts + calibration
    assert accountant.peak - own <= bound, (accountant.peak - own, bound)
    if criterion == "magnitude":
        assert 20 * largest > bound  # what sorting the whole head took would not fit


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_magnitude_pruning_of_conv1d_layouts_over_the_whole_matrix(arch_path, int8):
    # GPT-2 stores [in, out]: its output rows are stored columns, read as a transposed view a block at a time
    from lowmem.config import Int8WeightConfig
    from lowmem.model import load_model
    from lowmem.perp.prune import weight_value

    model = load_model(arch_path("gpt2"), "float32", int8=Int8WeightConfig() if int8 else None)
    before = {name: weight_value(layer).abs() for name, layer in [(n, m) for n, m in model.named_modules()
                                                                   if n.endswith(("c_attn", "c_fc"))]}
    masks = prune_model(model, "magnitude", 0.3)
    for name, magnitudes in before.items():
        layer = masks[f"{name}.weight"]
        kept = mask_of(layer)
        assert int((~kept).sum()) == round(0.3 * kept.numel()), name  # one threshold over the whole matrix
        assert magnitudes[~kept].max() <= magnitudes[kept].min()
        assert torch.equal(weight_value(layer) == 0, ~kept | (magnitudes == 0))


def test_wanda_calibration_keeps_no_cache_when_the_model_would(micro_model_path, text_data, tokenizer):
    # prune_model is public: a model loaded elsewhere may have use_cache on; a replayed layer must not append to a
    # cache captured in its recorded arguments (with padding it failed; without, it attended to stale keys)
    model = micro(micro_model_path, dtype="float64")
    model.config.use_cache = True
    batches = calibration_data(micro_model_path, text_data, tokenizer)
    masks = prune_model(model, "wanda", 0.4, calibration=batches)
    expected = reference_wanda(micro(micro_model_path, dtype="float64"), batches, 0.4)
    assert all(torch.equal(mask_of(masks[n]), expected[n]) for n in expected)
