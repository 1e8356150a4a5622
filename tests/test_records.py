"""report.json is the typed records of medis3d.records, filled in one place: every section of a real report has
exactly the keys its record declares (a key added to the report without its record, or the other way, fails)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medis3d import records
from medis3d.cli import app


def _keys(record: type) -> tuple[set[str], set[str]]:
    return set(record.__required_keys__), set(record.__optional_keys__)  # type: ignore[attr-defined]


def _conforms(value: dict, record: type, where: str) -> None:
    required, optional = _keys(record)
    assert required <= set(value) <= required | optional, (where, set(value) ^ required)


def test_a_targeted_and_an_untargeted_report_hold_exactly_their_records(tiny_bundle, scan_file, tmp_path):
    for name, extra in (("plain", []), ("targeted", ["--target", "background"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out),
                                          "--members", "pgd:ce", "--eps", "16/255", "--steps", "2", "--quiet", *extra])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        _conforms(report, records.AttackReport, "report")
        assert report["schema"] == "medis3d.report/1" and "output_dir" not in report  # the returned report says where
        for key, record in (("input", records.InputRecord), ("outputs", records.OutputsRecord), ("target", records.TargetRecord),
                            ("attack", records.AttackRecord), ("clean", records.SegmentationRecord),
                            ("adversarial", records.SegmentationRecord), ("selected", records.SelectedRecord)):
            _conforms(report[key], record, key)
        for member in report["members"]:
            _conforms(member, records.MemberRecord, "member")
            for step in member["trace"]:
                _conforms(step, records.TraceRecord, "trace")
        against = "against_target" in report["adversarial"]
        assert against == (name == "targeted") == report["attack"]["targeted"]
        if against:
            _conforms(report["adversarial"]["against_target"], records.TargetScores, "against_target")


def test_hd95_counts_an_erased_class_as_the_scans_diagonal():
    """Erasing a class is the worst an attack can do to its boundary: it was left out of HD95 (None), so an attack
    that erased one class and moved another by 1 voxel reported 1 mm where one that moved both by 3 reported 3."""
    import numpy as np

    from medis3d.metrics import hd95_per_class

    ref = np.zeros((2, 10, 10, 10), bool)
    ref[0, 2:5, 2:5, 2:5] = ref[1, 6:9, 6:9, 6:9] = True
    erased = np.zeros_like(ref)
    erased[1] = np.roll(ref[1], 1, axis=0)
    diagonal = float(np.linalg.norm(np.array([9, 9, 9]) * np.array([1.0, 1.0, 2.0])))
    values = hd95_per_class(erased, ref, (1.0, 1.0, 2.0))
    assert values[0] == pytest.approx(diagonal) and values[1] == pytest.approx(1.0)
    assert hd95_per_class(np.zeros_like(ref), np.zeros_like(ref), (1.0, 1.0, 1.0)) == [None, None]
