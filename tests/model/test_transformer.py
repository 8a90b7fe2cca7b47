import math

import pytest
import torch
import torch.nn.functional as F

from reconad.model import transformer
from reconad.model.transformer import (
    MASK_FILL,
    Attention,
    Dropout,
    Reconstructor,
    build_neighbor_mask,
    explicit_attention,
    sample_drop_positions,
    sdpa_is_fused,
)


def test_neighbor_mask_properties():
    mask = build_neighbor_mask((32, 32), (7, 7))
    assert mask.shape == (1024, 1024)
    masked = mask == MASK_FILL
    assert set(mask.unique().tolist()) == {0.0, MASK_FILL}
    assert torch.isfinite(mask).all()
    assert torch.equal(masked, masked.T)  # symmetric
    assert masked.diagonal().all()  # a token never sees itself
    per_query = masked.sum(dim=1).view(32, 32)
    assert (per_query[3:-3, 3:-3] == 49).all()  # interior tokens: the full 7x7 window
    assert per_query[0, 0] == 16  # corner: 4x4 of the window lies on the grid
    assert (per_query < 1024).all()  # no fully masked row


def test_neighbor_mask_on_small_grid_never_hides_everything():
    mask = build_neighbor_mask((8, 8), (7, 7))
    assert ((mask == 0).sum(dim=1) > 0).all()
    assert (mask == MASK_FILL).sum(dim=1).max() == 49


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = Attention(32, 4).eval()
    reference = torch.nn.MultiheadAttention(32, 4).eval()
    reference.load_state_dict(ours.state_dict())
    q, k, v = (torch.randn(2, 16, 32) for _ in range(3))
    mask = build_neighbor_mask((4, 4), (3, 3))
    torch_mask = mask.masked_fill(mask == MASK_FILL, float("-inf"))
    expected, _ = reference(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=torch_mask)
    torch.testing.assert_close(ours(q, k, v, mask), expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def _features(config, n: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.channels, *config.feature_hw, generator=generator)


def _output_and_gradients(model: Reconstructor, features: torch.Tensor, projection: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(features)
    (out * projection).sum().backward()  # a random projection, so every gradient is non-trivial
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_sdpa_and_explicit_attention_agree_in_values_and_gradients(tiny_config):
    config = tiny_config.replace(dropout=0.0, jitter_scale=0.0)  # the formulation is the only difference
    torch.manual_seed(0)
    model = Reconstructor(config).train()
    features = _features(config)
    projection = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
    fused, fused_grads = _output_and_gradients(model, features, projection)
    with explicit_attention(model):
        explicit, explicit_grads = _output_and_gradients(model, features, projection)
    # Measured (float32): outputs within 8e-7 of values up to 3; gradients within 2e-5 of values up to 60.
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for name, grad in explicit_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert set(fused_grads) == set(explicit_grads) and all(g.abs().max() > 0 for g in fused_grads.values())


def _old_dropout_forward(attention: Attention, q, k, v, dropout=None) -> torch.Tensor:
    """The attention as before issue 13: explicit form, F.dropout (or ``dropout``) on the softmax weights."""
    n, length, d_model = q.shape
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    heads = [F.linear(x, w, b).view(n, -1, attention.nhead, attention.head_dim).transpose(1, 2)
             for x, w, b in ((q, w_q, b_q), (k, w_k, b_k), (v, w_v, b_v))]
    logits = heads[0] / math.sqrt(attention.head_dim) @ heads[1].transpose(-2, -1)
    dropout = dropout or (lambda weights: F.dropout(weights, attention.dropout.p, attention.training))
    out = dropout(logits.softmax(dim=-1)) @ heads[2]
    return attention.out_proj(out.transpose(1, 2).reshape(n, length, d_model))


def test_attention_dropout_is_on_the_weights_in_every_formulation(monkeypatch):
    """Each softmax weight zeroed with probability p, the rest scaled by 1/(1-p): unbiased, and with the
    spread of F.dropout on the weights, for the skip-sampled explicit path (CPU training) and SDPA's own."""
    torch.manual_seed(0)
    attention = Attention(8, 2, dropout=0.5)
    q, k, v = (torch.randn(1, 6, 8) for _ in range(3))
    draws = 2000
    with torch.no_grad():
        expected = attention.eval()(q, k, v)
        attention.train()
        reference = torch.stack([_old_dropout_forward(attention, q, k, v) for _ in range(draws)])
        explicit = torch.stack([attention(q, k, v) for _ in range(draws)])
        monkeypatch.setattr(transformer, "sdpa_is_fused", lambda device, dropout_p: True)
        fused = torch.stack([attention(q, k, v) for _ in range(draws)])  # SDPA's math kernel on CPU
    for samples in (reference, explicit, fused):
        assert samples.std(dim=0).min() > 0.01  # dropout acts in training
        assert (samples.mean(dim=0) - expected).abs().max() < 0.05  # measured <= 0.012; standard error 0.007
    for samples in (explicit, fused):
        spread = samples.var(dim=0).mean() / reference.var(dim=0).mean()
        assert 0.9 < spread < 1.1, spread  # measured within 0.3%; dropout on the output: 0.28


@pytest.mark.parametrize("gaps_per_round", [None, 7])  # 7: many rounds, each resumed at the last drop
def test_sample_drop_positions_are_independent_bernoulli_drops(gaps_per_round):
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    positions = sample_drop_positions(n, p, gaps_per_round=gaps_per_round)
    assert positions.dtype == torch.int64 and positions.min() >= 0 and positions.max() < n
    assert (positions.diff() > 0).all()  # ascending, no repeats
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(dropped.sum().item() - n * p) < 5 * sigma
    both = (dropped[:-1] & dropped[1:]).sum().item()  # neighbours independent: p^2 of the pairs
    assert abs(both - (n - 1) * p * p) < 5 * math.sqrt(n * p * p)
    halves = dropped.view(2, -1).sum(dim=1).float()  # no drift along the sequence
    assert (halves - n * p / 2).abs().max() < 5 * sigma


def test_dropout_module_draws_like_nn_dropout():
    torch.manual_seed(0)
    x = torch.rand(64, 300, 40).transpose(1, 2).requires_grad_()  # not contiguous
    dropout = Dropout(0.1)
    assert torch.equal(dropout.eval()(x), x) and dropout.state_dict() == {}
    out = dropout.train()(x)
    zeros = out == 0
    assert abs(zeros.float().mean().item() - 0.1) < 0.002  # 768000 elements: 5 standard errors
    torch.testing.assert_close(out[~zeros], x[~zeros] / 0.9)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (~zeros).float() / 0.9)
    assert (x > 0).all()  # the input itself is untouched


def test_explicit_dropout_values_and_gradients():
    """The skip-sampled dropout is the softmax weights times a 0/1 mask over 1 - p, gradients included."""
    torch.manual_seed(0)
    attention = Attention(8, 2, dropout=0.1).train()
    q, k, v = (torch.randn(2, 6, 8, requires_grad=True) for _ in range(3))
    torch.manual_seed(1)
    out = attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, attention.in_proj_weight))
    torch.manual_seed(1)  # the same draws, so the same dropped weights
    keep = torch.ones(2 * 2 * 6 * 6).index_fill(0, sample_drop_positions(2 * 2 * 6 * 6, 0.1), 0.0)
    assert 0 < (keep == 0).sum() < keep.numel()
    expected = _old_dropout_forward(attention, q, k, v, dropout=lambda weights: weights * keep.view(2, 2, 6, 6) / 0.9)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, attention.in_proj_weight))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_sdpa_runs_where_it_has_a_fused_kernel(tiny_config, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = Reconstructor(tiny_config)
    features = _features(tiny_config, n=2)
    with torch.no_grad():
        model.eval()(features)
    assert calls == [0.0] * 3  # evaluation: encoder attention, decoder attentions 1 and 2
    calls.clear()
    model.train()(features).sum().backward()
    assert calls == []  # CPU training with dropout: the explicit form (SDPA's CPU kernel takes no dropout)
    no_dropout = Reconstructor(tiny_config.replace(dropout=0.0)).train()
    no_dropout(features).sum().backward()
    assert calls == [0.0] * 3  # CPU training without dropout: SDPA's fused CPU kernel
    calls.clear()
    with explicit_attention(no_dropout):
        no_dropout(features)
    assert calls == []  # the export form
    assert not any(m.explicit for m in no_dropout.modules() if isinstance(m, Attention))
    assert sdpa_is_fused(torch.device("cuda"), tiny_config.dropout)  # CUDA training: SDPA with its dropout
    assert not sdpa_is_fused(torch.device("cpu"), tiny_config.dropout)


def test_explicit_attention_restores_on_error(tiny_config):
    model = Reconstructor(tiny_config)
    try:
        with explicit_attention(model):
            assert all(m.explicit for m in model.modules() if isinstance(m, Attention))
            raise RuntimeError("export failed")
    except RuntimeError:
        pass
    assert not any(m.explicit for m in model.modules() if isinstance(m, Attention))


def test_sdpa_under_bfloat16_autocast(tiny_config):
    """Under autocast Q/K/V are bf16 while the mask buffer stays fp32: the mask is cast for SDPA."""
    torch.manual_seed(0)
    model = Reconstructor(tiny_config).train()
    features = _features(tiny_config, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
