"""A stand-in for the official UniAD model (github zhiyuanyou/UniAD), written for the import and training tests.

Same module names, parameter layout and forward computation as the official ModelHelper with the MVTec
config (EfficientNet-B4 from efficientnet-pytorch with its default 380 px padding, outblocks
[1, 5, 9, 21], MFCN resize with nn.UpsamplingBilinear2d, nn.MultiheadAttention on [L, N, C] tokens,
-inf neighbour masks), so its state dict, wrapped as DDP saves it, is an official-format checkpoint.
In training mode it also does what the official trainer does (tools/train_val.py with the MVTec config):
feature jitter on the [L, N, C] tokens, dropout where the official layers have it, FeatureMSELoss, AdamW
on the reconstruction only, clip_grad_norm_ over all parameters, StepLR stepped with the finished epoch.
"""

import random
import sys
import types

import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

OUT_BLOCKS = (1, 5, 9, 21)
OUT_STRIDES = (2, 4, 8, 16)


class OfficialEncoderLayer(nn.Module):
    def __init__(self, d, nhead, ff, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src, mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, attn_mask=mask)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(torch.relu(self.linear1(src))))))


class OfficialDecoderLayer(nn.Module):
    def __init__(self, num_queries, d, nhead, ff, dropout=0.1):
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, d)
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, out, memory, tgt_mask, memory_mask, pos):
        tgt = self.learned_embed.weight.unsqueeze(1).repeat(1, memory.shape[1], 1)
        attended = self.self_attn(tgt + pos, memory + pos, value=memory, attn_mask=tgt_mask)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(tgt + pos, out + pos, value=out, attn_mask=memory_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(torch.relu(self.linear1(tgt))))))


class OfficialReconstruction(nn.Module):
    def __init__(self, channels=272, hw=(14, 14), d=256, nhead=8, ff=1024, layers=4, neighbor=(7, 7), dropout=0.1,
                 jitter_scale=20.0, jitter_prob=1.0):
        super().__init__()
        self.hw = hw
        self.jitter_scale, self.jitter_prob = jitter_scale, jitter_prob
        self.pos_embed = nn.Module()
        self.pos_embed.row_embed = nn.Embedding(hw[0], d // 2)
        self.pos_embed.col_embed = nn.Embedding(hw[1], d // 2)
        nn.init.uniform_(self.pos_embed.row_embed.weight)
        nn.init.uniform_(self.pos_embed.col_embed.weight)
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(
            OfficialEncoderLayer(d, nhead, ff, dropout) for _ in range(layers)
        )
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(
            OfficialDecoderLayer(hw[0] * hw[1], d, nhead, ff, dropout) for _ in range(layers)
        )
        self.transformer.decoder.norm = nn.LayerNorm(d)
        self.input_proj = nn.Linear(channels, d)
        self.output_proj = nn.Linear(d, channels)
        self.neighbor = neighbor

    def mask(self):
        h, w = self.hw
        hm, wm = self.neighbor
        mask = torch.zeros(h, w, h, w)
        for i in range(h):
            for j in range(w):
                mask[i, j, max(i - hm // 2, 0) : i + hm // 2 + 1, max(j - wm // 2, 0) : j + wm // 2 + 1] = float("-inf")
        return mask.view(h * w, h * w)

    def positions(self):
        h, w = self.hw
        x_emb = self.pos_embed.col_embed(torch.arange(w))
        y_emb = self.pos_embed.row_embed(torch.arange(h))
        return torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1).flatten(0, 1)

    def jitter(self, tokens, noise=None):
        """The official add_jitter on [L, N, C] tokens: + randn * ||token|| / C * scale, with probability p."""
        if random.uniform(0, 1) > self.jitter_prob:
            return tokens
        num_tokens, batch_size, channels = tokens.shape
        norms = tokens.norm(dim=2).unsqueeze(2) / channels
        noise = torch.randn(num_tokens, batch_size, channels) if noise is None else noise
        return tokens + noise * norms * self.jitter_scale

    def reconstruct(self, feature_align, jitter_noise=None):
        """feature_align [N, C, h, w] -> feature_rec [N, C, h, w]; jitter_noise [L, N, C] (training only)."""
        n, c, h, w = feature_align.shape
        tokens = feature_align.flatten(2).permute(2, 0, 1)  # [L, N, C]
        if self.training:
            tokens = self.jitter(tokens, jitter_noise)
        tokens = self.input_proj(tokens)  # [L, N, D]
        pos = self.positions().unsqueeze(1).repeat(1, n, 1).to(tokens.dtype)
        mask = self.mask().to(tokens.dtype)
        memory = tokens
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, mask, pos)
        out = memory
        for layer in self.transformer.decoder.layers:
            out = layer(out, memory, mask, mask, pos)
        out = self.output_proj(self.transformer.decoder.norm(out))  # [L, N, C]
        return out.permute(1, 2, 0).reshape(n, c, h, w)

    def forward(self, feature_align):
        feature_rec = self.reconstruct(feature_align)
        pred = torch.sqrt(((feature_rec - feature_align) ** 2).sum(dim=1, keepdim=True))
        return nn.UpsamplingBilinear2d(scale_factor=16)(pred)


class OfficialModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = EfficientNet.from_name("efficientnet-b4")  # padding for 380 px, as official
        self.reconstruction = OfficialReconstruction()

    def forward(self, images_uint8):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        net = self.backbone
        x = net._swish(net._bn0(net._conv_stem(x)))
        features = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in OUT_BLOCKS:
                features.append(x)
        feature_align = torch.cat(
            [nn.UpsamplingBilinear2d(scale_factor=s / 16)(f) for f, s in zip(features, OUT_STRIDES)], dim=1
        )
        return self.reconstruction(feature_align)


def official_checkpoint_payload(model: OfficialModel) -> dict:
    """What the official trainer saves: DDP-prefixed weights, epoch, the EasyDict net config, optimizer."""
    easydict = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kwargs):
            super().__init__(d or {}, **kwargs)
            self.__dict__.update(self)

    EasyDict.__module__ = "easydict"
    EasyDict.__qualname__ = "EasyDict"
    easydict.EasyDict = EasyDict
    sys.modules["easydict"] = easydict
    return {
        "epoch": 1000,
        "arch": [EasyDict(name="backbone", type="models.backbones.efficientnet_b4")],
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "best_metric": 0.97,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }


def official_optimizer(reconstruction: nn.Module, step_size: int = 800):
    """The MVTec config's optimiser and schedule: AdamW(lr 1e-4, betas (0.9, 0.999), wd 1e-4) on the active
    (non-frozen) layers' parameters, StepLR(step_size 800, gamma 0.1)."""
    optimizer = torch.optim.AdamW(
        [{"params": reconstruction.parameters()}], lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4
    )
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)


def official_training_step(model: nn.Module, feature_align, optimizer, jitter_noise=None, clip_max_norm=0.1):
    """One iteration of the official train_one_epoch: FeatureMSELoss (nn.MSELoss, mean) between the
    reconstruction and the clean features, zero_grad, backward, clip_grad_norm_ over model.parameters(), step.

    Returns the loss (float) and the total gradient norm before clipping.
    """
    loss = nn.MSELoss()(model.reconstruct(feature_align, jitter_noise), feature_align)
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    optimizer.step()
    return loss.item(), float(grad_norm)


def official_end_of_epoch(scheduler, epoch: int) -> None:
    """The official main loop's ``lr_scheduler.step(epoch)`` with the 0-based epoch just trained (closed form)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch deprecates the epoch argument
        scheduler.step(epoch)
