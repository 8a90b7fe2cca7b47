"""UniAD's reconstruction transformer, adapted from DETR's models/transformer.py (itself from torch.nn.Transformer).

Changes from DETR: a neighbour mask (a k x k window a token may NOT attend to) held once as a buffer with
a finite fill; no object queries from outside, but one learned query embedding per decoder layer whose
first attention reads the encoder output and second the previous layer's output (the official UniAD
layout); feature jittering in training; batch-first tokens; attention through PyTorch's fused
``scaled_dot_product_attention`` where it has a fused kernel, written out as plain ops for export and for
CPU training with dropout (with skip-sampled attention dropout).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from reconad.model.config import ModelConfig

# Finite: -inf becomes NaN in FP16 arithmetic (inf - inf); -3e4 is representable in FP16 and exp() of it
# underflows to exactly 0, so masked keys get zero weight in FP32 and FP16 alike.
MASK_FILL = -30000.0


def build_neighbor_mask(feature_hw: tuple[int, int], neighbor_size: tuple[int, int]) -> torch.Tensor:
    """Additive attention mask [L, L], L = h*w: MASK_FILL where the key lies in the query's window, else 0."""
    h, w = feature_hw
    rh, rw = neighbor_size[0] // 2, neighbor_size[1] // 2
    rows = torch.arange(h).repeat_interleave(w)  # [L] row of each token
    cols = torch.arange(w).repeat(h)  # [L] column of each token
    near = ((rows[:, None] - rows[None, :]).abs() <= rh) & ((cols[:, None] - cols[None, :]).abs() <= rw)
    return torch.zeros(h * w, h * w).masked_fill(near, MASK_FILL)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (so its state dicts load).

    Two formulations of the same function. ``F.scaled_dot_product_attention`` wherever PyTorch has a fused
    kernel for the call (``sdpa_is_fused``): evaluation, and training on CUDA or without dropout. The explicit
    Q.K^T MatMul, mask Add, Softmax, MatMul otherwise: for export (``explicit_attention``), so the ONNX graph
    is plain ops and the softmax logits can stay FP32, and for training on CPU with dropout, where SDPA
    would run its unfused math kernel. Attention-weight dropout is the same in both: each softmax weight is
    zeroed with probability ``dropout`` and the rest scaled by 1 / (1 - dropout), in training only; the
    random streams differ (SDPA's own; ``sample_drop_positions`` on the explicit path).
    """

    explicit = False  # class default; explicit_attention sets it per instance

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [N or 1, L, D], key/value [N, L, D], attn_mask additive [L, L] or None -> [N, L, D].

        A query batch of 1 is broadcast against the keys' N: a query that is the same for every image (the
        decoder's learned queries) is then a constant of the exported graph, and so is its projection.
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            # [N, L, D] -> [N, nhead, L, head_dim]
            return F.linear(x, weight, bias).unflatten(-1, (self.nhead, self.head_dim)).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        dropout_p = self.dropout.p if self.training else 0.0
        if not self.explicit and sdpa_is_fused(q.device, dropout_p):
            if attn_mask is not None and attn_mask.dtype != q.dtype:
                attn_mask = attn_mask.to(q.dtype)  # under autocast q is bf16/fp16; SDPA wants one dtype
            if q.shape[0] != k.shape[0]:
                q = q.expand(k.shape[0], -1, -1, -1)  # the fused kernels take one batch size
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
            return self.out_proj(out.transpose(1, 2).flatten(2))  # [N, L, D]
        q = q * (1.0 / math.sqrt(self.head_dim))
        logits = q @ k.transpose(-2, -1)  # [N, nhead, L, L]
        if attn_mask is not None:
            logits = logits + attn_mask
        weights = logits.softmax(dim=-1)
        if 0.0 < dropout_p < 1.0:
            # the 1 / (1 - p) of dropout applied to the [N, nhead, L, head_dim] product, not the L x L weights
            out = (skip_sampled_dropout(weights, dropout_p, scale=False) @ v) * (1.0 / (1.0 - dropout_p))
        else:
            out = self.dropout(weights) @ v  # no dropout, or all weights zeroed (p = 1)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # [N, L, D]


def sdpa_is_fused(device: torch.device, dropout_p: float) -> bool:
    """Whether ``F.scaled_dot_product_attention`` runs a fused kernel for this call (PyTorch 2.x): on CUDA
    always (flash or memory-efficient, both with dropout), on CPU only without dropout (its flash kernel
    takes none; with dropout it falls back to the unfused math kernel, slower than the explicit form)."""
    return dropout_p == 0.0 or device.type != "cpu"


def sample_drop_positions(
    n: int, p: float, device: torch.device | str = "cpu", gaps_per_round: int | None = None
) -> torch.Tensor:
    """Ascending int64 positions in [0, n) where each of n elements is dropped independently with
    probability 0 < p < 1: the distribution of ``F.dropout``'s zeros, from about n * p random numbers.

    Skip sampling (Devroye, *Non-Uniform Random Variate Generation*, 1986, ch. X): the gaps between drops
    in a Bernoulli(p) sequence are i.i.d. Geometric(p), 1 + floor(log(1 - U) / log(1 - p)) for U uniform
    in [0, 1) (float64, as ``torch.bernoulli`` on CPU). Draws from torch's default generator, in rounds of
    ``gaps_per_round`` gaps (default: enough to pass n in one round but with odds of ~1e-9).
    """
    log_keep = math.log1p(-p)
    chunks, last = [], -1  # the last drop position so far; the sequence is memoryless, so resume there
    while True:
        expected = (n - 1 - last) * p
        count = gaps_per_round or int(expected + 6 * math.sqrt(expected) + 16)
        gaps = torch.rand(count, dtype=torch.float64, device=device).neg_().log1p_().div_(log_keep).floor_().add_(1)
        positions = gaps.cumsum_(0).add_(last)  # ascending; float64 is exact for integers below 2^53
        inside = int(torch.searchsorted(positions, float(n)))  # how many fall in [0, n)
        chunks.append(positions[:inside].long())
        if inside < count:
            return torch.cat(chunks)
        last = int(positions[-1])


def skip_sampled_dropout(x: torch.Tensor, p: float, scale: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` with the zeros placed by ``sample_drop_positions``; without
    ``scale`` the kept elements are not multiplied by 1 / (1 - p) (the caller does it further on)."""
    positions = sample_drop_positions(x.numel(), p, x.device)
    if not scale:
        return x.flatten().index_fill(0, positions, 0.0).view_as(x)
    out = (x * (1.0 / (1.0 - p))).contiguous()
    out.view(-1).index_fill_(0, positions, 0.0)  # in place on a fresh tensor: its producer saved nothing
    return out


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments and empty state dict) that draws its zeros by skip sampling on CPU in
    training: the same distribution from about p * n random numbers instead of n. Elsewhere nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu":
            return skip_sampled_dropout(x, self.p)
        return super().forward(x)


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``Attention`` in ``module`` uses the explicit MatMul / Add / Softmax / MatMul
    form: the exporter traces this, because the FP32 islands, the TensorRT 8.x precision constraints and
    the LayerNorm rewrite are found on that form."""
    attentions = [m for m in module.modules() if isinstance(m, Attention)]
    previous = [m.explicit for m in attentions]
    for attention in attentions:
        attention.explicit = True
    try:
        yield module
    finally:
        for attention, value in zip(attentions, previous):
            attention.explicit = value


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm self-attention + feed-forward; the position embedding is added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Learned queries attend to the encoder output (attention 1), then to the previous layer's output
    (attention 2), then a feed-forward; post-norm, position embedding on queries and keys."""

    def __init__(self, num_tokens: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.query_embed = nn.Embedding(num_tokens, d_model)
        self.self_attn = Attention(d_model, nhead, dropout)
        self.multihead_attn = Attention(d_model, nhead, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    def forward(
        self,
        previous: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        memory_mask: torch.Tensor | None,
        previous_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # [1, L, D], broadcast in attention 1 and its residual: the same for every image, so in the exported
        # graph query + pos and its projection are constants (folded), not per-image work
        query = self.query_embed.weight.unsqueeze(0)
        out = self.self_attn(query + pos, memory + pos, memory, memory_mask)
        query = self.norm1(query + self.dropout1(out))  # [N, L, D]
        out = self.multihead_attn(query + pos, previous + pos, previous, previous_mask)
        query = self.norm2(query + self.dropout2(out))
        return self.norm3(query + self.dropout3(self.ffn(query)))


class PositionEmbedding(nn.Module):
    """Learned row/column embedding (the official factorised form): token (i, j) gets [col_j, row_i]."""

    def __init__(self, feature_hw: tuple[int, int], d_model: int):
        super().__init__()
        self.feature_hw = feature_hw
        self.row_embed = nn.Embedding(feature_hw[0], d_model // 2)
        self.col_embed = nn.Embedding(feature_hw[1], d_model // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        h, w = self.feature_hw
        cols = self.col_embed.weight.unsqueeze(0).expand(h, -1, -1)  # [h, w, D/2]
        rows = self.row_embed.weight.unsqueeze(1).expand(-1, w, -1)  # [h, w, D/2]
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)  # [L, D]


class Reconstructor(nn.Module):
    """Features [N, C, h, w] -> reconstruction [N, C, h, w] through a masked encoder-decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, d = config.channels, config.d_model
        self.feature_hw = config.feature_hw
        self.jitter_scale = config.jitter_scale
        self.jitter_prob = config.jitter_prob
        self.neighbor_mask = config.neighbor_mask
        self.input_proj = nn.Linear(c, d)
        self.pos_embed = PositionEmbedding(config.feature_hw, d)
        encoder_layer = EncoderLayer(d, config.nhead, config.dim_feedforward, config.dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(config.num_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(config.num_tokens, d, config.nhead, config.dim_feedforward, config.dropout)
            for _ in range(config.num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.output_proj = nn.Linear(d, c)
        # A buffer, not a parameter: one copy, folded into the exported graph as a single initializer.
        self.register_buffer("attn_mask", build_neighbor_mask(config.feature_hw, config.neighbor_size), persistent=False)
        for module in self.modules():  # the official initialisation: xavier-uniform Linear, zero bias
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def add_jitter(self, tokens: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Feature jitter (the official ``add_jitter``): tokens + N(0, 1) * ||token|| / C * jitter_scale,
        applied with probability ``jitter_prob``. ``noise`` [N, L, C]: the N(0, 1) draw; None = torch.randn."""
        if torch.rand(()) > self.jitter_prob:
            return tokens
        scale = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1] * self.jitter_scale  # [N, L, 1]
        return tokens + (torch.randn_like(tokens) if noise is None else noise) * scale

    def forward(self, features: torch.Tensor, jitter_noise: torch.Tensor | None = None) -> torch.Tensor:
        """features [N, C, h, w] -> reconstruction [N, C, h, w].

        ``jitter_noise`` (training only): the standard-normal draw of the feature jitter, [N, C, h, w] like
        ``features``, so a caller can replay exact noise; None draws it from torch's global generator.
        """
        n, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # [N, L, C]
        if self.training and self.jitter_scale > 0:
            noise = None if jitter_noise is None else jitter_noise.flatten(2).transpose(1, 2)  # [N, L, C]
            tokens = self.add_jitter(tokens, noise)
        x = self.input_proj(tokens)  # [N, L, D]
        pos = self.pos_embed().unsqueeze(0)  # [1, L, D]
        enc_mask, dec1_mask, dec2_mask = (self.attn_mask if use else None for use in self.neighbor_mask)
        for layer in self.encoder:
            x = layer(x, pos, enc_mask)
        memory, out = x, x
        for layer in self.decoder:
            out = layer(out, memory, pos, dec1_mask, dec2_mask)
        out = self.output_proj(self.decoder_norm(out))  # [N, L, C]
        return out.transpose(1, 2).reshape(n, c, h, w)
