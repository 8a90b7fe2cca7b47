"""BuildConfig validation, the TOML build profiles and the precedence defaults < profile < flags."""

from pathlib import Path

import pytest

from reconad.export.build_config import BuildConfig, load_build_profile, resolve_build_config
from reconad.runtime.errors import ReconadError

PROFILES = sorted((Path(__file__).resolve().parents[2] / "engines" / "profiles").glob("*.toml"))


def test_the_shipped_profiles_cover_the_targets_and_load():
    assert {path.stem for path in PROFILES} >= {"orin-nano", "orin-nx-agx", "thor", "x86-gpu"}
    for path in PROFILES:
        profile = load_build_profile(path)
        config = resolve_build_config(profile)
        assert profile.description and profile.name == path.stem
        assert config.precision == "fp16"
        assert config.timing_cache is not None and config.timing_cache.name.endswith(".timing-cache")


def test_defaults_profile_and_flags_take_precedence_in_that_order(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('description = "edge"\nworkspace_mib = 512\nmax_batch = 6\nopt_batch = 4\ndla_core = 0\n')
    profile = load_build_profile(path)
    assert profile.overrides == {"workspace_mib": 512, "max_batch": 6, "opt_batch": 4, "dla_core": 0}
    assert resolve_build_config() == BuildConfig()
    from_profile = resolve_build_config(profile)
    assert (from_profile.workspace_mib, from_profile.max_batch, from_profile.dla_core) == (512, 6, 0)
    assert from_profile.precision == BuildConfig().precision
    flagged = resolve_build_config(profile, workspace_mib=2048, max_batch=None, timing_cache=tmp_path / "t.cache")
    assert flagged.workspace_mib == 2048 and flagged.max_batch == 6
    assert flagged.timing_cache == tmp_path / "t.cache"


def test_a_max_batch_flag_pulls_the_profile_batches_down_with_it(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("min_batch = 2\nopt_batch = 4\nmax_batch = 8\n")
    config = resolve_build_config(load_build_profile(path), max_batch=1)
    assert (config.min_batch, config.opt_batch, config.max_batch) == (1, 1, 1)
    with pytest.raises(ReconadError, match="min_batch <= opt_batch <= max_batch"):
        resolve_build_config(load_build_profile(path), opt_batch=16)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batchh = 4\n", r"build profile .*bad.toml has unknown key\(s\) 'max_batchh'"),
        ('max_batch = "4"\n', "key max_batch must be an integer"),
        ("version_compatible = 1\n", "key version_compatible must be true or false"),
        ("workspace_mib = true\n", "key workspace_mib must be an integer"),
        ("max_batch = \n", "is not valid TOML"),
        ('precision = "int4"\n', "precision must be one of"),
        ("builder_optimization_level = 9\n", "builder_optimization_level must be 0..5"),
        ("dla_core = 0\nhardware_compatible = true\n", "DLA engine cannot be hardware compatible"),
    ],
)
def test_bad_profiles_are_refused_in_one_sentence(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ReconadError, match=message) as caught:
        resolve_build_config(load_build_profile(path))
    assert "\n" not in str(caught.value)


def test_a_missing_profile_names_the_file(tmp_path):
    with pytest.raises(ReconadError, match="Cannot read build profile .*nope.toml"):
        load_build_profile(tmp_path / "nope.toml")


def test_config_validation():
    with pytest.raises(ReconadError, match="workspace_mib"):
        BuildConfig(workspace_mib=0)
    with pytest.raises(ReconadError, match="dla_core"):
        BuildConfig(dla_core=-1)
    with pytest.raises(ReconadError, match="network_typing"):
        BuildConfig(network_typing="loose")
    assert BuildConfig(timing_cache="x.cache").timing_cache == Path("x.cache")
