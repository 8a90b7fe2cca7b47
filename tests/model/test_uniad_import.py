import sys

import pytest
import torch

from reconad.model import load_detector, save_checkpoint
from reconad.model.uniad_import import import_uniad, map_official_key
from reconad.runtime.errors import ReconadError
from tests.model.official_layout import OfficialModel, official_checkpoint_payload


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    model = OfficialModel().eval()
    for module in model.backbone.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("official") / "ckpt.pth.tar"
    torch.save(official_checkpoint_payload(model), path)
    sys.modules.pop("easydict", None)  # the importer must not need easydict
    return model, path


def test_key_mapping():
    assert map_official_key("module.backbone._blocks.3._bn1.weight") == "backbone.net._blocks.3._bn1.weight"
    assert (
        map_official_key("module.reconstruction.transformer.decoder.layers.2.learned_embed.weight")
        == "reconstructor.decoder.2.query_embed.weight"
    )
    assert (
        map_official_key("module.reconstruction.transformer.encoder.layers.0.linear2.bias")
        == "reconstructor.encoder.0.ffn.linear2.bias"
    )
    assert (
        map_official_key("module.reconstruction.transformer.encoder.layers.1.self_attn.in_proj_weight")
        == "reconstructor.encoder.1.self_attn.in_proj_weight"
    )
    assert map_official_key("module.reconstruction.transformer.decoder.norm.weight") == "reconstructor.decoder_norm.weight"
    assert map_official_key("module.reconstruction.pos_embed.row_embed.weight") == "reconstructor.pos_embed.row_embed.weight"
    assert map_official_key("reconstruction.input_proj.weight") == "reconstructor.input_proj.weight"
    assert map_official_key("module.neck.something") is None


def test_imported_model_matches_the_official_forward(official):
    model, path = official
    detector = import_uniad(path)
    assert detector.config.preset == "uniad-224"
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        expected = model(images)
        anomaly_map, *_ = detector(images)
    assert (anomaly_map - expected).abs().max().item() <= 1e-4


def test_import_cli_writes_a_loadable_checkpoint(official, tmp_path):
    from typer.testing import CliRunner

    from reconad.train.cli import app

    _, path = official
    out = tmp_path / "model.ckpt"
    result = CliRunner().invoke(app, ["import-uniad", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    detector = load_detector(out)
    assert detector.config.preset == "uniad-224"
    assert detector.provenance["imported_from"] == str(path)


def test_import_refuses_a_wrong_file_in_one_sentence(tmp_path, tiny_detector):
    from typer.testing import CliRunner

    from reconad.train.cli import app

    ours = save_checkpoint(tiny_detector, tmp_path / "ours.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for bad in (ours, text, tmp_path / "missing.pth.tar"):
        result = CliRunner().invoke(app, ["import-uniad", str(bad), "--out", str(tmp_path / "x.ckpt")])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x.ckpt").exists()


def test_import_refuses_another_layout(official, tmp_path):
    model, _ = official
    payload = official_checkpoint_payload(model)
    payload["state_dict"]["module.reconstruction.input_proj.weight"] = torch.zeros(256, 720)
    bad = tmp_path / "b4-stages-1-5.pth.tar"
    torch.save(payload, bad)
    sys.modules.pop("easydict", None)
    with pytest.raises(ReconadError, match="does not match preset uniad-224"):
        import_uniad(bad)
