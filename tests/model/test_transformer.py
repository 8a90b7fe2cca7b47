import torch

from reconad.model.transformer import MASK_FILL, Attention, Reconstructor, build_neighbor_mask, explicit_attention


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


def test_attention_dropout_is_on_the_weights_in_both_formulations():
    """Dropout on the softmax output scaled by 1/(1-p): unbiased, with the same spread either way."""
    torch.manual_seed(0)
    attention = Attention(8, 2, dropout=0.5)
    q, k, v = (torch.randn(1, 6, 8) for _ in range(3))
    draws = 4000
    with torch.no_grad():
        expected = attention.eval()(q, k, v)
        attention.train()
        fused = torch.stack([attention(q, k, v) for _ in range(draws)])
        with explicit_attention(attention):
            explicit = torch.stack([attention(q, k, v) for _ in range(draws)])
    for samples in (fused, explicit):
        assert samples.std(dim=0).min() > 0.01  # dropout acts in training
        assert (samples.mean(dim=0) - expected).abs().max() < 0.05  # measured 0.008; standard error <= 0.005
    spread = fused.var(dim=0).mean() / explicit.var(dim=0).mean()
    assert 0.9 < spread < 1.1, spread  # measured 1.008


def test_training_and_evaluation_run_sdpa_and_the_export_form_does_not(tiny_config, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = Reconstructor(tiny_config)
    features = _features(tiny_config, n=2)
    model.train()(features).sum().backward()
    assert calls == [tiny_config.dropout] * 3  # encoder attention, decoder attentions 1 and 2
    calls.clear()
    with torch.no_grad():
        model.eval()(features)
    assert calls == [0.0] * 3
    calls.clear()
    with explicit_attention(model):
        model.train()(features)
    assert calls == []
    assert not any(m.explicit for m in model.modules() if isinstance(m, Attention))


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
