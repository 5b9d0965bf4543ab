"""The memory planner (lowmem/planner/plan.py, ``lowmem plan``, ``memory.budget_gb``): the storage accountant against
hand counts; the simulated peak against a real CPU run of the same steps for every strategy × rule and each
memory technique; the CLI's exit codes and its one line; the trainer's refusal; the shipped model configs."""

import json

import pytest
import torch
from click.testing import CliRunner

from lowmem.cli import main
from lowmem.errors import UserError
from lowmem.planner.plan import StorageAccountant, parse_bytes, simulate
from test_trainer import make_config

CASES = {
    "standard-adamw": ["update.strategy=standard", "update.rule=adamw"],
    "standard-sgd": ["update.strategy=standard", "update.rule=sgd"],
    "standard-lion": ["update.strategy=standard", "update.rule=lion"],
    "fused-sgd": ["update.strategy=fused", "update.rule=sgd"],
    "fused-adalomo": ["update.strategy=fused", "update.rule=adalomo"],
    "fused-adafactor": ["update.strategy=fused", "update.rule=adafactor"],
    "fused-lion8bit": ["update.strategy=fused", "update.rule=lion8bit"],
    "fused-adamw-two-pass": ["update.strategy=fused", "update.rule=adamw", "update.clip_mode=two_pass"],
    "hift-adamw": ["update.strategy=hift", "update.rule=adamw", "hift.group_size=2"],
    "hift-adafactor": ["update.strategy=hift", "update.rule=adafactor", "hift.group_size=1"],
    "int8-lion8bit": ["model.weight_format=int8", "update.strategy=fused", "update.rule=lion8bit"],
    "int8-head-chunked": ["model.weight_format=int8", "model.int8.include_head=true", "memory.loss_chunk_tokens=16",
                          "update.strategy=fused", "update.rule=adalomo"],
    "checkpointing": ["model.gradient_checkpointing=true", "update.strategy=fused", "update.rule=adalomo"],
    "chunked-loss": ["memory.loss_chunk_tokens=16"],
    "tokens": ["tokens.eliminate=true", "tokens.dense_layers=0", "tokens.block_size=16"],
    "tokens-predictor": ["tokens.eliminate=true", "tokens.dense_layers=0", "tokens.block_size=16",
                         "tokens.predictor=true", "tokens.refresh_every=2"],
    "bf16-accumulation": ["model.dtype=bfloat16", "train.gradient_accumulation_steps=2"],
    "pruned-all-fused": ["prune.criterion=magnitude", "update.strategy=fused", "update.rule=adalomo"],
    "mask-lora": ["prune.criterion=magnitude", "update.trainable=mask_lora", "lora.rank=4"],
    "wanda-head-2:4": ["prune.criterion=wanda", "prune.pattern=2:4", "prune.calibration_batches=2",
                       "prune.include_head=true"],
    "mask-lora-derived": ["update.trainable=mask_lora", "lora.rank=4"],  # no stored mask: W ≠ 0
    "scale-lora-int8": ["model.weight_format=int8", "update.trainable=scale_lora", "lora.rank=4",
                        "update.weight_decay=0"],
    "norms": ["update.trainable=norms"],
}


def test_the_accountant_counts_live_storages_once_and_keeps_the_peak():
    kept = torch.empty(2000)  # 8000 bytes, made before
    accountant = StorageAccountant()
    accountant.track(kept)
    with accountant:
        a = torch.empty(1000)  # 4000
        view = a.view(10, 100)[1:]  # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000
        del a
        assert accountant.current == 16000  # the view keeps a's storage alive
        del view
        c = torch.empty(250, dtype=torch.int16)  # 500
    assert accountant.peak == 16000 and accountant.current == 12500
    assert accountant.largest_made == 4000  # a and b; not kept (tracked, not made) nor the view
    del b, c
    assert accountant.current == 8000


