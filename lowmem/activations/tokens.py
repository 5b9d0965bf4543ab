"""LeMo's token elimination (Wang et al. 2025): in the sparse decoder layers only the most informative token blocks
enter attention and MLP; the others pass through the residual unchanged and rejoin before the next layer.

Per sparse layer and sequence:

    score      informativeness of key token j: Σ over the queries i that may attend it (causal, the model's mask,
               not padding) of positive Q_i·K_j, summed over heads, with the layer's own projections and rotary
               embedding; pooled per block of ``tokens.block_size`` tokens. Computed without gradient, over query
               chunks sized to 64 MiB of products, by running the layer's attention with a scoring function in place
               of the real one, so every architecture that computes Q and K its own way (fused qkv, q/k norms,
               GQA) is scored as it attends; the value and output projections do not run.
    keep       the top ``ceil(keep_ratio · blocks)`` blocks, in their original order (a tail shorter than a block
               is always kept); the same count for every sequence of the batch (static shapes), its own pattern.
    run        the layer on the kept tokens only: hidden states, the rotary cos/sin of their own positions, the
               attention mask restricted to them (causal among the kept, padding as it was).
    rejoin     eliminated tokens keep their input hidden state; kept ones take the layer's output.

The first ``tokens.dense_layers`` layers and the last are dense, so every position reaches the loss. Gradients are
exact for everything computed: the selection is a constant, gather and scatter are linear. Only in training mode:
evaluation (``model.eval()``) measures the dense model, the one that is exported. Installed as forward
hooks on the layers (no copied model file, parameter names unchanged), for decoder layers that take
``position_embeddings`` (Llama, Qwen2/3, Mistral, Gemma, Phi-3); other models are refused in one line.

Exact scoring costs the layer's Q and K projections on every token plus Σ positive QK over the causal triangle (the
value projection is skipped, and the scoring stops before the output projection), and needs an attention map that
fused kernels never build. With ``tokens.predictor`` a per-layer predictor
(:class:`ScorePredictor`) estimates the scores from the layer's normed input instead: fitted on the exact scores of
the first step, and refitted every ``tokens.refresh_every`` steps (full fine-tuning moves the weights the pattern
depends on). Such a refresh step selects by the exact scores, and first measures the old predictor's recall of the
exact top blocks on that fresh batch (``token_recall`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from lowmem.errors import UserError
from lowmem.ops.blocks import gather_blocks, pool_blocks, scatter_blocks
from lowmem.ops.update import math_dtype

SCORING = "lowmem_block_scores"
SCORE_BYTES = 64 * 2**20  # products scored at a time: queries per chunk are sized to stay under this
SUPPORTED_ATTENTION = ("eager", "sdpa")  # 4-D masks (or none) in original positions, which gather exactly


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask as booleans: True where a query may attend a key."""
    return mask if mask.dtype == torch.bool else mask == 0


