"""The command line end to end on a small scan, and its handling of bad input."""

import html
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medis3d.cli import app, verdict
from medis3d.io import read_volume

runner = CliRunner()

REPORT_KEYS = {"schema", "input", "target", "attack", "clean", "adversarial", "perturbation", "success", "selected", "members", "time_s", "peak_memory_mb"}


def test_attack_end_to_end(tiny_bundle, scan_and_label, tmp_path):
    scan, label = scan_and_label
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["attack", str(scan), "--bundle", str(tiny_bundle), "--label", str(label), "--losses", "dice,ce",
              "--eps", "24", "--eps-units", "native", "--step", "4", "--steps", "6", "--out", str(out), "--json",
              "--together", "5"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert REPORT_KEYS <= set(report)
    assert report["schema"] == "medis3d.report/1"
    assert {"name", "targeted", "losses", "eps", "step", "steps", "eps_units"} <= set(report["attack"])
    # the two members shared every pass through the network (of --together 5, two: the members there are)
    assert report["attack"]["together"]["members"] == 2 and report["attack"]["together"]["largest"] == 2
    # each member's wall span holds the passes it shared: they overlap; its share is what it cost, and the shares add
    # up to no more than the attack's time (the spans had been all there was, summing to more)
    shares = [m["time_share_s"] for m in report["members"]]
    assert all(0 < m["time_share_s"] <= m["time_s"] + 1e-6 for m in report["members"])
    assert sum(shares) <= report["time_s"]
    assert {"linf_native", "l2_native", "linf_normalized"} <= set(report["perturbation"])
    assert {"loss", "success", "steps", "linf_normalized", "mean_iou"} <= set(report["members"][0])
    assert {"dice", "mean_iou", "hd95"} <= set(report["clean"])
    for name in ("adversarial.nii.gz", "perturbation.nii.gz", "prediction_clean.nii.gz", "prediction_adversarial.nii.gz", "report.json",
                 "overview.png", "report.html"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()  # self-contained: every figure embedded, nothing fetched
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page)
    assert 'id="overview"' in page and 'id="traces"' in page and 'id="histogram"' in page
    assert "time (s), its share of the shared passes" in page and "wall span (s), overlapping" in page
    assert html.escape(verdict(report), quote=True) in page and "reference = the label file" in page
    src = nib.load(str(scan))
    adv = nib.load(str(out / "adversarial.nii.gz"))
    assert adv.shape == src.shape and np.allclose(adv.affine, src.affine, atol=1e-5)
    assert adv.get_data_dtype() == src.get_data_dtype() == np.int16
    assert nib.aff2axcodes(adv.affine) == nib.aff2axcodes(src.affine)
    # the budget holds in the written file (int16: rounded toward the clean scan at the ball's edge)
    delta = adv.get_fdata() - src.get_fdata()
    assert np.abs(delta).max() <= 24 + 1e-4
    assert report["perturbation"]["linf_native"] == pytest.approx(np.abs(delta).max())
    pert = nib.load(str(out / "perturbation.nii.gz"))
    assert pert.get_data_dtype() == np.float32 and np.allclose(pert.get_fdata(), delta, atol=1e-4)
    # the adversarial prediction in the report is the model's prediction on the written file
    from medis3d.bundle import load_bundle

    pred = load_bundle(tiny_bundle).predict(read_volume(out / "adversarial.nii.gz"))
    written_pred = np.asarray(nib.load(str(out / "prediction_adversarial.nii.gz")).dataobj)
    assert np.array_equal(pred, written_pred)
    assert report["adversarial"]["dice"]["blob"] < report["clean"]["dice"]["blob"]
    # what the summary says, in words: against the threshold, the reference named, and what to try when it fails
    words = verdict(report)
    assert words.startswith("Attack succeeded" if report["success"] else "Attack not successful at this budget")
    assert f"mean IoU {report['adversarial']['mean_iou']:.3f}" in words and "reference = the label file" in words
    failed = {**report, "success": False, "attack": {**report["attack"], "reference": "clean prediction"}}
    words = verdict(failed)
    assert words.startswith("Attack not successful at this budget") and "> 0.5" in words
    assert "reference = the model's clean prediction" in words and "--preset reliable" in words
    targeted = {**report, "success": True, "attack": {**report["attack"], "targeted": True},
                "adversarial": {**report["adversarial"], "against_target": {"mean_iou": 0.62}}}
    assert f"mean IoU with the target 0.620 >= {report['attack']['success_threshold']:g}" in verdict(targeted)


@pytest.mark.parametrize("norm,eps,expected", [("linf", "24", "1/255 of the range"), ("l2", "600", "eps/10")])
def test_the_presets_step_is_a_size_in_any_units(tiny_bundle, scan_file, tmp_path, norm, eps, expected):
    """Without --step the preset's step (1/255 of the model's range) was taken in the native units of a native eps:
    IGSM stepped 1/255 HU, the int16 file rounded every step away, and the report called the model robust at 24 HU
    (L-inf 0). Now it is 1/255 of the range in any units (1.57 HU on the tiny bundle's -100..300 window), and under
    L2 a tenth of eps."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--attacks", "igsm", "--losses", "ce",
                                 "--norm", norm, "--eps", eps, "--eps-units", "native", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    step = report["attack"]["step_native"]
    if expected == "eps/10":
        assert step == pytest.approx(60.0) and 0.5 * 600 < report["perturbation"]["l2_native"] <= 600
        assert report["attack"]["step"] == pytest.approx(60.0)  # in eps's units: it said 0.0039, the unused 1/255
    else:
        assert step == pytest.approx(report["attack"]["native_per_normalized"] / 255) == pytest.approx(400 / 255)
        assert report["perturbation"]["linf_native"] >= 10  # ten steps of 1.57 HU, rounded to whole HU
    assert report["adversarial"]["mean_iou"] < 1.0 and report["attack"]["config"]["preset_step"] is True
    given = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--attacks", "igsm", "--losses", "ce",
                                "--norm", norm, "--eps", eps, "--eps-units", "native", "--step", "2", "--steps", "1",
                                "--out", str(tmp_path / "given")])
    assert given.exit_code == 0, given.output
    assert json.loads((tmp_path / "given" / "report.json").read_text())["attack"]["step_native"] == 2.0  # --step as given


def test_a_step_above_eps_is_a_step_of_eps_as_in_evaluate(tiny_bundle, scan_file, tmp_path):
    """``attack --eps 2/255 --step 4/255`` stepped by 4/255 where ``evaluate`` with the same options stepped by 2/255
    (it capped the step at each budget): the same scan, model and options left Dice 0.9418 in one and 0.9420 in the
    other. Both now step by eps (the member's own step= too), and the report says so."""
    def run(name: str, *options: str) -> dict:
        result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--eps", "2/255",
                                     "--steps", "6", "--success", "0", "--out", str(tmp_path / name), *options])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / name / "report.json").read_text())

    capped = run("eps", "--members", "igsm:ce", "--step", "2/255")
    for name, options in (("over", ("--members", "igsm:ce", "--step", "4/255")), ("own", ("--members", "igsm:ce[step=4/255]"))):
        over = run(name, *options)
        assert over["adversarial"]["mean_dice"] == capped["adversarial"]["mean_dice"]
        assert over["members"][0]["trace"] == capped["members"][0]["trace"]
        assert any("above eps (2/255): steps of eps were taken" in n for n in over["outputs"]["notices"])
    assert not any("above eps" in n for n in capped["outputs"]["notices"])


