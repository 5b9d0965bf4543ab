"""Every supported architecture under every strategy: tiny random-weight models built from their transformers
configs (no downloads) train a few steps, the held-out loss falls, and the exported folder reloads with the same
loss. README's architecture table is this test's matrix."""

import pytest
from transformers import AutoModelForCausalLM

from lowmem.data import build_datasets, eval_batches
from lowmem.activations.loss import evaluate
from lowmem.model import load_tokenizer
from lowmem.trainer import train
from test_trainer import make_config

MODES = {
    "standard": ["update.strategy=standard", "update.rule=adamw", "update.lr=3e-3"],
    "fused": ["update.strategy=fused", "update.rule=adalomo", "update.lr=5e-2"],
    "hift": ["update.strategy=hift", "hift.group_size=2", "update.rule=adamw", "update.lr=1e-2"],
    "int8": ["model.weight_format=int8", "update.strategy=fused", "update.rule=lion8bit", "update.lr=1e-3",
             "update.lion.min_8bit_size=1024"],
    "bf16-checkpointing": ["model.dtype=bfloat16", "model.gradient_checkpointing=true", "update.strategy=fused",
                           "update.rule=adalomo", "update.lr=5e-2"],
    # PERP: wanda 2:4, then norms, biases and masked adapters (Conv1D layouts, biases, tied heads)
    "perp-mask-lora": ["prune.criterion=wanda", "prune.pattern=2:4", "prune.calibration_batches=2",
                       "update.trainable=mask_lora", "lora.rank=4", "update.rule=adamw", "update.lr=3e-2"],
}
ARCHS = ["llama", "llama-tied", "qwen2", "gpt2", "opt", "qwen3", "mistral", "gemma", "phi3", "gpt-neox"]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_trains_and_its_export_reloads(tmp_path, arch_path, text_data, arch, mode):
    path = arch_path(arch)
    config = make_config(tmp_path, path, text_data, *MODES[mode], "train.max_steps=15", "train.warmup_ratio=0",
                         "data.val_fraction=0.2", "train.eval_max_batches=4", "update.weight_decay=0")
    result = train(config)
    assert result.last_eval["val_loss"] < 0.999 * result.first_eval["val_loss"], (result.first_eval, result.last_eval)
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = load_tokenizer(str(result.final_dir))
    data = build_datasets(config.data, tokenizer, config.train.seed)
    scores = evaluate(reloaded, eval_batches(data.val, config.train.batch_size, tokenizer.pad_token_id, 4), "cpu")
    # exactly: the export holds the very values the run computed with (int8 weights dequantized, adapters merged by the
    # function the forward runs), and the reloaded model runs the same operations on them
    assert scores["val_loss"] == result.last_eval["val_loss"]
    if mode.startswith("perp"):  # the export is merged and keeps every pruned zero, in each layer's own layout
        from safetensors.torch import load_file

        from lowmem.weights.masks import MASKS_FILE, unpack_bits

        state = reloaded.state_dict()
        masks = load_file(result.final_dir / MASKS_FILE)
        assert masks
        for name, bits in masks.items():
            mask = unpack_bits(bits, state[name].shape)
            assert (state[name][~mask] == 0).all() and (~mask).float().mean() == 0.5, name