def trainer_peak(config, monkeypatch) -> int:
    """The peak live bytes of ``lowmem.trainer.train(config)``'s training steps, counted by the planner's own
    accountant: every weight, buffer and cached constant from the moment the model is loaded, then every storage the
    steps read or make (the step guard wraps each step's work, batch transfer to update)."""
    import lowmem.trainer
    from lowmem.placement.tensor_cache import cached_tensors

    accountant = StorageAccountant(inputs=True)
    load = lowmem.trainer.load_model

    def counted_load(*args, **kwargs):
        model = load(*args, **kwargs)
        for tensor in [*model.parameters(), *model.buffers(), *cached_tensors()]:
            accountant.track(tensor, "weights")
        return model

    monkeypatch.setattr(lowmem.trainer, "load_model", counted_load)
    lowmem.trainer.train(config, step_guard=lambda: accountant)
    monkeypatch.setattr(lowmem.trainer, "load_model", load)
    return accountant.peak


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_the_simulated_peak_equals_the_trainers_of_the_same_steps(tmp_path, micro_model_path, text_data, case,
                                                                  monkeypatch):
    # byte for byte: the plan runs the trainer's own objects on fake tensors, and holds what its loop holds (every
    # micro-batch of a step, the step's loss and stats, the model's cached constants); a gap between what the planner
    # builds and what the trainer builds (a pruned folder's masks, once) fails here
    config = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "train.max_steps=3", *case)
    planned = simulate(config, steps=3)
    assert planned.counted_bytes == trainer_peak(config, monkeypatch)


def test_components_are_where_the_rule_and_strategy_put_them(tmp_path, micro_model_path, text_data):
    # standard AdamW with two micro-batches: the peak holds weights, a full gradient set and two moments
    config = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "update.rule=adamw",
                         "train.gradient_accumulation_steps=2")
    plan = simulate(config, steps=2)
    weights = plan.device["weights float32"]
    from lowmem.model import load_model

    n_tensors = len(list(load_model(micro_model_path).parameters()))
    # every float32 gradient, as big as its weight; two moments and a float32 step count per tensor. The accountant
    # splits the peak into components at a moment within 0.1% of it (StorageAccountant), so to that resolution.
    resolution = 0.001 * plan.counted_bytes
    assert abs(plan.device["gradients"] - weights) <= resolution
    assert abs(plan.device["rule state"] - (2 * weights + 4 * n_tensors)) <= resolution
    fused = simulate(make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64",
                                 "update.strategy=fused", "update.rule=adalomo"), steps=2)
    assert "gradients" not in fused.device and fused.device["rule state"] < 0.05 * weights


def test_plan_exits_0_when_it_fits_and_3_with_a_change_that_fits_when_not(tmp_path, micro_model_path, text_data):
    recipe = tmp_path / "recipe.yaml"
    make_config(tmp_path, micro_model_path, text_data)  # writes recipe.yaml
    args = ["plan", str(recipe), "data.max_seq_len=64", "update.rule=adamw", "--device", "cpu"]
    fits = CliRunner().invoke(main, [*args, "--budget", "1GB"])
    assert fits.exit_code == 0, fits.output
    assert "weights float32" in fits.output and "rule state" in fits.output and "fits:" in fits.output
    needed = simulate(make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "update.rule=adamw"),
                      target="cpu").device_bytes
    budget = int(needed * 0.9)
    over = CliRunner().invoke(main, [*args, "--budget", f"{budget / 2**20:.3f}MB"])
    assert over.exit_code == 3, over.output
    lines = [line for line in over.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "over the" in lines[0] and "fits with" in lines[0], over.stderr
    change = lines[0].split("fits with ", 1)[1].split()
    smaller = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "update.rule=adamw", *change)
    assert simulate(smaller, target="cpu").device_bytes <= budget
    hopeless = CliRunner().invoke(main, [*args, "--budget", "1MB"])
    assert hopeless.exit_code == 3 and "no single change" in hopeless.stderr
    bad = CliRunner().invoke(main, [*args, "--budget", "lots"])
    assert bad.exit_code == 2 and "budget 'lots' is not a size" in bad.stderr


def test_parse_bytes():
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == parse_bytes("24") == 24 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(UserError, match="must be positive"):
        parse_bytes("0GB")


