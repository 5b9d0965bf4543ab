"""The public API (lowmem.load_model / Update / lm_loss / save_pretrained / plan) and the HF Trainer integration
(lowmem.hf), each against an independent side: the model's own loss, `lowmem train`, an uninterrupted run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

import lowmem
from conftest import write_jsonl
from lowmem.config import load_config
from lowmem.data import BatchStream, build_datasets
from lowmem.errors import ConfigError, UserError
from lowmem.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def batches_of(config, tokenizer, steps: int) -> list[dict]:
    """The micro-batches `lowmem train` runs for ``config``, in its order."""
    data = build_datasets(config.data, tokenizer, config.train.seed)
    stream = BatchStream(data.train, config.train.batch_size, config.train.seed, tokenizer.pad_token_id)
    return [stream.next() for _ in range(steps)]


@pytest.fixture
def recipe(tmp_path, micro_model_path, text_rows):
    data = write_jsonl(tmp_path / "d.jsonl", text_rows)
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {micro_model_path}}}\n"
                    f"data: {{path: {data}, max_seq_len: 32, val_fraction: 0}}\n"
                    "update: {strategy: fused, rule: adalomo, lr: 0.01, clip_grad_norm: null}\n"
                    "train: {batch_size: 2, max_steps: 4, seed: 3, lr_schedule: cosine, device: cpu}\n"
                    f"checkpoint: {{output_dir: {tmp_path / 'run'}}}\nlog: {{progress: false}}\n")
    return path


@pytest.fixture
def text_rows():
    return [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}  # a line of python number {i}"} for i in range(24)]


class Sequential:
    """A Trainer that takes its train dataset in order: one pre-collated batch per item."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def hf_trainer(model, tokenizer, batches, out: Path, update: dict, **arguments):
    from transformers import TrainingArguments

    from lowmem.hf import LowmemTrainer

    cls = type("SequentialLowmemTrainer", (Sequential, LowmemTrainer), {})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, report_to=[], use_cpu=True,
                             logging_steps=1, **{"save_strategy": "no", "max_grad_norm": 0, **arguments})
    return cls(model=model, args=args, train_dataset=batches, processing_class=tokenizer, update=update,
               data_collator=lambda items: items[0])


def test_lm_loss_is_the_models_own_loss(micro_model_path, tokenizer):
    model = lowmem.load_model(micro_model_path, device="cpu")
    encoded = tokenizer(["def add(a, b):\n    return a + b", "x = 1"], padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    batch = {**encoded, "labels": labels}
    ours = lowmem.lm_loss(model, batch)
    theirs = model(**batch).loss  # transformers' own shift and mean over the label tokens
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lowmem.lm_loss(model, batch, chunk_tokens=3), theirs, rtol=1e-6, atol=1e-6)


