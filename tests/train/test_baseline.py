import numpy as np
import pytest
import torch

from reconad.model import ModelConfig, build_detector
from reconad.runtime.errors import ReconadError
from reconad.train.baseline import PatchKnn, PatchKnnConfig, _gaussian_blur, greedy_coreset, nearest_distance
from reconad.train.data import load_mvtec


def test_nearest_distance_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 24, generator=generator), torch.randn(500, 24, generator=generator)
    expected = torch.cdist(queries, bank).amin(dim=1)
    assert torch.allclose(nearest_distance(queries, bank, chunk=64), expected, atol=1e-4)


def test_greedy_coreset_takes_one_point_from_every_cluster():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0], [50.0, 300.0]])
    points = torch.cat([c + torch.randn(40, 2, generator=generator) for c in centres])
    chosen = greedy_coreset(points, 5, generator)
    clusters = {int(torch.cdist(points[i : i + 1], centres).argmin()) for i in chosen}
    assert clusters == set(range(5))
    assert len(greedy_coreset(points, 1000, generator)) == len(points)


def test_gaussian_blur_keeps_constants_and_mass():
    maps = torch.full((2, 1, 40, 40), 3.0)
    assert torch.allclose(_gaussian_blur(maps, 4.0), maps, atol=1e-5)
    spike = torch.zeros(1, 1, 64, 64)
    spike[0, 0, 32, 32] = 1.0
    blurred = _gaussian_blur(spike, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4) and blurred.max() < 0.05


@pytest.fixture(scope="module")
def tiny_knn_data(sample_data_root):
    train = load_mvtec(sample_data_root, "train", (64, 64))
    test = load_mvtec(sample_data_root, "test", (64, 64))
    torch.manual_seed(0)
    return build_detector(ModelConfig.tiny()).eval(), train, test


def test_training_images_score_zero_without_subsampling(tiny_knn_data):
    detector, train, test = tiny_knn_data
    knn = PatchKnn(detector, PatchKnnConfig(subsample="none", blur_sigma=0)).fit(train.images)
    assert len(knn.bank) == knn.num_training_patches == len(train) * 8 * 8
    maps, scores = knn.predict(train.images[:3])
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert np.abs(scores).max() < 1e-3  # every patch is in the bank
    maps, scores = knn.predict(test.images)
    assert (scores[test.labels == 1] > 1e-3).all()
    assert np.allclose(scores, maps.reshape(len(maps), -1).max(axis=1), atol=1e-4)  # unblurred: max of the map


def test_subsampling_keeps_the_requested_fraction(tiny_knn_data):
    detector, train, _ = tiny_knn_data
    for subsample in ("coreset", "random"):
        knn = PatchKnn(detector, PatchKnnConfig(subsample=subsample, bank_fraction=0.25)).fit(train.images)
        assert len(knn.bank) == round(0.25 * knn.num_training_patches)
        full = PatchKnn(detector, PatchKnnConfig(subsample="none")).fit(train.images)
        # every bank row is one of the training patches
        assert nearest_distance(knn.bank, full.bank).max() < 1e-3


def test_bad_use_is_one_sentence():
    with pytest.raises(ReconadError, match="subsample"):
        PatchKnnConfig(subsample="kmeans")
    with pytest.raises(ReconadError, match="fit"):
        PatchKnn(build_detector(ModelConfig.tiny())).predict(np.zeros((1, 64, 64, 3), np.uint8))
