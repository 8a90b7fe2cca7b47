import torch

from reconad.model.transformer import MASK_FILL, Attention, build_neighbor_mask


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
