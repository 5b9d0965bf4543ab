"""Lion (Chen et al. 2023) and QFT's Lion with an int8 momentum (Li et al. 2023).

    c = β₁·m + (1−β₁)·g;   θ ← θ·(1 − lr·wd) − lr·sign(c);   m ← β₂·m + (1−β₂)·g

Sign updates are robust to quantization error, which is why QFT stores the momentum in 8 bits: uint8
codes of the signed dynamic map, one float32 absmax per block of 256 (1 + 4/256 ≈ 1.016 bytes per
parameter), requantized to the nearest code keeping each value's sign. Tensors under ``min_8bit_size``
elements and embeddings keep float32 state (4 bytes per parameter), as in QFT and bitsandbytes.
Lion's lr is typically 3–10× smaller than AdamW's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.ops.quant import BLOCKSIZE
from lowmem.ops.update import lion8bit_update_, lion_update_, math_dtype

EMBEDDING_NAMES = ("embed", "wte", "wpe")


@dataclass
class Lion:
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    quantize: bool = False
    min_8bit_size: int = 4096
    quantize_embeddings: bool = False
    name: str = "lion"
    blocksize: int = BLOCKSIZE  # momentum values per absmax
    code: torch.Tensor | None = None  # the momentum's 256-entry code map (None: the signed dynamic map)

    @classmethod
    def from_config(cls, update) -> "Lion":
        c = update.lion
        return cls(beta1=c.beta1, beta2=c.beta2, weight_decay=update.weight_decay, quantize=update.rule == "lion8bit",
                   min_8bit_size=c.min_8bit_size, quantize_embeddings=c.quantize_embeddings, name=update.rule)

    def quantized(self, param: torch.Tensor, name: str) -> bool:
        if not self.quantize or param.numel() < self.min_8bit_size:
            return False
        return self.quantize_embeddings or not any(key in name for key in EMBEDDING_NAMES)

    def init_state(self, param: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        if self.quantized(param, name):
            n_blocks = -(-param.numel() // self.blocksize)
            return {"exp_avg_codes": torch.full((param.numel(),), 127, dtype=torch.uint8, device=param.device),
                    "exp_avg_absmax": torch.zeros(n_blocks, dtype=torch.float32, device=param.device)}
        return {"exp_avg": torch.zeros(param.shape, dtype=math_dtype(param.dtype), device=param.device)}

    def init_state_sharded(self, param, name: str = "") -> dict[str, torch.Tensor]:
        """The state of this rank's row shard of the DTensor ``param`` (FSDP2, ``lowmem.distributed``): quantized or
        not as the whole tensor is. A matrix's blocks are cut along its rows, so they are one process's blocks when a
        row is a whole number of blocks (every Llama, Qwen or Mistral matrix: 4096, 14336 columns): its codes are kept
        as [rows, columns] and its absmax as [rows, columns / blocksize], both sharded by rows as the weight is. A
        vector (a norm's weight) keeps a float32 momentum, which its shards cut nowhere."""
        shard = param.to_local()
        if self.quantized(param, name) and param.dim() == 2:
            check_whole_blocks(self, name, param)
            rows, cols = shard.shape
            return {"exp_avg_codes": torch.full((rows, cols), 127, dtype=torch.uint8, device=shard.device),
                    "exp_avg_absmax": torch.zeros((rows, cols // self.blocksize), dtype=torch.float32,
                                                  device=shard.device)}
        return {"exp_avg": torch.zeros(shard.shape, dtype=math_dtype(shard.dtype), device=shard.device)}

    def _code_on(self, device: torch.device) -> torch.Tensor:
        """The custom code map on ``device``, uploaded once (a copy per update would synchronize each time)."""
        if self.code.device != device:
            from lowmem.placement.host_sync import upload

            self.code = upload(self.code, device, "lion8bit code map")
        return self.code

    @torch.no_grad()
    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor = 1.0) -> None:
        if "exp_avg_codes" in state:
            code = self._code_on(param.device) if self.code is not None else None
            # a shard's state is [rows, ...] (init_state_sharded); the blocks run along the flat tensor either way
            lion8bit_update_(param, grad, state["exp_avg_codes"].view(-1), state["exp_avg_absmax"].view(-1), lr=lr,
                             beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay,
                             grad_scale=grad_scale, blocksize=self.blocksize, code=code)
            return
        lion_update_(param, grad, state["exp_avg"], lr, self.beta1, self.beta2, self.weight_decay, grad_scale)


def check_whole_blocks(rule: Lion, name: str, param) -> None:
    """Refuse, in one line, a quantized matrix whose rows are not whole blocks: on shards its blocks would straddle
    two ranks."""
    if param.dim() == 2 and param.shape[1] % rule.blocksize:
        from lowmem.errors import UserError

        raise UserError(f"distributed: lion8bit's blocks of {rule.blocksize} would straddle the shards of {name} "
                        f"({tuple(param.shape)}: rows of {param.shape[1]} values); use update.rule=lion, or one "
                        "process")
