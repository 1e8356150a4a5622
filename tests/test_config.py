"""The attack's one configuration (medis3d.config.AttackConfig): built once from the command's options, checked in
one place, frozen, handed to fusion whole and written into the report as it is."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from medis3d.cli import ATTACK_OPTIONS, app
from medis3d.config import AttackConfig, check_budget
from medis3d.errors import InputError
from medis3d.members import PRESETS, Member


def _options(**given) -> dict:
    """The shared options as typer hands them to a command (each option's default), with ``given`` set."""
    p = {name: getattr(option, "default", None) for name, (_, option) in ATTACK_OPTIONS.items()}
    return p | given


def test_options_become_one_frozen_config_with_the_presets_settings():
    config = AttackConfig.from_options(_options(preset="reliable", restarts=3, eps="8/255"))
    reliable = PRESETS["reliable"]
    assert config.preset == "reliable" and config.steps == reliable.steps and config.select == reliable.select
    assert config.eps == pytest.approx(8 / 255) and config.step == reliable.step
    # --restarts reaches every APGD member that does not set its own
    assert config.members == tuple(Member.parse(f"{m.split('[')[0]}[restarts=3]" if "[" not in m else m.replace("]", ",restarts=3]")).name
                                   for m in reliable.members)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 1.0  # type: ignore[misc]
    assert json.loads(json.dumps(config.as_dict()))["members"] == list(config.members)


def test_explicit_settings_override_the_preset_and_members_are_named_once():
    config = AttackConfig.from_options(_options(members="apgd:js[radii=sea],adam:cosine", steps=7, step="2/255",
                                                select="strongest", memory_budget="1GB"))
    assert config.members == ("apgd:js[radii=sea]", "adam:cosine")
    assert (config.steps, config.step, config.select, config.memory_budget) == (7, pytest.approx(2 / 255), "strongest", 2**30)
    assert AttackConfig(losses="ce,dice", attacks=("pgd",)).members == ("pgd:ce", "pgd:dice")


@pytest.mark.parametrize("given, message", [
    ({"eps": "0"}, "--eps must be positive"),
    ({"eps": "8/0"}, "--eps must be a number"),
    ({"step": "-1/255"}, "--step must be positive"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"norm": "l1"}, "--norm must be linf or l2"),
    ({"eps_units": "hu"}, "--eps-units must be"),
    ({"select": "best"}, "--select must be one of least, strongest"),
    ({"together": 0}, "--together must be at least 1"),
    ({"output_format": "png"}, "--output-format must be"),
    ({"seg_format": "rtstruct"}, "--seg-format must be"),
    ({"preset": "strong"}, "--preset must be one of"),
    ({"members": "apgd:nope"}, "unknown loss 'nope'"),
    ({"memory_budget": "lots"}, "--memory-budget must be a size"),
    ({"restarts": 0}, "--restarts must be at least 1"),
    # only APGD members restart: with none that would take it, --restarts changed nothing and said nothing
    ({"preset": "paper", "restarts": 3}, "--restarts 3: no member takes it"),
    ({"members": "pgd:ce,apgd:js[restarts=2]", "restarts": 3}, "--restarts 3: no member takes it"),
    # a seed of a member that draws nothing at random: igsm:ce[seed=5] and apgd:js[seed=5] ran as without it
    ({"members": "igsm:ce[seed=5]"}, "seed= changes nothing"),
    ({"members": "apgd:js[seed=5]"}, "seed= changes nothing"),
    ({"success": 50.0}, "--success is a mean IoU from 0 to 1"),  # a percentage: every first step was a success
    ({"success": -0.1}, "--success is a mean IoU from 0 to 1"),
    ({"norm": "l2"}, "--norm l2 needs --eps, an L2 radius"),  # 10/255 was the L2 length of the whole perturbation
    ({"eps_units": "native"}, "--eps-units native needs --eps"),  # 10/255 was 0.04 HU
])
def test_every_bad_option_is_one_line_from_one_place(given, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as caught:
        AttackConfig.from_options(_options(**given))
    assert "\n" not in str(caught.value)


def test_fusion_and_the_config_check_the_same_way():
    """MedIS checks its budget with the config's function: the same message for the same mistake."""
    from medis3d.fusion import MedIS

    with pytest.raises(InputError) as by_config:
        check_budget(1 / 255, 1 / 255, 1, norm="l3")
    with pytest.raises(InputError) as by_fusion:
        MedIS(None, eps=1 / 255, norm="l3")  # type: ignore[arg-type]
    assert str(by_config.value) == str(by_fusion.value)


def test_the_report_holds_the_config_as_run(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out), "--members",
                                      "pgd:ce,apgd:js", "--eps", "16/255", "--steps", "2", "--restarts", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    config = report["attack"]["config"]
    assert config["members"] == report["attack"]["members"] == ["pgd:ce", "apgd:js[restarts=2]"]
    assert config["eps"] == pytest.approx(16 / 255) and config["steps"] == 2 and config["preset"] == "default"
    assert config["label"] is None and config["output_format"] == "auto"


def test_a_dicom_seg_needs_the_adversarial_dicom_series_it_references():
    """--seg-format dicom with --output-format nifti wrote prediction_adversarial.dcm referencing the source series
    (no adversarial DICOM series existed to reference); it is refused before any attack."""
    import numpy as np

    from medis3d.io.volume import Volume

    series = Volume(np.zeros((1, 4, 4, 4), np.float32), np.eye(4), path=None, format="dicom")
    assert AttackConfig(seg_format="dicom").formats(series) == ("dicom",)
    assert AttackConfig(seg_format="dicom", output_format="both").formats(series) == ("dicom", "nifti")
    with pytest.raises(InputError, match="--seg-format dicom .* --output-format nifti does not write") as caught:
        AttackConfig(seg_format="dicom", output_format="nifti").formats(series)
    assert "\n" not in str(caught.value)


def test_a_seed_is_taken_where_the_member_draws_at_random():
    """A seed counts for a random start, APGD's restarts (also from --restarts) and PGD, which always starts at random."""
    for members, restarts in (("igsm:ce[random_start=1,seed=5]", None), ("pgd:ce[seed=5]", None),
                              ("apgd:js[restarts=2,seed=5]", None), ("apgd:js[seed=5]", 3)):
        config = AttackConfig.from_options(_options(members=members, restarts=restarts))
        assert "seed=5" in config.members[0]


@pytest.mark.parametrize("command", ["attack", "evaluate", "diagnose"])
def test_the_default_budget_is_refused_where_it_would_mean_another_size(command, tiny_bundle, scan_file, tmp_path):
    """--eps left out means 10/255 (8/255 in diagnose, 1/255..8/255 in evaluate) of the model's range under L-inf;
    under --norm l2 or --eps-units native attack and evaluate took that number as an L2 radius or scan units (on the
    tests' scan an L2 ball of 15.7 HU, or 0.04 HU: Dice 1.000 -> 0.9997 or 1.000, reported as not broken), where
    diagnose refused it: now every command refuses it, one line, nothing written."""
    out = tmp_path / "out"
    source = str(scan_file.parent) if command == "evaluate" else str(scan_file)
    for given, message in ((["--norm", "l2"], "--norm l2 needs --eps"), (["--eps-units", "native"], "--eps-units native needs --eps")):
        result = CliRunner().invoke(app, [command, source, "--bundle", str(tiny_bundle), "--out", str(out), *given])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not out.exists()


def test_evaluate_refuses_a_success_threshold_outside_0_to_1(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["evaluate", str(scan_file.parent), "--bundle", str(tiny_bundle), "--out", str(out),
                                      "--success", "50", "--quiet"])
    assert result.exit_code == 2 and "--success is a mean IoU from 0 to 1, got 50" in result.output and not out.exists()
