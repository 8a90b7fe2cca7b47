"""Training parity: our training step (what ``recon-train fit`` runs per batch) against an independently
written official-style one (tests/model/official_layout.py), from the same weights, features, jitter noise
and dropout masks. Checked once against the official code itself (numbers in the issue-12 note).
"""

import pytest
import torch

from reconad.model import ModelConfig, transformer
from reconad.model.transformer import Attention, Reconstructor
from reconad.model.uniad_import import map_official_key
from reconad.train.config import TrainConfig
from reconad.train.fit import build_optimizer, training_step
from tests.model.official_layout import (
    OfficialReconstruction,
    official_end_of_epoch,
    official_optimizer,
    official_training_step,
)

BATCH = 2
# Test-sized, two layers each so stacking (encoder memory vs the previous decoder output) is covered.
CONFIG = ModelConfig.tiny().replace(num_encoder_layers=2, num_decoder_layers=2)
L = CONFIG.num_tokens


class LayoutDropout:
    """F.dropout whose mask depends only on (step, call number), drawn in a batch-first layout, so the
    official [L, N, D] tokens and our [N, L, D] tokens get the same mask element for element."""

    def __init__(self):
        self.mode, self.step, self.calls = "ours", 0, 0
        self.shapes = {"ours": [], "official": []}

    def __call__(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        generator = torch.Generator().manual_seed(1000 * self.step + self.calls)
        self.calls += 1
        if self.mode == "official":
            assert input.dim() == 3 and input.shape[:2] == (L, BATCH), "attention dropout is off in this test"
            keep = torch.rand(BATCH, L, input.shape[2], generator=generator) >= p
            self.shapes[self.mode].append(tuple(keep.shape))
            keep = keep.permute(1, 0, 2)  # [N, L, D] -> [L, N, D]
        else:
            keep = torch.rand(input.shape, generator=generator) >= p
            self.shapes[self.mode].append(tuple(keep.shape))
        return input * keep.to(input.dtype) / (1.0 - p)

    def start(self, mode: str, step: int) -> None:
        self.mode, self.step, self.calls = mode, step, 0


def _twin_models(dtype):
    torch.manual_seed(0)
    official = OfficialReconstruction(
        channels=CONFIG.channels, hw=CONFIG.feature_hw, d=CONFIG.d_model, nhead=CONFIG.nhead,
        ff=CONFIG.dim_feedforward, layers=CONFIG.num_encoder_layers, neighbor=CONFIG.neighbor_size,
        dropout=CONFIG.dropout, jitter_scale=CONFIG.jitter_scale, jitter_prob=CONFIG.jitter_prob,
    ).to(dtype).train()
    ours = Reconstructor(CONFIG).to(dtype).train()
    state = {}
    for key, value in official.state_dict().items():
        target = map_official_key("module.reconstruction." + key)
        state[target.removeprefix("reconstructor.")] = value.clone()
    ours.load_state_dict(state)  # strict: every weight has its official counterpart
    # Attention-weight dropout off in both (nn.MultiheadAttention draws it inside F.multi_head_attention_forward,
    # a fused attention inside its kernel); every other dropout stays on with shared masks.
    for module in official.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    for module in ours.modules():
        if isinstance(module, Attention):
            module.dropout.p = 0.0
    return official, ours


def _run_steps(dtype, epochs, steps_per_epoch, monkeypatch):
    dropout = LayoutDropout()
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    # Our Dropout draws its zeros by skip sampling on CPU (same distribution, other random stream; tested in
    # tests/model/test_transformer.py): here every dropout goes through F.dropout, so both get the same masks.
    monkeypatch.setattr(transformer.Dropout, "forward", torch.nn.Dropout.forward)
    official, ours = _twin_models(dtype)
    official_opt, official_sched = official_optimizer(official)
    our_opt, our_sched = build_optimizer(ours, TrainConfig(preset="tiny", epochs=1000))
    our_params = dict(ours.named_parameters())
    twin = {n: map_official_key("module.reconstruction." + n).removeprefix("reconstructor.") for n, _ in official.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    records = []
    for epoch in range(epochs):
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            features = torch.rand(BATCH, CONFIG.channels, *CONFIG.feature_hw, generator=generator).to(dtype) * 2
            noise = torch.randn(features.shape, generator=generator).to(dtype)  # [N, C, h, w]
            lrs = (official_opt.param_groups[0]["lr"], our_opt.param_groups[0]["lr"])
            dropout.start("official", step)
            official_loss, official_norm = official_training_step(
                official, features, official_opt, jitter_noise=noise.flatten(2).permute(2, 0, 1)
            )
            dropout.start("ours", step)
            our_loss, our_norm = training_step(ours, features, our_opt, 0.1, jitter_noise=noise)
            weights = max((p_off - our_params[twin[n]]).abs().max().item() for n, p_off in official.named_parameters())
            records.append(dict(lrs=lrs, losses=(official_loss, our_loss), norms=(official_norm, our_norm),
                                weights=weights))
        official_end_of_epoch(official_sched, epoch)
        our_sched.step()
    assert dropout.shapes["ours"] and dropout.shapes["ours"] == dropout.shapes["official"]
    return records


def test_training_steps_match_the_official_trainer_in_float64(monkeypatch):
    records = _run_steps(torch.float64, epochs=2, steps_per_epoch=2, monkeypatch=monkeypatch)
    for record in records:
        assert record["lrs"][0] == record["lrs"][1] == 1e-4
        assert record["losses"][0] == pytest.approx(record["losses"][1], rel=1e-12)
        assert record["norms"][0] == pytest.approx(record["norms"][1], rel=1e-10)
        assert record["norms"][0] > 0.1  # clipping was active
        assert record["weights"] <= 1e-12
    losses = [r["losses"][1] for r in records]
    assert losses[-1] < losses[0]  # the steps did train


def test_first_training_step_matches_the_official_trainer_in_float32(monkeypatch):
    (record,) = _run_steps(torch.float32, epochs=1, steps_per_epoch=1, monkeypatch=monkeypatch)
    assert record["losses"][0] == pytest.approx(record["losses"][1], rel=1e-5)
    assert record["norms"][0] == pytest.approx(record["norms"][1], rel=1e-5)
    # AdamW's first step is lr * g / (|g| + eps): float32 rounding of gradients near eps shows up at a
    # fraction of lr = 1e-4 (the float64 test resolves weight decay, lr * wd * w ~ 1e-8 w).
    assert record["weights"] <= 1e-5


def test_jitter_noise_is_what_the_step_uses():
    torch.manual_seed(0)
    ours = Reconstructor(CONFIG.replace(dropout=0.0)).train()
    features = torch.rand(BATCH, CONFIG.channels, *CONFIG.feature_hw)
    noise = torch.randn(features.shape)
    first, second = ours(features, noise), ours(features, noise)
    assert torch.equal(first, second)
    assert not torch.allclose(first, ours(features, torch.randn(features.shape)))
    assert not torch.allclose(first, ours.eval()(features))  # no jitter in eval mode


def test_schedule_matches_the_official_one_but_for_its_one_epoch_lag():
    """The official main calls StepLR.step(epoch) with the finished 0-based epoch: its decay comes one epoch
    later (801 epochs at 1e-4 of 1000); ours steps after every epoch (800)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    official_opt, official_sched = official_optimizer(torch.nn.ParameterList([parameter]))
    our_opt, our_sched = build_optimizer(torch.nn.Linear(1, 1), TrainConfig(epochs=1000))
    official_lrs, our_lrs = [], []
    for epoch in range(1000):
        official_lrs.append(official_opt.param_groups[0]["lr"])
        our_lrs.append(our_opt.param_groups[0]["lr"])
        official_opt.step()
        our_opt.step()
        official_end_of_epoch(official_sched, epoch)
        our_sched.step()
    differing = [e + 1 for e, (a, b) in enumerate(zip(official_lrs, our_lrs)) if a != pytest.approx(b, rel=1e-9)]
    assert differing == [801]
    assert our_lrs[0] == 1e-4 and our_lrs[-1] == pytest.approx(1e-5)


def test_micro_batches_give_the_whole_batch_update(monkeypatch):
    """Gradient accumulation over micro-batches: the same loss, gradient norm and updated weights as one
    pass over the batch (float64, the jitter always on and its noise given, dropout off)."""
    from reconad.train.fit import micro_batch_size_for

    config = CONFIG.replace(dropout=0.0, jitter_prob=1.0)
    torch.manual_seed(0)
    whole = Reconstructor(config).double().train()
    split = Reconstructor(config).double().train()
    split.load_state_dict(whole.state_dict())
    generator = torch.Generator().manual_seed(3)
    features = torch.rand(5, config.channels, *config.feature_hw, generator=generator, dtype=torch.float64)
    noise = torch.randn(features.shape, generator=generator, dtype=torch.float64)
    train = TrainConfig(preset="tiny", epochs=10)
    (whole_opt, _), (split_opt, _) = build_optimizer(whole, train), build_optimizer(split, train)
    for _ in range(2):
        whole_loss, whole_norm = training_step(whole, features, whole_opt, 0.1, jitter_noise=noise, micro_batch_size=5)
        split_loss, split_norm = training_step(split, features, split_opt, 0.1, jitter_noise=noise, micro_batch_size=2)
        assert split_loss == pytest.approx(whole_loss, rel=1e-12)
        assert split_norm == pytest.approx(whole_norm, rel=1e-10)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-13), name
    # the automatic size: at most 64 MiB of float32 logits [n, nhead, L, L] per pass
    assert micro_batch_size_for(whole, features) == 5  # tiny: the whole batch
    tokens_32x32 = torch.zeros(8, config.channels, 32, 32)  # 2 heads x 1024^2 x 4 bytes = 8 MiB per image
    assert micro_batch_size_for(whole, tokens_32x32) == 8
    assert micro_batch_size_for(whole, tokens_32x32, budget_bytes=16 << 20) == 2
    assert micro_batch_size_for(whole, tokens_32x32, budget_bytes=1) == 1
