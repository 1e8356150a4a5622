"""The Python API a torchattacks user expects: exported names, a result that saves itself and
prints as a summary, write_volume, and no third-party warnings on import or attack."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import medis3d
from medis3d.errors import OutputError
from medis3d.fusion import MedIS, MedISResult
from medis3d.io import read_volume, write_volume


@pytest.fixture(scope="module")
def attacked(tiny_target, tmp_path_factory):
    from conftest import save_nifti, synthetic_scan

    hu, _ = synthetic_scan(7)
    scan = save_nifti(tmp_path_factory.mktemp("api") / "scan.nii.gz", hu)
    volume = read_volume(scan)
    result = MedIS(tiny_target, members_spec=["apgd:ce", "igsm:dice"], eps=24 / 255, step=4 / 255, steps=6)(volume)
    return volume, result


def test_public_names_are_exported():
    for name in ("read_volume", "write_volume", "load_bundle", "MedIS", "MedISResult", "Target"):
        assert name in medis3d.__all__
        assert getattr(medis3d, name) is not None
    assert medis3d.write_volume is write_volume and medis3d.MedISResult is MedISResult


def test_result_and_member_reprs_are_summaries(attacked):
    _, result = attacked
    text = repr(result)
    assert text.startswith("MedISResult(success=") and "array(" not in text and len(text) < 400
    assert result.chosen.name in text and f"members={len(result.members)}" in text
    for m in result.members:
        member_text = repr(m)
        assert member_text.startswith(f"MemberResult({m.name!r}, success=") and "array(" not in member_text
        assert len(member_text) < 200


def test_result_save_writes_a_new_folder_and_never_overwrites(attacked, tiny_target, tmp_path):
    volume, result = attacked
    out = result.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "adversarial.nii.gz", "perturbation.nii.gz", "prediction_adversarial.nii.gz", "prediction_clean.nii.gz", "result.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    back = read_volume(out / "adversarial.nii.gz")
    assert np.allclose(back.affine, volume.affine) and back.spatial_shape == volume.spatial_shape
    assert np.array_equal(back.array, result.adversarial.array)  # stored as the source stores it (int16)
    assert np.abs(back.array - volume.array).max() <= result.eps_native + 1e-4  # the budget holds in the file
    delta = nib.load(out / "perturbation.nii.gz")
    assert np.allclose(delta.affine, volume.affine)
    assert np.allclose(np.asarray(delta.dataobj), (back.array - volume.array)[0], atol=1e-4)
    predicted = np.asarray(nib.load(out / "prediction_adversarial.nii.gz").dataobj)
    assert predicted.dtype == np.uint8 and np.array_equal(predicted, result.chosen.prediction)
    assert np.array_equal(predicted, tiny_target.predict(back))  # the prediction of the written file
    summary = json.loads((out / "result.json").read_text())
    assert summary["chosen"] == result.chosen.name and summary["success"] == result.success
    assert [m["member"] for m in summary["members"]] == [m.name for m in result.members]
    assert summary["linf_native"] <= summary["eps_native"] + 1e-4 and summary["norm"] == "linf"
    from medis3d.io.nifti import nifti_description

    assert nifti_description(out / "adversarial.nii.gz") == f"ADVERSARIAL medis3d eps {result.eps_native:.4g} ({result.chosen.name})"

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    with pytest.raises(OutputError, match="not an empty folder"):
        result.save(out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    with pytest.raises(OutputError):
        result.save(out / "result.json")  # a file
    (tmp_path / "empty").mkdir()
    assert (result.save(tmp_path / "empty") / "result.json").is_file()  # an empty folder is fine


def test_write_volume_round_trip_and_refusals(attacked, tmp_path):
    volume, result = attacked
    path = write_volume(result.adversarial, tmp_path / "adv.nii.gz")
    back = read_volume(path)
    assert np.array_equal(back.array, result.adversarial.array) and np.allclose(back.affine, volume.affine)
    with pytest.raises(OutputError, match="already exists"):
        write_volume(volume, path)
    assert np.array_equal(read_volume(path).array, result.adversarial.array)  # untouched
    write_volume(volume, path, overwrite=True)
    assert np.array_equal(read_volume(path).array, volume.array)
    with pytest.raises(OutputError, match="never overwrites its input"):
        write_volume(result.adversarial, volume.path, overwrite=True)
    with pytest.raises(OutputError, match="DICOM output needs a DICOM source"):
        write_volume(volume, tmp_path / "series")
    assert not (tmp_path / "series").exists()


def test_write_volume_dicom_series(tmp_path):
    from test_dicom import make_series, stored_values

    folder = tmp_path / "ct"
    make_series(folder, stored_values())
    volume = read_volume(folder)
    shifted = volume.array + 10
    out = write_volume(volume, tmp_path / "derived", shifted, description="medis3d test")
    back = read_volume(out)
    assert back.format == "dicom" and np.allclose(back.affine, volume.affine)
    assert np.allclose(back.array, shifted, atol=1.0)
    assert back.meta["series_description"] == "medis3d test"
    assert back.meta["series_instance_uid"] != volume.meta["series_instance_uid"]  # a new series


def test_import_and_attack_print_no_third_party_warnings(tiny_bundle, tmp_path):
    """What a user sees with Python's default warning filters: nothing on stderr."""
    from conftest import save_nifti, synthetic_scan

    hu, _ = synthetic_scan(3)
    scan = save_nifti(tmp_path / "scan.nii.gz", hu)
    code = (
        "import medis3d\n"
        f"target = medis3d.load_bundle({str(tiny_bundle)!r})\n"
        f"result = medis3d.MedIS(target, members_spec=['apgd:ce'], eps=8 / 255, steps=2)(medis3d.read_volume({str(scan)!r}))\n"
        "print(result)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("MedISResult(success=")


def test_a_native_budget_without_a_step_takes_the_papers_step_of_the_models_range(tiny_target, scan_file):
    """MedIS(eps=24, eps_units="native") without a step: the paper's 1/255 of the model's range (1.57 HU on the tiny
    bundle's -100..300 window), not 1/255 HU, which the int16 scan would round away (IGSM would then report L-inf 0)."""
    from medis3d.fusion import MedIS
    from medis3d.io import read_volume

    result = MedIS(tiny_target, losses="ce", attacks="igsm", eps=24, eps_units="native", steps=4)(read_volume(scan_file))
    assert result.step_native == pytest.approx(400 / 255) and result.chosen.linf_native >= 4
    given = MedIS(tiny_target, losses="ce", attacks="igsm", eps=24, eps_units="native", step=3, steps=1)(read_volume(scan_file))
    assert given.step_native == 3.0


@pytest.mark.parametrize("options", [{"norm": "l2"}, {"eps_units": "native"}])
def test_the_api_needs_eps_where_the_default_would_be_no_budget(tiny_target, tiny_bundle, tmp_path, options):
    """``MedIS(norm="l2")``, ``AttackConfig(eps_units="native")`` and ``Diagnose`` without eps took 10/255 (8/255) (the L-inf default) as an
    L2 radius of the whole perturbation or as 0.04 HU: an attack that can change nothing, reported as robustness. They
    are refused, as the commands refuse ``--norm l2`` without ``--eps``; so is the bundle fragment under native units
    (its eps was 10/255 whatever the units). The L-inf default stays 10/255."""
    from monai.bundle import ConfigParser

    from medis3d.config import AttackConfig
    from medis3d.diagnose import Diagnose
    from medis3d.errors import InputError
    from medis3d.monai_workflow import fragment_path

    for build in (lambda: MedIS(tiny_target, losses="ce", **options), lambda: AttackConfig(**options),
                  lambda: Diagnose(tiny_target, **options)):
        with pytest.raises(InputError, match="needs --eps"):
            build()
    assert MedIS(tiny_target, losses="ce").eps == pytest.approx(10 / 255) == AttackConfig().eps
    assert MedIS(tiny_target, losses="ce", eps=2000, **options).eps == 2000
    if "eps_units" in options:
        parser = ConfigParser()
        parser.read_config([str(tiny_bundle / "configs" / "inference.json"), str(fragment_path())])
        parser.update({"bundle_root": str(tiny_bundle), "output_dir": str(tmp_path / "out"), "datalist": [],
                       "medis3d_attack#eps_units": "native", "medis3d_attack#device": "cpu"})
        with pytest.raises(InputError, match="needs --eps"):
            parser.get_parsed_content("medis3d_attack").run()
