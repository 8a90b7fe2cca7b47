import pytest
import torch

from reconad.model import PRESETS, ModelConfig, build_detector
from tests.model.conftest import random_images

PRESET_SHAPES = {
    # preset: (features [C, h, w], tapped blocks of EfficientNet)
    "mvtec-512": ((720, 32, 32), (1, 5, 9, 21, 31)),
    "uniad-224": ((272, 14, 14), (1, 5, 9, 21)),
    "cifar-32": ((720, 8, 8), (1, 5, 9, 21, 31)),
    "lite0-256": ((512, 16, 16), (0, 2, 4, 10, 15)),
}


@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_preset_shapes(preset):
    config = PRESETS[preset]
    detector = build_detector(config).eval()
    features_shape, taps = PRESET_SHAPES[preset]
    assert detector.backbone.tap_blocks == taps
    assert config.channels == features_shape[0]
    images = random_images(config, 1)
    with torch.no_grad():
        features = detector.extract_features(images)
        anomaly_map, image_score, category, category_distance = detector(images)
    assert tuple(features.shape) == (1, *features_shape)
    assert category.dtype == torch.int64 and category.tolist() == [0] and category_distance.tolist() == [0.0]
    assert tuple(anomaly_map.shape) == (1, 1, *config.input_hw)
    assert anomaly_map.dtype == image_score.dtype == torch.float32
    assert tuple(image_score.shape) == (1,)
    assert torch.isfinite(anomaly_map).all() and (anomaly_map >= 0).all()


def test_mvtec_preset_matches_the_seed():
    config = PRESETS["mvtec-512"]
    assert (config.d_model, config.nhead, config.num_encoder_layers, config.num_decoder_layers) == (256, 8, 4, 4)
    assert config.dim_feedforward == 1024 and config.neighbor_size == (7, 7)
    assert config.backbone == "efficientnet-b4" and config.stage_channels == (24, 32, 56, 160, 448)


def test_any_batch_size_and_batch_independence(tiny_detector, tiny_config):
    images = random_images(tiny_config, 3)
    with torch.no_grad():
        batch_map, batch_score, _, _ = tiny_detector(images)
        for i in range(3):
            single_map, single_score, _, _ = tiny_detector(images[i : i + 1])
            torch.testing.assert_close(single_map[0], batch_map[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(single_score[0], batch_score[i], atol=1e-5, rtol=1e-5)
        # changing the other samples changes nothing for sample 0
        other = images.clone()
        other[1:] = 255 - other[1:]
        torch.testing.assert_close(tiny_detector(other)[0][0], batch_map[0], atol=1e-5, rtol=1e-5)


def test_the_category_head_names_the_nearest_centroid_of_the_pooled_features(tiny_detector, tiny_config):
    images = random_images(tiny_config, 6)
    with torch.no_grad():
        features = tiny_detector.extract_features(images)
        pooled = tiny_detector.pooled_features(features)
        assert torch.allclose(pooled.norm(dim=1), torch.ones(6))
        tiny_detector.fit_category_centroids(pooled, ["a", "a", "a", "b", "b", "c"], ["c", "a", "b"])
        centroids = tiny_detector.category_centroids
        assert centroids.shape == (3, tiny_config.channels) and torch.allclose(centroids.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(centroids[0], pooled[5])  # one image: its own direction
        torch.testing.assert_close(centroids[1], torch.nn.functional.normalize(pooled[:3].mean(0), dim=0))
        _, _, category, distance = tiny_detector(images)
        expected = 1 - pooled @ centroids.T  # [6, 3] cosine distances
        assert category.tolist() == expected.argmin(dim=1).tolist() and category[5] == 0
        torch.testing.assert_close(distance, expected.min(dim=1).values)
        assert distance[5].abs() < 1e-6 and (distance >= -1e-6).all() and (distance <= 2).all()
    with pytest.raises(ValueError, match="category 'd' has no training images"):
        tiny_detector.fit_category_centroids(pooled, ["a"] * 6, ["a", "d"])


def test_eval_is_deterministic(tiny_detector, tiny_config):
    images = random_images(tiny_config, 2)
    with torch.no_grad():
        first = tiny_detector(images)
        second = tiny_detector(images)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval(tiny_config):
    detector = build_detector(tiny_config).train()
    assert detector.training and detector.reconstructor.training
    assert not detector.backbone.training
    assert all(not m.training for m in detector.backbone.modules())
    stats_before = {k: v.clone() for k, v in detector.backbone.state_dict().items()}
    images = random_images(tiny_config, 2)
    features = detector.extract_features(images)
    loss = torch.nn.functional.mse_loss(detector.reconstructor(features), features)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in detector.backbone.parameters())
    assert all(p.grad is not None for p in detector.reconstructor.parameters())
    for key, value in detector.backbone.state_dict().items():
        assert torch.equal(value, stats_before[key]), f"{key} changed in training mode"


def test_feature_jitter_only_in_training(tiny_config):
    config = tiny_config.replace(dropout=0.0)
    detector = build_detector(config)
    features = detector.extract_features(random_images(config, 2)).detach()
    detector.train()
    assert not torch.equal(detector.reconstructor(features), detector.reconstructor(features))
    detector.eval()
    assert torch.equal(detector.reconstructor(features), detector.reconstructor(features))
    without_jitter = build_detector(config.replace(jitter_scale=0.0)).train()
    features = without_jitter.extract_features(random_images(config, 2))
    assert torch.equal(without_jitter.reconstructor(features), without_jitter.reconstructor(features))


def test_image_score_reducers(tiny_detector, tiny_config):
    features = tiny_detector.extract_features(random_images(tiny_config, 2))
    reconstruction = torch.zeros_like(features)
    anomaly_map, score = tiny_detector.score(features, reconstruction)
    k = tiny_config.score_pool_size
    expected = torch.nn.functional.avg_pool2d(anomaly_map, k, stride=1).flatten(1).max(dim=1).values
    torch.testing.assert_close(score, expected)
    mean_detector = build_detector(tiny_config.replace(score_reducer="mean")).eval()
    anomaly_map, score = mean_detector.score(features, reconstruction)
    torch.testing.assert_close(score, anomaly_map.mean(dim=(1, 2, 3)))


def test_anomaly_map_is_the_feature_distance(tiny_detector, tiny_config):
    features = torch.zeros(1, tiny_config.channels, *tiny_config.feature_hw)
    reconstruction = features.clone()
    reconstruction[0, :4, 2, 3] = 3.0  # distance sqrt(4 * 9) = 6 at token (2, 3)
    anomaly_map, _ = tiny_detector.score(features, reconstruction)
    stride = tiny_config.feature_stride
    # align_corners=True maps token (2, 3) exactly onto pixel (2, 3) * (H - 1) / (h - 1)
    h, H = tiny_config.feature_hw[0], tiny_config.input_hw[0]
    y, x = 2 * (H - 1) // (h - 1), 3 * (H - 1) // (h - 1)
    assert anomaly_map[0, 0, y, x] == pytest.approx(6.0, abs=1e-5) and stride == 8
    assert anomaly_map.max() == pytest.approx(6.0, abs=1e-5)


def test_config_round_trip_and_validation():
    for config in [*PRESETS.values(), ModelConfig.tiny()]:
        assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(input_hw=(500, 500))
    with pytest.raises(ValueError, match="hide every key"):
        ModelConfig(input_hw=(64, 64), feature_stride=16)
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="resnet50")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden_dim": 256})