def test_a_smooth_member_on_a_preprocessing_without_a_stand_in_says_it_runs_as_standard(tiny_bundle, scan_file, tmp_path):
    """``apgd:ce[gradient=smooth]`` (one of reliable's members) on a bundle whose preprocessing has no step with a
    smooth stand-in (here the tiny bundle without its downsampling Spacing) took the standard path's gradient without
    a word, named as BPDA for the whole path; the report now says so, and says nothing where the stand-in exists."""
    import shutil

    bare = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bare)
    config = json.loads((bare / "configs" / "inference.json").read_text())
    transforms = config["preprocessing"]["transforms"]
    config["preprocessing"]["transforms"] = [t for t in transforms if t["_target_"] != "Spacingd"]
    (bare / "configs" / "inference.json").write_text(json.dumps(config))
    for bundle, expected in ((bare, True), (tiny_bundle, False)):
        out = tmp_path / f"out_{expected}"
        result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(bundle), "--members", "apgd:ce[gradient=smooth]",
                                     "--eps", "8/255", "--steps", "1", "--out", str(out)])
        assert result.exit_code == 0, result.output
        notices = json.loads((out / "report.json").read_text())["outputs"]["notices"]
        assert any("no step with a smooth stand-in" in n for n in notices) is expected, notices


def test_an_l2_attack_states_its_l2_everywhere(tiny_bundle, scan_file, tmp_path, monkeypatch):
    """Under --norm l2 the verdict, the members' table (terminal and page) and the adversarial file's description
    give the perturbation's L2, which holds in the written int16 file; report.html's histogram drew the L2 budget as
    per-voxel lines at ±600 (the largest voxel change was about 60) and now draws none, giving the L2 instead."""
    import medis3d.report

    figures = []
    monkeypatch.setattr(medis3d.report, "figure_png", lambda fig, show=medis3d.report.figure_png: figures.append(fig) or show(fig))
    out = tmp_path / "out"
    args = ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--members", "pgd:ce", "--norm", "l2", "--eps", "600",
            "--eps-units", "native", "--step", "150", "--steps", "3", "--out", str(out)]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    histogram = next(fig.axes[0] for fig in figures if fig.axes[0].get_xlabel().startswith("perturbation"))
    assert not [line for line in histogram.get_lines() if len(line.get_xdata()) and abs(line.get_xdata()[0]) == 600]
    assert histogram.get_xlim()[1] < 600 and "of budget 600" in histogram.get_legend().get_texts()[0].get_text()
    report = json.loads((out / "report.json").read_text())
    delta = nib.load(str(out / "adversarial.nii.gz")).get_fdata() - nib.load(str(scan_file)).get_fdata()
    l2 = float(np.linalg.norm(delta))
    assert 0 < l2 <= 600 and report["perturbation"]["l2_native"] == pytest.approx(l2, rel=1e-5)
    assert report["selected"]["l2_native"] == pytest.approx(l2, rel=1e-5) == report["members"][0]["l2_native"]
    assert report["members"][0]["l2_normalized"] == pytest.approx(l2 / report["attack"]["native_per_normalized"])
    words = f"L2 {l2:.4g} native units"
    assert words in verdict(report) and words in " ".join(result.output.split())  # the terminal wraps lines
    assert "L2 (native units)" in result.output and "L2 (native units)" in (out / "report.html").read_text()
    assert nib.load(str(out / "adversarial.nii.gz")).header["descrip"].tobytes().startswith(b"ADVERSARIAL medis3d L2 eps 600")
    # three iterations that did not succeed: the report says L2 attacks need more before this reads as robustness
    assert not report["success"] and any("L2 attacks converge slowly: 3 iterations" in n for n in report["outputs"]["notices"])
    # the notice counts each member's own iterations ([steps=N]), not --steps alone
    converged = runner.invoke(app, [*[a if a != "pgd:ce" else "pgd:ce[steps=100]" for a in args], "--quiet"])
    assert converged.exit_code == 0, converged.output
    report = json.loads((out / "report.json").read_text())
    assert not report["success"] and not any("converge slowly" in n for n in report["outputs"]["notices"])


