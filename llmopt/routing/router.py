"""The token router: per token and block, a score; the token runs the block when its score exceeds the block's
threshold. One module on the model (``model.model.token_router``), shared by every routed decoder layer.

Learned scores come from one of two feature sets, each standardized per block, plus the block's target sparsity:
"residual" (the default; no attention probabilities, so any attention kernel serves them): a per-block projection
of the normalized hidden state, the log norm of the hidden state and the previous block's relative update of the
token; none depends on the position, so a router calibrated on short windows skips the same share of long
prompts. "ftp" (FTP's set): log(1 + position), the log attention mass the token received in the previous block
(summed over that step's queries that ran there, averaged over heads) and its rank among the step's tokens. It
needs attention probabilities, which only eager attention returns, and it is not causal within a prefill (later
queries raise a token's mass), so a prompt fed in pieces routes differently from the same prompt in one pass.
Baselines score without learning: "static" by position (evenly spread), "random" by an integer hash of
(position, block, seed), exact in any batch or cache layout, "shortgpt" drops whole blocks (target sparsity 1).

Skip adapters (``adapter_rank`` > 0): a token that skips a block does not pass on unchanged but gets a rank-r
linear update of its normalized state, ``normed @ down @ up + bias``, fitted to what the block would have added
and then trained by distillation: about 1% of the block's FLOPs for a much smaller error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from llmopt.routing.config import TokenRoutingConfig

GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class BlockRecord:
    """What one block decided in one forward pass: ``keep [b, s]`` bool."""

    index: int
    keep: torch.Tensor


class TokenRouter(nn.Module):
    """Scores and thresholds of every block. Buffers ``block_sparsity [n]`` (target share of tokens skipped per
    block; 1 = block dropped) and ``threshold [n]`` are set by calibration and saved with the weights."""

    def __init__(self, config: TokenRoutingConfig, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.method = config.method
        self.feature_set = config.features
        self.num_features = config.projections + 2 if config.features == "residual" else 3
        self.register_buffer("block_sparsity", torch.zeros(num_layers))
        self.register_buffer("threshold", torch.zeros(num_layers))
        self.seed = config.seed
        if self.method == "learned":
            self.register_buffer("feature_mean", torch.zeros(num_layers, self.num_features))
            self.register_buffer("feature_std", torch.ones(num_layers, self.num_features))
            with torch.random.fork_rng(devices=[]):  # the seed decides the initial router, nothing else
                torch.manual_seed(config.seed)
                if self.feature_set == "residual":
                    self.projection = nn.Parameter(torch.randn(num_layers, config.projections, hidden_size)
                                                   / math.sqrt(hidden_size))
                if config.router == "shared-mlp":
                    self.mlp = nn.Sequential(nn.Linear(self.num_features + 1, config.hidden), nn.GELU(),
                                             nn.Linear(config.hidden, 1))
                else:
                    self.linear = nn.Parameter(torch.zeros(num_layers, self.num_features))
        if config.adapter_rank:
            shape = (num_layers, hidden_size, config.adapter_rank)
            self.adapter_down = nn.Parameter(torch.zeros(shape))
            self.adapter_up = nn.Parameter(torch.zeros(shape).transpose(1, 2).contiguous())
            self.adapter_bias = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.enabled = True  # False: every block runs every token (the dense teacher)
        self.calibrating = False  # True: each block sets its threshold to hit its target on the batch it sees
        self.records: list[BlockRecord] | None = None  # collected while `recording()`
        self._previous: tuple[int, torch.Tensor] | None = None
        self._received: tuple[int, torch.Tensor] | None = None
        self._folded: dict[int, tuple] = {}  # per block: (its sources' storage and versions, folded first layer)

    def routes(self, index: int) -> bool:
        return self.enabled and bool(self.block_sparsity[index] > 0)

    def dropped(self, index: int) -> bool:
        return self.enabled and bool(self.block_sparsity[index] >= 1)

    def remember(self, index: int, hidden: torch.Tensor) -> None:
        """The input of block `index`, for the next block's relative-update feature."""
        self._previous = (index, hidden.detach())

    def remember_attention(self, index: int, probabilities: torch.Tensor | None, length: int) -> None:
        """Block `index`'s attention ``probabilities [b, heads, queries, keys]`` (rows of queries that did not run
        are zero; None: none ran), for the next block's attention-mass features of the step's last `length`
        keys."""
        if probabilities is not None:
            probabilities = probabilities.detach().float().sum(2).mean(1)[:, -length:]
        self._received = (index, probabilities)

    def score(self, index: int, hidden: torch.Tensor, normed: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` scores (float32) of the tokens ``hidden [b, s, H]`` (``normed``: after the block's input norm)
        at ``position_ids [b or 1, s]``; a token runs the block when its score exceeds the threshold."""
        if self.feature_set == "residual" and hasattr(self, "mlp") and not torch.is_grad_enabled():
            return self._folded_score(index, hidden, normed)
        positions = position_ids.expand(hidden.shape[0], -1).float()
        target = self.block_sparsity[index]
        if self.method == "static":
            return torch.frac((positions + 1) * GOLDEN + index * 0.5) - target
        if self.method == "random":
            key = (position_ids.expand(hidden.shape[0], -1) * 2654435761 + index * 40503 + self.seed * 69069) % 2**31
            return ((key * 1103515245 + 12345) % 2**31).float() / 2**31 - target
        features = (self.features(index, hidden, normed, positions) - self.feature_mean[index]) \
            / self.feature_std[index]
        if hasattr(self, "mlp"):
            return self.mlp(torch.cat([features, target.expand(*features.shape[:-1], 1)], -1)).squeeze(-1)
        return features @ self.linear[index]

    def features(self, index: int, hidden: torch.Tensor, normed: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """``[b, s, num_features]`` raw features (see the module docstring) of the tokens at ``positions [b, s]``;
        no gradient reaches the LLM."""
        if self.feature_set == "ftp":
            return self._attention_features(index, hidden, positions)
        hidden, normed = hidden.detach().float(), normed.detach().float()
        norm = hidden.norm(dim=-1).clamp_min(1e-6)
        update = self._relative_update(index, hidden)
        update = torch.zeros_like(norm) if update is None else update
        return torch.cat([normed @ self.projection[index].T, norm.log()[..., None], update[..., None]], -1)

    def _relative_update(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[b, s]`` ‖x − x_prev‖ / ‖x_prev‖ of the tokens ``hidden [b, s, H]`` (float32) against their input to
        the previous block; None (a zero feature) where that block's input is not at hand."""
        if self._previous is None or self._previous[0] != index - 1 or self._previous[1].shape != hidden.shape:
            return None
        previous = self._previous[1].float()
        return (hidden - previous).norm(dim=-1) / previous.norm(dim=-1).clamp_min(1e-6)

    def _folded_score(self, index: int, hidden: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """`score` of the residual features without autograd, with the standardization, the projection and the
        block's target folded into the MLP's first layer: the same numbers up to rounding, in fewer of the small
        operations that make up a decode step's router time."""
        projection, bias, log_norm, update_weight = self._folded_first_layer(index)
        hidden = hidden.float()
        first = torch.addmm(bias, normed.float().flatten(0, -2), projection).view(*hidden.shape[:-1], -1)
        first.addcmul_(hidden.norm(dim=-1, keepdim=True).clamp_min_(1e-6).log_(), log_norm)
        update = self._relative_update(index, hidden)
        if update is not None:
            first.addcmul_(update[..., None], update_weight)
        return self.mlp[2](self.mlp[1](first)).squeeze(-1)

    def _folded_first_layer(self, index: int) -> tuple[torch.Tensor, ...]:
        """Block `index`'s (projection ``[H, hidden]``, bias, log-norm weight, update weight ``[hidden]``) of the
        first MLP layer applied to standardized features; rebuilt when any tensor it comes from has changed."""
        first = self.mlp[0]
        sources = (self.projection, first.weight, first.bias, self.feature_mean, self.feature_std, self.block_sparsity)
        key = tuple((t.data_ptr(), t._version) for t in sources)
        cached = self._folded.get(index)
        if cached is None or cached[0] != key:
            projections = self.projection.shape[1]
            weight = first.weight[:, :-1] / self.feature_std[index]  # [hidden, features]
            bias = first.bias - weight @ self.feature_mean[index] + first.weight[:, -1] * self.block_sparsity[index]
            projection = self.projection[index].T @ weight[:, :projections].T
            cached = self._folded[index] = (key, (projection, bias, weight[:, projections], weight[:, projections + 1]))
        return cached[1]

    def _attention_features(self, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        received = torch.zeros(hidden.shape[:2], device=hidden.device)
        if self._received is not None and self._received[0] == index - 1 and self._received[1] is not None and \
                self._received[1].shape == received.shape:
            received = self._received[1]
        rank = received.argsort(dim=1).argsort(dim=1).float() / max(hidden.shape[1] - 1, 1)
        return torch.stack([positions.float().log1p(), (received + 1e-6).log(), rank], -1)

    @property
    def adapts(self) -> bool:
        return hasattr(self, "adapter_bias")

    def skip_update(self, index: int, normed: torch.Tensor) -> torch.Tensor:
        """``[..., H]``: what block `index` adds to tokens that skip it, from their normalized states ``normed
        [..., H]`` (in its dtype); zeros without adapters."""
        if not self.adapts:
            return torch.zeros_like(normed)
        update = normed.float() @ self.adapter_down[index] @ self.adapter_up[index] + self.adapter_bias[index]
        return update.to(normed.dtype)

    def decide(self, index: int, hidden: torch.Tensor, normed: torch.Tensor,
               position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(keep [b, s] bool, soft gate [b, s] in training, else None)``; position 0 (the attention sink) always
        runs."""
        score = self.score(index, hidden, normed, position_ids)
        if self.calibrating:
            with torch.no_grad():
                self.threshold[index] = self.batch_threshold(index, score)
        logit = score - self.threshold[index]
        sink = position_ids.expand(hidden.shape[0], -1) == 0
        keep = (logit > 0) | sink
        return keep, torch.where(sink, torch.ones_like(logit), torch.sigmoid(logit)) if self.training else None

    def batch_threshold(self, index: int, score: torch.Tensor) -> torch.Tensor:
        """The threshold under which exactly block `index`'s target share of the tokens of ``score`` falls."""
        return torch.quantile(score.detach().flatten().double(), self.block_sparsity[index].item()).float()

    def record(self, entry: BlockRecord) -> None:
        if self.records is not None:
            self.records.append(entry)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[BlockRecord]]:
        """Collect every block's decisions while the scope lasts."""
        self.records = []
        try:
            yield self.records
        finally:
            self.records = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Every block runs every token: the original model (the distillation teacher)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    @contextlib.contextmanager
    def calibrating_thresholds(self) -> Iterator[None]:
        """Each block sets its threshold so that its target share of the batch's tokens skips, in block order, so
        each sees the inputs the earlier routed blocks produce."""
        self.calibrating = True
        try:
            yield
        finally:
            self.calibrating = False