def test_training_refuses_a_run_over_its_budget_before_loading(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    with pytest.raises(UserError, match=r"memory.budget_gb: plan: needs .* over the 0.00 GiB budget"):
        train(make_config(tmp_path, micro_model_path, text_data, "memory.budget_gb=0.0001", "train.device=cpu"))
    assert not (tmp_path / "run" / "final").exists()
    result = train(make_config(tmp_path, micro_model_path, text_data, "memory.budget_gb=auto", "train.max_steps=1",
                               "train.device=cpu"))
    assert result.final_dir.exists()


@pytest.mark.parametrize("name,billions", [("llama-3.2-1b", 1.236), ("llama-2-7b", 6.738), ("llama-3.1-8b", 8.030), ("qwen2.5-7b", 7.616), ("qwen2.5-14b", 14.770),
                                           ("mistral-7b", 7.248), ("llama-2-13b", 13.016), ("llama-3.1-70b", 70.554)])
def test_shipped_model_configs_have_the_published_sizes(name, billions):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem import assets

    config = AutoConfig.from_pretrained(assets.resolve(f"lowmem:{name}"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)


def test_fit_picks_a_plan_under_a_small_budget_and_a_real_run_of_it_stays_under(tmp_path, micro_model_path,
                                                                                 text_data, monkeypatch):
    from lowmem.config import load_config

    recipe = tmp_path / "recipe.yaml"
    args = ["data.max_seq_len=64", "update.rule=adamw", "update.strategy=standard", "train.batch_size=1"]
    config = make_config(tmp_path, micro_model_path, text_data, *args)
    needed = simulate(config, target="cpu").device_bytes
    budget = int(needed * 0.6)  # standard AdamW does not fit; leaner plans do
    out = tmp_path / "fit.yaml"
    result = CliRunner().invoke(main, ["plan", str(recipe), *args, "--fit", "--budget", f"{budget / 2**20:.4f}MB",
                                       "--device", "cpu", "--write", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and out.exists()
    chosen = load_config(out)
    assert (chosen.update.strategy, chosen.update.rule) != ("standard", "adamw") or chosen.model.gradient_checkpointing
    assert trainer_peak(chosen, monkeypatch) <= budget  # the written recipe, trained and counted, fits
    nothing = CliRunner().invoke(main, ["plan", str(recipe), *args, "--fit", "--budget", "1MB", "--device", "cpu",
                                        "--write", str(tmp_path / "none.yaml")])
    assert nothing.exit_code == 3 and "no plan fits" in nothing.stderr


def test_the_bitsandbytes_8bit_adamw_baseline_plans_as_it_runs(tmp_path, micro_model_path, text_data):
    pytest.importorskip("bitsandbytes")
    config = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64")
    planned = simulate(config, steps=2, peer="bnb-adamw8bit")
    real = simulate(config, steps=2, fake=False, peer="bnb-adamw8bit")
    assert planned.device == real.device
    # two uint8 moments per value of the large tensors, float32 for those under bitsandbytes' 4096-value threshold
    from lowmem.model import load_model

    params = list(load_model(micro_model_path).parameters())
    expected = sum(2 * p.numel() + 8 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel() for p in params)
    assert abs(planned.device["rule state"] - expected) <= 0.001 * planned.counted_bytes  # the split's resolution


def test_counted_flops_include_attention_and_recomputation(tmp_path, micro_model_path, text_data):
    from torch.utils.flop_counter import FlopCounterMode

    from lowmem.model import load_model
    from lowmem.planner.plan import _register_cpu_attention_flops

    args = ["data.max_seq_len=64", "update.strategy=fused", "update.rule=adalomo"]
    flops = simulate(make_config(tmp_path, micro_model_path, text_data, *args), steps=1, target="cpu",
                     count_flops=True).flops_per_step
    n = sum(p.numel() for p in load_model(micro_model_path).parameters())
    assert flops > 0.5 * 6 * n * 2 * 64  # forward + backward of every matrix: roughly 6 × parameters × tokens
    recomputed = simulate(make_config(tmp_path, micro_model_path, text_data, *args, "model.gradient_checkpointing=true"),
                          steps=1, target="cpu", count_flops=True).flops_per_step
    assert recomputed > flops  # the layers' forward runs again in backward
    _register_cpu_attention_flops()
    q = torch.randn(1, 2, 32, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == 4 * 1 * 2 * 32 * 32 * 8  # QKᵀ and PV: 2 × 2·s²·d per head


def test_a_pruned_folder_is_planned_with_its_masks(tmp_path, micro_model_path, text_data, monkeypatch):
    # lowmem prune's folder carries masks.safetensors, which the trainer loads and holds whatever update.trainable is:
    # 1 bit per entry of every pruned matrix (0.8 GiB at 8B, once missing from the plan and the budget check)
    from lowmem.weights.masks import MASKS_FILE
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    make_config(tmp_path, micro_model_path, text_data)  # writes recipe.yaml
    out = tmp_path / "pruned"
    pruned = CliRunner().invoke(main, ["prune", str(recipe), "prune.criterion=magnitude", "prune.sparsity=0.5",
                                       "--output", str(out)])
    assert pruned.exit_code == 0, pruned.output
    packed = sum(t.numel() for t in load_file(out / MASKS_FILE).values())
    config = make_config(tmp_path, str(out), text_data, "data.max_seq_len=64", "train.max_steps=2")
    plan = simulate(config, steps=2)
    assert plan.device["sparsity masks"] == packed
    assert plan.counted_bytes == trainer_peak(config, monkeypatch)  # as the trainer holds them
    shown = CliRunner().invoke(main, ["plan", str(recipe), f"model.path={out}", "--device", "cpu"])
    assert shown.exit_code == 0 and "sparsity masks" in shown.output, shown.output


def test_int8_weights_streamed_for_their_forward_are_planned_in_flight(tmp_path, micro_model_path, text_data):
    # an int8 weight's codes, scales and outliers are buffers: counting parameters only planned ~0 bytes in flight
    from lowmem.weights.int8 import Int8Weight

    config = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "model.weight_format=int8",
                         "update.strategy=hift", "update.rule=lion8bit", "memory.offload_frozen_weights=true",
                         "hift.order=top_down")
    plan = simulate(config)
    in_flight = next(v for k, v in plan.modeled.items() if k.startswith("streamed frozen weights"))
    from lowmem.weights.int8 import quantize_model
    from lowmem.model import load_model

    model = load_model(micro_model_path)
    quantize_model(model)
    layer = model.model.layers[0]
    assert any(isinstance(m, Int8Weight) for m in layer.modules())
    one = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    embeddings = model.model.embed_tokens.weight.numel() * 4
    # the largest two that ever stream: the float embeddings and one int8 decoder layer (the head, at the top, never)
    assert in_flight == embeddings + one


def test_a_prune_recipe_is_planned_with_its_pruning(tmp_path, micro_model_path, text_data):
    # pruning runs on the device before the first step (lowmem prune, and a train recipe with prune.criterion): the
    # plan runs it too, wanda's layer-by-layer calibration included; steps=0 plans the pruning alone
    config = make_config(tmp_path, micro_model_path, text_data, "data.max_seq_len=64", "prune.criterion=wanda",
                         "prune.calibration_batches=3", "prune.include_head=true")
    planned = simulate(config, steps=0)
    real = simulate(config, steps=0, fake=False)
    assert planned.device == real.device and "pruning" in planned.device


def test_lowmem_prune_refuses_a_budget_its_pruning_does_not_fit(tmp_path, micro_model_path, text_data):
    recipe = tmp_path / "recipe.yaml"
    make_config(tmp_path, micro_model_path, text_data)
    args = ["prune", str(recipe), "prune.criterion=magnitude", "train.device=cpu", "--output", str(tmp_path / "p")]
    refused = CliRunner().invoke(main, [*args, "memory.budget_gb=0.0001"])
    assert refused.exit_code == 2 and "memory.budget_gb: pruning needs" in refused.stderr, refused.output
    assert not (tmp_path / "p").exists()
    assert CliRunner().invoke(main, [*args, "memory.budget_gb=1"]).exit_code == 0


FIT_CANDIDATES = {
    "fused-adalomo": ["update.strategy=fused", "update.rule=adalomo"],
    "int8": ["update.strategy=fused", "update.rule=adalomo", "model.weight_format=int8"],
    "hift-offload": ["update.strategy=hift", "update.rule=adamw", "memory.offload_states=true",
                     "memory.offload_frozen_weights=true", "hift.group_size=2"],
    "tokens": ["update.strategy=fused", "update.rule=adalomo", "tokens.eliminate=true", "tokens.dense_layers=0",
               "tokens.block_size=16", "tokens.predictor=true"],
}


def test_each_candidate_is_planned_as_it_would_be_alone(tmp_path, micro_model_path, text_data):
    # --fit plans candidates one after another in one process and counts their FLOPs: each plan must equal the same
    # plan made alone, in a fresh process, without counting FLOPs (lowmem plan). torch's FlopCounterMode, which
    # decomposes ops and tracks modules, once planned HiFT at 1B 2.3× above its plan and AdaLomo at 8B 19.05 GiB for
    # 15.14; each plan also counted the cached constants only when it was the first in its process.
    import subprocess
    import sys

    common = ["data.max_seq_len=64", "model.gradient_checkpointing=true", "memory.loss_chunk_tokens=16"]
    configs = {name: make_config(tmp_path, micro_model_path, text_data, *common, *args)
               for name, args in FIT_CANDIDATES.items()}
    in_sequence = {name: simulate(config, count_flops=True) for name, config in configs.items()}
    again = simulate(configs["fused-adalomo"], count_flops=True)
    assert again.device == in_sequence["fused-adalomo"].device and again.modeled == in_sequence["fused-adalomo"].modeled
    for name, config in configs.items():
        alone = simulate(config)
        assert alone.device == in_sequence[name].device and alone.modeled == in_sequence[name].modeled, name
    script = ("import json, sys; from lowmem.config import load_config; from lowmem.planner.plan import simulate; "
              "p = simulate(load_config(sys.argv[1], sys.argv[2:])); print(json.dumps([p.device, p.modeled]))")
    fresh = subprocess.run([sys.executable, "-c", script, str(tmp_path / "recipe.yaml"), *common,
                            *FIT_CANDIDATES["hift-offload"]], capture_output=True, text=True, check=True)
    device, modeled = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert device == in_sequence["hift-offload"].device and modeled == in_sequence["hift-offload"].modeled


def test_fit_finds_the_least_saving_level_that_fits_when_a_level_saves_less_than_the_one_before(
        tmp_path, micro_model_path, text_data, monkeypatch):
    # token elimination under checkpointing saves nothing and costs bookkeeping: a ladder need not be monotone, and a
    # binary search over it (lowmem until 2026-12-05) skipped the level that fits here and chose the last one
    import lowmem.planner.plan as plan

    sizes = [10, 5, 9, 9, 9, 3]  # GiB at each level; level 1 is the least saving one under 6 GiB
    monkeypatch.setattr(plan, "families", lambda config: [["update.strategy=fused", "update.rule=adalomo"]])
    monkeypatch.setattr(plan, "savings_ladder", lambda config: [[f"train.seed={i}"] for i in range(len(sizes))])

    def planned(config, **kwargs):
        return plan.Plan(device={"weights": sizes[config.train.seed] * plan.GiB}, modeled={}, host={}, steps=1,
                         seconds=0.0, flops_per_step=1.0)

    monkeypatch.setattr(plan, "simulate", planned)
    config = make_config(tmp_path, micro_model_path, text_data)
    [chosen] = plan.fit(config, 6 * plan.GiB)
    assert "train.seed=1" in chosen.overrides


def test_the_one_line_suggestion_tries_int8_weights_with_the_recipes_own_rule(tmp_path, micro_model_path, text_data):
    # a fused AdaLomo recipe that int8 weights alone make fit (Gemma-2-9B at 24 GB: 27.3 GiB, 20.25 with int8); the
    # suggestion tried int8 only together with lion8bit, a change of rule the recipe did not ask for
    from lowmem.planner.plan import suggestion_line

    args = ["data.max_seq_len=64", "update.strategy=fused", "update.rule=adalomo", "model.gradient_checkpointing=true",
            "memory.loss_chunk_tokens=16"]
    config = make_config(tmp_path, micro_model_path, text_data, *args)
    plan = simulate(config, target="cpu")
    with_int8 = simulate(make_config(tmp_path, micro_model_path, text_data, *args, "model.weight_format=int8"),
                         target="cpu")
    assert with_int8.device_bytes < plan.device_bytes
    line = suggestion_line(config, plan, with_int8.device_bytes, target="cpu")
    assert line.endswith("fits with model.weight_format=int8"), line