def _score_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that records, per key token, Σ over the queries that may attend it (causal, as the
    model masks, not padding) of the positive Q·K, summed over heads, then raises :class:`_Scored`."""
    batch, heads, length, head_dim = query.shape
    dtype = math_dtype(query.dtype)  # float32, or float64 for a float64 model
    key = key.to(dtype)
    if key.shape[1] != heads:  # grouped-query attention: each key head serves heads // kv heads query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    key_t = key.transpose(-1, -2)
    scores = query.new_zeros(batch, length, dtype=dtype)
    positions = torch.arange(length, device=query.device)
    chunk = max(1, SCORE_BYTES // (4 * batch * heads * length))
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
    if mask is not None:  # a query whose own position is masked (padding) attends nothing that counts
        query_valid = _allowed(mask.diagonal(dim1=-2, dim2=-1)[..., :length]).expand(batch, -1, -1)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)  # these queries see keys [0, end) at most: causal
        products = (query[:, :, start:end].to(dtype) @ key_t[..., :end]).clamp_min_(0)  # [b, h, q, end]
        allowed = positions[None, :end] <= positions[start:end, None]
        if mask is not None:
            allowed = allowed & _allowed(mask[:, :, start:end, :end]) & query_valid[:, :, start:end, None]
        scores[:, :end] += products.masked_fill_(~allowed, 0).sum(dim=(1, 2))
    module._lowmem_scores = scores
    raise _Scored  # the attention's output (and its o_proj) is not needed


class _Scored(Exception):
    """Raised by :func:`_score_attention` once the scores are recorded, so the attention module stops there."""


@contextlib.contextmanager
def _values_skipped(attention: torch.nn.Module):
    """While scoring, the attention's ``v_proj`` returns zeros that take no memory and no FLOPs (a stride-0 view):
    the scores need Q and K only. A fused qkv projection (Phi-3) has no separate value projection to skip."""
    v_proj = getattr(attention, "v_proj", None)
    width = getattr(v_proj, "out_features", None)
    if v_proj is None or width is None:
        yield
        return
    own = v_proj.__dict__.get("forward")
    v_proj.forward = lambda x, *args, **kwargs: x.new_zeros(()).expand(*x.shape[:-1], width)
    try:
        yield
    finally:
        if own is None:
            del v_proj.forward
        else:
            v_proj.forward = own


class TokenEliminator:
    """Forward hooks on the sparse decoder layers of ``model`` (see the module docstring); :meth:`remove` undoes."""

    def __init__(self, model: torch.nn.Module, keep_ratio: float, dense_layers: int, block_size: int = 64,
                 predictor: bool = False, refresh_every: int = 50, device: torch.device | None = None):
        """``device``: where training runs (default: where the input embeddings are). Predictors loaded from a
        checkpoint go there, wherever the layer's weights sit at that moment: with weight streaming the model is
        loaded in host memory and placed only later."""
        from transformers import AttentionInterface

        from lowmem.placement.units import decoder_layers

        layers = decoder_layers(model)
        if layers is None or not all(_takes_position_embeddings(layer) for layer in layers):
            raise UserError(f"tokens.eliminate: {type(model).__name__}'s decoder layers do not take "
                            "position_embeddings (supported: Llama, Qwen2/3, Mistral, Gemma, Phi-3; set "
                            "tokens.eliminate=false)")
        if dense_layers >= len(layers) - 1:
            raise UserError(f"tokens.dense_layers {dense_layers} leaves no sparse layer in {type(model).__name__}'s "
                            f"{len(layers)} (the last is always dense): use at most {len(layers) - 2}")
        implementation = layers[0].self_attn.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise UserError(f"tokens.eliminate: attention '{implementation}' is not supported (its masks do not "
                            f"follow the kept tokens' original positions); load the model with "
                            f"{' or '.join(SUPPORTED_ATTENTION)} attention")
        AttentionInterface.register(SCORING, _score_attention)
        self.model, self.keep_ratio, self.block_size = model, keep_ratio, block_size
        self.device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        self.sparse = [layer for i, layer in enumerate(layers) if dense_layers <= i < len(layers) - 1]
        self._index = {id(layer): i for i, layer in enumerate(self.sparse)}
        self.predictors = [ScorePredictor() for _ in self.sparse] if predictor else None
        self.refresh_every = refresh_every
        self.step = 0
        self._fitted_at: dict[int, int] = {}  # sparse layer → the step its predictor was last fitted at
        self._recalls: list[torch.Tensor] = []  # this step's recall per refitted layer (device scalars)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        for layer in self.sparse:
            self._handles.append(layer.register_forward_pre_hook(self._gather, with_kwargs=True))
            # always_call: a forward that raises does not leave its input (and graph) held in _pending
            self._handles.append(layer.register_forward_hook(self._rejoin, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------------------------------- steps

    def start_step(self, step: int) -> None:
        """Called before a training step's forwards: the predictor refreshes on steps divisible by refresh_every."""
        self.step = step
        self._recalls = []

    def step_stats(self) -> dict[str, torch.Tensor]:
        """``token_recall`` (mean over the refitted layers, a device scalar) on a step that refreshed a fitted
        predictor; nothing otherwise."""
        return {"token_recall": torch.stack(self._recalls).mean()} if self._recalls else {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.predictors is None:
            return {}
        return {f"predictor.{i}.weight": p.weight for i, p in enumerate(self.predictors) if p.weight is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Predictors saved by :meth:`state_dict`, put on the training device; layers without one (none saved, or the
        predictor was off) fit at their next forward."""
        for i, predictor in enumerate(self.predictors or []):
            weight = state.get(f"predictor.{i}.weight")
            if weight is not None:
                predictor.weight = weight.to(self.device)

    # ------------------------------------------------------------------------------------------- choose

    @torch.no_grad()
    def block_scores(self, layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """[batch, full blocks] informativeness of each block of ``hidden`` for ``layer``: the exact scores, or the
        predictor's once it is fitted (except on refresh steps, which refit it on the exact scores)."""
        normed = layer.input_layernorm(hidden)
        if self.predictors is None:
            return self.pool(self.exact_token_scores(layer, normed, kwargs))
        i = self._index[id(layer)]
        predictor = self.predictors[i]
        counts = query_counts(kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1], hidden.device)
        # A step selects one way throughout: every micro-batch, and every recomputation under checkpointing.
        fits_now = self.step % self.refresh_every == 0 or predictor.weight is None or self._fitted_at.get(i) == self.step
        if not fits_now:
            return self.pool(predictor.predict(normed, counts))
        exact = self.exact_token_scores(layer, normed, kwargs)
        blocks = self.pool(exact)
        if self._fitted_at.get(i) != self.step:  # once per step: not again for later micro-batches or recomputation
            if predictor.weight is not None:
                self._recalls.append(block_recall(self.pool(predictor.predict(normed, counts)), blocks,
                                                  self.keep_count(blocks.shape[1])))
            predictor.fit(normed, exact, counts)
            self._fitted_at[i] = self.step
        return blocks

    @torch.no_grad()
    def exact_token_scores(self, layer, normed: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """[batch, seq] Σ over the queries that may attend each token of its positive Q·K, summed over heads."""
        attention = layer.self_attn
        config = attention.config  # the config this attention reads; only its own choice is swapped, and back
        saved = config._attn_implementation_internal
        config._attn_implementation_internal = SCORING
        try:
            with _values_skipped(attention):
                attention(hidden_states=normed, position_embeddings=kwargs["position_embeddings"],
                          attention_mask=kwargs.get("attention_mask"))
        except _Scored:
            pass
        finally:
            config._attn_implementation_internal = saved
        return attention.__dict__.pop("_lowmem_scores")

    def pool(self, token_scores: torch.Tensor) -> torch.Tensor:
        """[batch, full blocks] sums of [batch, seq] token scores over each whole block (a shorter tail is left out:
        it is always kept)."""
        return pool_blocks(token_scores, self.block_size)

    def keep_count(self, n_blocks: int) -> int:
        return max(1, math.ceil(self.keep_ratio * n_blocks))

    def kept_blocks(self, scores: torch.Tensor) -> torch.Tensor:
        """[batch, kept] indices of the top-scoring blocks of each sequence, ascending."""
        return scores.topk(self.keep_count(scores.shape[1]), dim=1).indices.sort(dim=1).values

    # ------------------------------------------------------------------------------------------- hooks

    def _gather(self, layer, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        self._pending.pop(id(layer), None)
        if not layer.training or hidden.shape[1] // self.block_size == 0:  # evaluation measures the dense model
            return None
        blocks = self.kept_blocks(self.block_scores(layer, hidden, kwargs))  # [b, kept]
        self._pending[id(layer)] = (hidden, blocks)
        gathered = gather_blocks(hidden, blocks, self.block_size)
        if args:
            args[0] = gathered
        else:
            kwargs["hidden_states"] = gathered
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_blocks(cos, blocks, self.block_size),
                                         gather_blocks(sin, blocks, self.block_size))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:
            # [b, 1, q, k]: the kept queries' rows, then (transposed) the kept keys' columns
            rows = gather_blocks(mask[:, 0], blocks, self.block_size)
            kwargs["attention_mask"] = gather_blocks(rows.transpose(1, 2), blocks, self.block_size).transpose(1, 2)[:, None]
        elif mask is not None:
            raise UserError(f"tokens.eliminate: attention masks of shape {tuple(mask.shape)} are not supported")
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = gather_blocks(kwargs["position_ids"], blocks, self.block_size)
        return tuple(args), kwargs

    def _rejoin(self, layer, args, kwargs, output):
        pending = self._pending.pop(id(layer), None)
        if pending is None or output is None:  # not eliminating, or the forward raised (always_call)
            return None
        hidden, blocks = pending
        computed = output[0] if isinstance(output, tuple) else output
        rejoined = scatter_blocks(hidden, computed, blocks, self.block_size)
        return (rejoined, *output[1:]) if isinstance(output, tuple) else rejoined


def _takes_position_embeddings(layer: torch.nn.Module) -> bool:
    return ("position_embeddings" in inspect.signature(layer.forward).parameters
            and hasattr(layer, "self_attn") and hasattr(layer, "input_layernorm"))


class ScorePredictor:
    """One sparse layer's estimate of its token scores from its normed input x_j, without Q, K or an attention map:

        score_j ≈ n_j · exp(w·[x_j, 1])

    n_j is the number of queries that may attend token j (counted from the mask: the causal triangle makes early
    tokens collect more products), and w models the log of the mean positive product a token's key receives per
    query. w is a ridge regression (λ = 1e-3 of the mean feature energy) of log(score_j / n_j) on [x_j, 1] over the
    batch's tokens that some query sees; float32 statistics, solved in float64 on the device, no host read.
    """

    RIDGE = 1e-3

    def __init__(self):
        self.weight: torch.Tensor | None = None  # [hidden + 1] float32

    @staticmethod
    def _features(normed: torch.Tensor) -> torch.Tensor:
        x = normed.float()
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)

    @torch.no_grad()
    def fit(self, normed: torch.Tensor, token_scores: torch.Tensor, counts: torch.Tensor) -> None:
        x = self._features(normed).flatten(0, 1)  # [tokens, hidden + 1]
        seen = (counts > 0).flatten().float()  # padding (attended by no query) has no score to fit
        mean = token_scores.float().flatten() / counts.flatten().clamp_min(1)
        floor = 1e-6 * (mean * seen).sum() / seen.sum().clamp_min(1) + 1e-30  # keeps log(0) finite
        target = torch.log(mean + floor) * seen
        gram = (x * seen[:, None]).T @ x
        ridge = self.RIDGE * gram.diagonal().mean()
        system = gram.double() + ridge.double() * torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        solution, _ = torch.linalg.solve_ex(system, (x.T @ target).double()[:, None])  # _ex: no host check
        self.weight = solution[:, 0].float()

    @torch.no_grad()
    def predict(self, normed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[batch, seq] estimated token scores."""
        return counts * torch.exp(self._features(normed) @ self.weight)


def query_counts(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[batch, seq] float32: how many queries may attend each token, as the exact scoring counts them (the 4-D
    mask's allowed pairs whose query is not padding; no mask: causal)."""
    if mask is None:
        return torch.arange(length, 0, -1, device=device, dtype=torch.float32).expand(batch, -1)
    allowed = _allowed(mask[:, :, :length, :length])
    query_valid = allowed.diagonal(dim1=-2, dim2=-1)  # [b, 1, q]: a padded query is masked from itself
    return (allowed & query_valid[..., None]).sum(dim=2, dtype=torch.float32)[:, 0].expand(batch, -1)


def block_recall(predicted: torch.Tensor, exact: torch.Tensor, keep: int) -> torch.Tensor:
    """Share of the exact top-``keep`` blocks of each sequence that the predicted top-``keep`` contains, averaged
    over the batch (a 0-d float32 tensor on their device)."""
    chosen = torch.zeros_like(exact, dtype=torch.float32).scatter_(1, predicted.topk(keep, dim=1).indices, 1.0)
    hits = chosen.gather(1, exact.topk(keep, dim=1).indices)
    return hits.sum(dim=1).div(keep).mean()

