"""A stand-in for the official UniAD model (github zhiyuanyou/UniAD), written for the import tests.

Same module names, parameter layout and forward computation as the official ModelHelper with the MVTec
config (EfficientNet-B4 from efficientnet-pytorch with its default 380 px padding, outblocks
[1, 5, 9, 21], MFCN resize with nn.UpsamplingBilinear2d, nn.MultiheadAttention on [L, N, C] tokens,
-inf neighbour masks), so its state dict, wrapped as DDP saves it, is an official-format checkpoint.
"""

import sys
import types

import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

OUT_BLOCKS = (1, 5, 9, 21)
OUT_STRIDES = (2, 4, 8, 16)


class OfficialEncoderLayer(nn.Module):
    def __init__(self, d, nhead, ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src, mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, attn_mask=mask)[0])
        return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class OfficialDecoderLayer(nn.Module):
    def __init__(self, num_queries, d, nhead, ff):
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, d)
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, out, memory, tgt_mask, memory_mask, pos):
        tgt = self.learned_embed.weight.unsqueeze(1).repeat(1, memory.shape[1], 1)
        tgt = self.norm1(tgt + self.self_attn(tgt + pos, memory + pos, value=memory, attn_mask=tgt_mask)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + pos, out + pos, value=out, attn_mask=memory_mask)[0])
        return self.norm3(tgt + self.linear2(torch.relu(self.linear1(tgt))))


class OfficialReconstruction(nn.Module):
    def __init__(self, channels=272, hw=(14, 14), d=256, nhead=8, ff=1024, layers=4, neighbor=(7, 7)):
        super().__init__()
        self.hw = hw
        self.pos_embed = nn.Module()
        self.pos_embed.row_embed = nn.Embedding(hw[0], d // 2)
        self.pos_embed.col_embed = nn.Embedding(hw[1], d // 2)
        nn.init.uniform_(self.pos_embed.row_embed.weight)
        nn.init.uniform_(self.pos_embed.col_embed.weight)
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(OfficialEncoderLayer(d, nhead, ff) for _ in range(layers))
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(
            OfficialDecoderLayer(hw[0] * hw[1], d, nhead, ff) for _ in range(layers)
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

    def forward(self, feature_align):
        n, c, h, w = feature_align.shape
        tokens = self.input_proj(feature_align.flatten(2).permute(2, 0, 1))  # [L, N, D]
        pos = self.positions().unsqueeze(1).repeat(1, n, 1)
        mask = self.mask()
        memory = tokens
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, mask, pos)
        out = memory
        for layer in self.transformer.decoder.layers:
            out = layer(out, memory, mask, mask, pos)
        out = self.output_proj(self.transformer.decoder.norm(out))  # [L, N, C]
        feature_rec = out.permute(1, 2, 0).reshape(n, c, h, w)
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