def test_update_refuses_what_it_cannot_do(micro_model_path):
    model = lowmem.load_model(micro_model_path, device="cpu")
    with pytest.raises(ConfigError, match=r"unknown key 'update.lrr' \(did you mean 'update.lr'\?\)"):
        lowmem.Update(model, rule="adamw", lrr=1e-3)
    with pytest.raises(ConfigError, match="update.rule 'adamww' is not known"):
        lowmem.Update(model, rule="adamww")
    update = lowmem.Update(model, rule="sgd", strategy="fused", lr=0.1)
    ids = torch.randint(0, 100, (1, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    update.backward(lowmem.lm_loss(model, batch))
    with pytest.raises(UserError, match="keeps none to accumulate"):
        update.backward(lowmem.lm_loss(model, batch))
    with pytest.raises(UserError, match="already has a lowmem Update; call its remove"):
        lowmem.Update(model, rule="sgd", strategy="fused", lr=0.1)
    # dropped without remove(): its fused hooks go with it, so the model no longer trains behind a new update's back
    del update
    import gc

    gc.collect()
    before = [p.detach().clone() for p in model.parameters()]
    lowmem.lm_loss(model, batch).backward()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    lowmem.Update(model, rule="sgd", strategy="fused", lr=0.1)


def test_own_loop_resumes_exactly_from_the_update_state(micro_model_path, recipe, tokenizer):
    config = load_config(recipe)
    batches = batches_of(config, tokenizer, 4)

    def run(steps, state=None, weights=micro_model_path):
        model = lowmem.load_model(weights, device="cpu")
        update = lowmem.Update(model, rule="adamw", strategy="standard", lr=1e-3)
        if state is not None:
            update.load_state_dict(state)
        for batch in steps:
            update.backward(lowmem.lm_loss(model, batch))
            update.step()
        return model, update

    whole, _ = run(batches)
    first, update = run(batches[:2])
    saved = Path(recipe).parent / "half"
    lowmem.save_pretrained(first, saved, tokenizer)
    resumed, _ = run(batches[2:], {k: v.clone() for k, v in update.state_dict().items()}, str(saved))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_hf_trainer_with_fused_adalomo_trains_as_lowmem_train(micro_model_path, recipe, tokenizer, tmp_path):
    config = load_config(recipe)
    train(config)
    reference = lowmem.load_model(str(tmp_path / "run" / "final"), device="cpu")
    model = lowmem.load_model(micro_model_path, device="cpu")
    trainer = hf_trainer(model, tokenizer, batches_of(config, tokenizer, 4), tmp_path / "hf",
                         {"rule": "adalomo", "strategy": "fused"}, max_steps=4, learning_rate=0.01,
                         lr_scheduler_type="cosine", seed=3)
    trainer.train()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_hf_trainer_resumes_exactly_from_its_checkpoint(micro_model_path, recipe, tokenizer, tmp_path):
    config = load_config(recipe)
    batches = batches_of(config, tokenizer, 4)
    common = dict(max_steps=4, learning_rate=0.01, lr_scheduler_type="cosine", seed=3)
    whole = lowmem.load_model(micro_model_path, device="cpu")
    hf_trainer(whole, tokenizer, batches, tmp_path / "whole", {"rule": "adalomo", "strategy": "fused"},
               **common).train()
    first = lowmem.load_model(micro_model_path, device="cpu")
    hf_trainer(first, tokenizer, batches, tmp_path / "a", {"rule": "adalomo", "strategy": "fused"},
               save_strategy="steps", save_steps=2, **common).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "lowmem_update.safetensors").is_file()
    resumed = lowmem.load_model(micro_model_path, device="cpu")  # its weights come from the checkpoint
    hf_trainer(resumed, tokenizer, batches, tmp_path / "b", {"rule": "adalomo", "strategy": "fused"},
               **common).train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_hf_trainer_resumes_int8_weights_exactly_and_logs_grad_norm(micro_model_path, recipe, tokenizer, tmp_path):
    config = load_config(recipe)
    batches = batches_of(config, tokenizer, 4)
    common = dict(max_steps=4, learning_rate=0.01, lr_scheduler_type="cosine", seed=3, max_grad_norm=1.0)
    update = {"rule": "adalomo", "strategy": "fused"}

    def int8_model():
        return lowmem.load_model(micro_model_path, device="cpu", weight_format="int8", refresh_every=3)

    whole = int8_model()
    trainer = hf_trainer(whole, tokenizer, batches, tmp_path / "whole", update, **common)
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == 4 and all(n > 0 for n in norms)
    assert norms[-1] == pytest.approx(float(trainer.lowmem_optimizer.last_stats["grad_norm"]))
    hf_trainer(int8_model(), tokenizer, batches, tmp_path / "a", update, save_strategy="steps", save_steps=2,
               **common).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "weights_int8.safetensors").is_file()
    resumed = int8_model()
    hf_trainer(resumed, tokenizer, batches, tmp_path / "b", update, **common).train(
        resume_from_checkpoint=str(checkpoint))
    from lowmem.weights.int8 import int8_state_dict

    a, b = int8_state_dict(whole), int8_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (name, x), y in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)
    # a checkpoint with masks the model lacks (pruned in another process) is refused, naming how to load them
    lowmem.prune(pruned := lowmem.load_model(micro_model_path, device="cpu"), criterion="magnitude", pattern="2:4")
    lowmem.save_pretrained(pruned, tmp_path / "masked")
    with pytest.raises(UserError, match="holds sparsity masks the model does not have .*lowmem.load_model"):
        hf_trainer(lowmem.load_model(micro_model_path, device="cpu"), tokenizer, batches, tmp_path / "c",
                   {"rule": "adalomo"}, **common).train(resume_from_checkpoint=str(tmp_path / "masked"))


def test_hf_trainer_refuses_accumulation_under_fused_and_duplicated_knobs(micro_model_path, tokenizer, tmp_path):
    model = lowmem.load_model(micro_model_path, device="cpu")
    with pytest.raises(UserError, match="gradient_accumulation_steps is 2, but a fused update"):
        hf_trainer(model, tokenizer, [], tmp_path, {"rule": "adalomo", "strategy": "fused"}, max_steps=1,
                   gradient_accumulation_steps=2)
    with pytest.raises(UserError, match=r"update\['lr'\] comes from TrainingArguments.learning_rate"):
        hf_trainer(model, tokenizer, [], tmp_path, {"rule": "adalomo", "lr": 1.0}, max_steps=1)
    with pytest.raises(UserError, match="fp16/bf16 in TrainingArguments turn on mixed precision"):
        hf_trainer(model, tokenizer, [], tmp_path, {"rule": "adalomo"}, max_steps=1, bf16=True)