def test_predict_writes_on_scan_grid(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "pred.nii.gz"
    result = runner.invoke(app, ["predict", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    pred = nib.load(str(out))
    src = nib.load(str(scan_file))
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    # the tiny bundle has no Invertd: its own prediction is on the model's grid, and predict says what it wrote instead
    assert "no Invertd" in result.output and "nearest model voxel" in result.output


def _bad(tmp_path, scan_file, tiny_bundle):
    bad_shape = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(bad_shape))
    nan_scan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(nan_scan))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    return [
        ([str(tmp_path / "missing.nii.gz")], "missing.nii.gz"),
        ([str(text)], "notes.nii.gz"),
        ([str(flat)], "flat.nii.gz"),
        ([str(nan_scan)], "NaN"),
        ([str(scan_file), "--label", str(bad_shape)], "bad_label.nii.gz"),
        ([str(scan_file), "--target", str(bad_shape)], "bad_label.nii.gz"),
        ([str(scan_file), "--losses", "dice,wobble"], "wobble"),
        ([str(scan_file), "--eps", "0"], "eps"),
        ([str(scan_file), "--eps", "-1"], "eps"),
        ([str(scan_file), "--eps", "ten"], "eps"),
        ([str(scan_file), "--roi", "23"], "23x23x23 windows"),  # the UNet cannot take an odd window
        ([str(scan_file), "--roi", "0"], "--roi sizes must be positive"),
        ([str(scan_file), "--step", "1/0"], "step"),
        ([str(scan_file), "--together", "0"], "--together"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(tiny_bundle, scan_file, tmp_path):
    for args, needle in _bad(tmp_path, scan_file, tiny_bundle):
        out = tmp_path / "never"
        result = runner.invoke(app, ["attack", *args, "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_input_is_never_overwritten(tiny_bundle, scan_file):
    before = scan_file.read_bytes()
    result = runner.invoke(app, ["predict", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(scan_file)])
    assert result.exit_code == 2 and "overwrite" in result.output
    assert scan_file.read_bytes() == before


def test_predict_into_a_folder_says_it_is_a_folder(tiny_bundle, scan_file, tmp_path):
    folder = tmp_path / "predictions"
    folder.mkdir()
    result = runner.invoke(app, ["predict", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(folder)])
    assert result.exit_code == 2 and "is a folder" in result.output and "prediction.nii.gz" in result.output
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["attack", "batch", "evaluate"])
def test_help_lists_every_registered_loss_and_attack(command):
    """The help of --losses and --attacks comes from the registries: nothing registered is missing, aliases say what they are."""
    from medis3d.attacks import ALIASES, ATTACKS
    from medis3d.losses import LOSSES

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    for name in LOSSES:
        assert re.search(rf"\b{name}\b", text), name
    assert "margin" in text and "igsm (also bim)" in text
    for name in ATTACKS:
        assert re.search(rf"\b{name}\b", text), name
    for alias, (attack, loss) in ALIASES.items():
        assert f"{alias} (= {attack}:{loss})" in text


def test_an_empty_reference_is_said_not_hidden_behind_a_dice_of_one(tiny_bundle, scan_and_label, tmp_path):
    """A reference without the structure (a label file with none of it, or a model that segments nothing) leaves
    nothing to take away: the attack still runs (it may add structure), and the run says why Dice stays 1.000."""
    scan, label = scan_and_label
    empty = tmp_path / "empty_label.nii.gz"
    source = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.zeros(source.shape, dtype=np.int16), source.affine), str(empty))
    notice = "has no blob voxels: there is nothing to take away"
    for reference, out in ((empty, tmp_path / "empty"), (label, tmp_path / "full")):
        result = runner.invoke(app, ["attack", str(scan), "--bundle", str(tiny_bundle), "--label", str(reference),
                                     "--steps", "1", "--out", str(out)])
        assert result.exit_code == 0, result.output
        notices = json.loads((out / "report.json").read_text())["outputs"]["notices"]
        said = " ".join(result.output.split())
        if reference == empty:
            assert any(notice in n and "the label file" in n for n in notices) and notice in said
        else:
            assert not any(notice in n for n in notices) and notice not in said


def test_a_budget_below_the_files_stored_step_says_no_voxel_can_change(tiny_bundle, tmp_path):
    """uint8 stored with slope 2 at eps 1/255 of the tiny bundle's 400-unit window (1.57 units): every change rounds
    back, and the attack said only "not successful", perturbation 0. A notice now says why, and what budget is enough."""
    from types import SimpleNamespace

    from conftest import SCAN_AFFINE, synthetic_scan

    hu = synthetic_scan(4)[0].astype(np.float64)
    image = nib.Nifti1Image(np.clip(np.round((hu + 100) / 2), 0, 255).astype(np.uint8), SCAN_AFFINE)
    image.header.set_slope_inter(2.0, -100.0)
    nib.save(image, str(tmp_path / "u8.nii.gz"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(tmp_path / "u8.nii.gz"), "--bundle", str(tiny_bundle), "--members", "pgd:ce",
                                 "--steps", "1", "--eps", "1/255", "--out", str(out)], terminal_width=300)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["perturbation"]["linf_native"] == 0.0
    words = ("the budget (eps 1.569 native units) is below the stored step of the file (2 native units: uint8 with slope 2), "
             "so no voxel of it can change and the attack cannot succeed; give at least --eps 1.28/255")
    assert report["outputs"]["notices"].count(words) == 1 and words in " ".join(result.output.split())
    from medis3d.workflow import _stored_step_notices

    volume = read_volume(tmp_path / "u8.nii.gz")
    at = lambda eps: SimpleNamespace(eps_native=eps, native_per_normalized=400 / 255, eps_native_per_channel=[eps],  # noqa: E731
                                     native_per_normalized_per_channel=[400 / 255])
    medis = SimpleNamespace(eps_units="normalized", norm="linf")
    assert _stored_step_notices(volume, at(1.28 / 255 * 400), medis) == []  # one step fits: nothing to say
    assert len(_stored_step_notices(volume, at(1.9), SimpleNamespace(eps_units="native", norm="l2"))) == 1  # L2 alike
    float_scan = volume.with_array(volume.array)
    float_scan.stored_dtype = np.dtype(np.float32)
    assert _stored_step_notices(float_scan, at(0.01), medis) == []  # a float file stores any change


def test_bundle_fragment_step_is_the_presets_under_native_units(tiny_bundle, scan_file, tmp_path):
    """The fragment's default step is the paper's 1/255 of the model's range whatever ``eps_units`` says, as
    ``attack``'s: it was a fixed 1/255 passed as the user's step, so ``#eps_units native`` stepped 1/255 HU, which
    the int16 scan rounded away (the volume reported unbroken, perturbation 0)."""
    from monai.bundle import ConfigParser

    from medis3d.monai_workflow import fragment_path

    parser = ConfigParser()
    parser.read_config([str(tiny_bundle / "configs" / "inference.json"), str(fragment_path())])
    out = tmp_path / "out"
    parser.update({"bundle_root": str(tiny_bundle), "output_dir": str(out), "datalist": [{"image": str(scan_file)}],
                   "medis3d_attack#eps_units": "native", "medis3d_attack#eps": 24, "medis3d_attack#steps": 2,
                   "medis3d_attack#losses": "ce", "medis3d_attack#device": "cpu"})
    parser.get_parsed_content("medis3d_attack").run()
    report = json.loads((out / "scan" / "report.json").read_text())
    assert report["attack"]["step_native"] == pytest.approx(400 / 255)  # the window -100..300 HU: 1/255 is 1.57 HU
    assert report["perturbation"]["linf_native"] > 0


def test_bundle_fragment_keeps_volumes_of_the_same_file_name_apart(tiny_bundle, tmp_path):
    """Datalist images named alike in different folders (``a/image.nii.gz``, ``b/image.nii.gz``) get a folder each:
    the second was attacked into the first's folder, replacing its outputs (one volume's results lost)."""
    from conftest import save_nifti, synthetic_scan

    from medis3d.monai_workflow import BundleAttack

    images = []
    for seed, folder in ((7, "a"), (8, "b")):
        (tmp_path / folder).mkdir()
        images.append(save_nifti(tmp_path / folder / "image.nii.gz", synthetic_scan(seed)[0]))
    out = tmp_path / "out"
    rows = BundleAttack(str(tiny_bundle), [{"image": str(p)} for p in images], str(out), losses="ce", steps=1,
                        device="cpu").run()
    assert len({r["output_dir"] for r in rows}) == 2
    for row, image in zip(rows, images):
        assert json.loads((Path(row["output_dir"]) / "report.json").read_text())["input"]["path"] == str(image)
