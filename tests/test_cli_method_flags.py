"""The CLI's method options come from the scorer registry: a scorer registered with a new parameter gets its flag."""

import pytest

from moeprune.cli import build_parser, main
from moeprune.methods import registry
from tiny_models import write_token_demos


@pytest.fixture
def extra_scorer(monkeypatch):
    """A third-party scorer with a float and a bool parameter, removed from the registry afterwards."""
    import moeprune.methods.scoring  # noqa: F401  (the built-in scorers register first)

    for table in (registry.SCORERS, registry.SPECS):
        monkeypatch.setitem(table, "test-tempered", None)  # taken out again after the test
    seen = []

    @registry.register_scorer("test-tempered")
    def tempered(profile, model=None, demos=None, temperature: float = 1.0, sharpen: bool = False, **_):
        seen.append((temperature, sharpen))
        return profile.stats["count"].double() ** (2 if sharpen else 1) / temperature

    return seen


def test_a_registered_scorer_gets_flags_for_its_parameters(extra_scorer, family_checkpoints, tmp_path, capsys):
    _, src = family_checkpoints["mixtral"]
    help_text = build_parser()._subparsers._group_actions[0].choices["select"].format_help()
    assert "--temperature TEMPERATURE" in help_text and "--sharpen, --no-sharpen" in help_text
    assert "test-tempered: temperature (default 1.0)" in " ".join(help_text.split())
    demos = write_token_demos(tmp_path / "d.jsonl")
    assert main(["profile", str(src), "--demos", str(demos), "--out", str(tmp_path / "p.safetensors"), "-q"]) == 0
    select = ["select", str(tmp_path / "p.safetensors"), "--keep", "4", "--out", str(tmp_path / "s.json"), "-q"]
    assert main(select + ["--method", "test-tempered", "--temperature", "0.25", "--sharpen"]) == 0
    assert main(select + ["--method", "test-tempered"]) == 0
    assert extra_scorer == [(0.25, True), (1.0, False)]  # only given flags are passed: the rest keep the defaults
    capsys.readouterr()
    assert main(select + ["--method", "frequency", "--temperature", "2"]) == 2
    assert "--temperature applies to --method test-tempered only" in capsys.readouterr().err
    assert main(select + ["--method", "test-tempered", "--seed", "3"]) == 2  # another method's flag
    assert "--seed applies to --method diep, random, uncurl only" in capsys.readouterr().err
    assert extra_scorer == [(0.25, True), (1.0, False)]