def test_save_pretrained_writes_int8_weights_dequantized(micro_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lowmem.load_model(micro_model_path, device="cpu", weight_format="int8", outlier_fraction=0.0)
    folder = lowmem.save_pretrained(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="model.int8.outlier_fraction must be in"):
        lowmem.load_model(micro_model_path, weight_format="int8", outlier_fraction=0.9)


def test_plan_from_python_counts_what_the_cli_counts(micro_model_path):
    plan = lowmem.plan(micro_model_path, rule="adalomo", strategy="fused", batch_size=2, seq_len=32,
                       dtype="float32", target="cpu")
    assert plan.device_bytes > 0 and plan.fits(plan.device_bytes) and not plan.fits(plan.device_bytes - 1)


@pytest.mark.parametrize("example", ["own_loop.py", "hf_trainer.py", "trl_sft.py"])
def test_examples_run_and_their_loss_falls(example, tmp_path):
    import subprocess

    if example == "trl_sft.py":
        pytest.importorskip("trl")  # optional (in the dev extra, so CI runs it)

    done = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--steps", "20", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loss_last"] < result["loss_first"] - 0.5, result
    assert (tmp_path / "out" / ("config.json" if example == "own_loop.py" else "final/config.json")).is_file()


def test_moved_modules_still_import_by_their_old_names():
    import importlib

    sys.modules.pop("lowmem.residency", None)
    with pytest.warns(DeprecationWarning, match="lowmem.residency moved to lowmem.placement.residency"):
        old = importlib.import_module("lowmem.residency")
    assert old is importlib.import_module("lowmem.placement.residency")
    assert old.__spec__.name == "lowmem.placement.residency"
    with pytest.raises(ImportError, match="moved to lowmem.planner.plan"):
        importlib.import_module("lowmem.plan")
    with pytest.raises(ImportError, match="moved to lowmem.perp.prune"):
        importlib.import_module("lowmem.prune")
    assert callable(lowmem.plan) and callable(lowmem.prune)  # still the API functions


def test_prune_keeps_the_largest_two_of_four_and_updates_keep_the_zeros(micro_model_path, tmp_path):
    model = lowmem.load_model(micro_model_path, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
              and "lm_head" not in n}
    report = lowmem.prune(model, criterion="magnitude", pattern="2:4")
    assert report.sparsity == pytest.approx(0.5)
    params = dict(model.named_parameters())
    for name, weight in before.items():  # independent: the two largest |W| of each group of 4 inputs survive
        groups = weight.abs().reshape(weight.shape[0], -1, 4)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        assert torch.equal(params[name].detach() != 0, kept.reshape(weight.shape)), name
    update = lowmem.Update(model, rule="adamw", lr=1e-2)
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(2):
        update.backward(lowmem.lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                               "labels": ids}))
        update.step()
    saved = lowmem.load_model(str(lowmem.save_pretrained(model, tmp_path / "pruned")), device="cpu")
    update.remove()  # one live update per model
    for name in before:
        assert (dict(saved.named_parameters())[name] == 0).float().mean() == 0.5, name
    from lowmem.weights.masks import masks_state_dict

    masks, reloaded = masks_state_dict(model), masks_state_dict(saved)  # load_model attaches the saved masks
    assert masks.keys() == reloaded.keys() and all(torch.equal(masks[k], reloaded[k]) for k in masks)
    adapted = lowmem.Update(model, rule="adamw", lr=1e-2, trainable="mask_lora", lora={"rank": 2})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n or "norm" in n for n in trainable), trainable  # adapters and norms only
    adapted.remove()
    with pytest.raises(ConfigError, match="prune.pattern '3:4' is not one of"):
        lowmem.prune(model, criterion="magnitude", pattern="3:4")


def test_eliminate_tokens_keeping_every_block_is_the_dense_model(micro_model_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4)).train()
    ids = torch.randint(0, 128, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    dense = lowmem.lm_loss(model, batch)
    everything = lowmem.eliminate_tokens(model, keep_ratio=1.0, dense_layers=1, block_size=8)
    everything.start_step(0)
    torch.testing.assert_close(lowmem.lm_loss(model, batch), dense, rtol=1e-6, atol=1e-6)
    everything.remove()
    sparse = lowmem.eliminate_tokens(model, keep_ratio=0.25, dense_layers=1, block_size=8)
    sparse.start_step(0)
    assert not torch.allclose(lowmem.lm_loss(model, batch), dense)  # layers 1-2 ran on a quarter of the blocks
    sparse.remove()
    torch.testing.assert_close(lowmem.lm_loss(model, batch), dense, rtol=0, atol=0)
