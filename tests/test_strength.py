"""What makes attacks strong: members (attack x loss x options), SEA's APGD (random start, restarts,
progressive radius reduction), the gradient paths through the preprocessing (percentiles of any
size, smooth stand-ins), and presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles, Spacing
from typer.testing import CliRunner

from medis3d.attacks.apgd import SEA_RADII, stage_iterations
from medis3d.cli import app
from medis3d.errors import InputError
from medis3d.fusion import MedIS
from medis3d.io import read_volume
from medis3d.members import PRESETS, Member, parse_members, product, with_restarts
from medis3d.metrics import dice_per_class
from medis3d.preprocessing import PercentileScaling, quantile

runner = CliRunner()


def _dice(target, pred, ref) -> float:
    return dice_per_class(target.masks(pred), target.masks(ref))[0]


# -- members --------------------------------------------------------------------------------------
def test_member_names_round_trip_and_options_are_checked():
    m = Member.parse("apgd:masked_ce[restarts=2,radii=sea,random_start=1,steps=40]")
    assert m.attack == "apgd" and m.loss == "masked_ce"
    assert m.option("restarts") == 2 and m.option("radii") == "sea" and m.option("random_start") is True
    assert m.option("steps") == 40
    assert Member.parse(m.name) == m  # the name is the member
    assert Member.parse("pgd:ce[step=2/255]").option("step") == pytest.approx(2 / 255)
    assert Member.parse("segpgd") == Member("pgd", "segpgd")  # the old attack names are PGD with their loss
    assert Member.parse("dag").loss == "dag"
    assert [x.name for x in parse_members("apgd:ce[restarts=2,radii=sea],adam:cosine")] == [
        "apgd:ce[radii=sea,restarts=2]", "adam:cosine"]
    assert Member.parse("apgd:masked_spherical[then=js]").option("then") == "js"
    # a chain's steps were once run twice over and are now split: its evaluate rows are not those cached before
    from medis3d.study import Case, _cache_key

    case = Case("scan", Path(__file__), None)
    keys = [_cache_key(case, Member.parse(name), 8 / 255, {}) for name in ("apgd:ce[then=js]", "apgd:ce")]
    assert keys[0]["chain"] == "split" and "chain" not in keys[1]
    for bad in ("apgd:nope", "wobble:ce", "apgd:ce[speed=3]", "apgd:ce[radii=huge]", "apgd:ce[restarts=x]",
                "apgd:ce[then=nope]", "pgd:ce[then=js]",
                # options that parsed and did nothing: only APGD restarts and reduces radii, only the low-frequency
                # attack has cells, and APGD sets its own step (igsm:ce[restarts=4] ran as igsm:ce, named otherwise)
                "igsm:ce[restarts=4]", "pgd:ce[radii=sea]", "apgd:ce[factor=4]", "apgd:ce[step=2/255]",
                # FGSM takes one step of eps: fgsm:ce[steps=5] and fgsm:ce[step=2/255] ran as fgsm:ce (1 step, 25 HU)
                "fgsm:ce[steps=5]", "fgsm:ce[step=2/255]",
                # PGD always starts at random: pgd:ce[random_start=0] did all the same
                "pgd:ce[random_start=0]", "pgd:ce[random_start=1]",
                # values --step and --steps would refuse (a negative step descended the loss: mean IoU 0.978)
                "igsm:ce[step=-2/255]", "igsm:ce[step=0]", "pgd:ce[steps=0]", "apgd:ce[restarts=0]",
                "pgd:ce[transfer=1.5]", "lowfreq:ce[factor=0]"):
        with pytest.raises(InputError):
            Member.parse(bad)
    assert [x.name for x in product("igsm,cospgd", "ce,dice")] == ["igsm:ce", "igsm:dice", "pgd:cospgd"]
    assert [x.name for x in with_restarts([Member("apgd", "ce"), Member("igsm", "ce")], 3)] == ["apgd:ce[restarts=3]", "igsm:ce"]


def test_presets_name_valid_members():
    assert {"paper", "reliable"} <= set(PRESETS)
    assert [m.name for m in PRESETS["paper"].parsed()] == [
        "igsm:logcosh_dice", "igsm:bce_dice", "igsm:exp_log", "igsm:structure", "igsm:lovasz", "igsm:combined"]
    assert PRESETS["paper"].steps == 10 and PRESETS["paper"].step == pytest.approx(1 / 255)
    assert PRESETS["reliable"].select == "strongest"
    for preset in PRESETS.values():
        members = preset.parsed()
        # members that start at random draw their starts from different seeds (else they share one start)
        seeds = [m.option("seed", 0) for m in members if m.option("random_start") or (m.option("restarts") or 1) > 1]
        assert len(seeds) == len(set(seeds)), preset.name
    # the default makes no more gradient passes than the paper's six members of ten steps
    default, paper = PRESETS["default"], PRESETS["paper"]
    passes = sum((m.option("steps") or default.steps) * (m.option("restarts") or 1) for m in default.parsed())
    assert default.select == "least" and passes <= len(paper.members) * paper.steps


# -- SEA's APGD -----------------------------------------------------------------------------------
def test_radius_schedule_splits_iterations_3_3_4():
    assert stage_iterations(100, SEA_RADII) == [30, 30, 40]
    assert stage_iterations(10, SEA_RADII) == [3, 3, 4]
    assert sum(stage_iterations(7, SEA_RADII)) == 7


def test_apgd_with_radius_reduction_and_restarts_keeps_its_budget_and_is_deterministic(tiny_target, scan_file):
    volume = read_volume(scan_file)
    spec = "apgd:masked_ce[radii=sea,restarts=2,random_start=1]"

    def run():
        return MedIS(tiny_target, members_spec=spec, eps=16 / 255, steps=6, seed=5, select="strongest")(volume)

    result = run()
    member = result.chosen
    eps = result.eps_native
    # the wider balls are searched (and recorded as such) but never kept: the result is inside eps
    wide = [r for r in member.trace if not r.in_budget]
    assert wide and max(r.linf_native for r in wide) > eps * 1.2
    assert member.linf_native <= eps + 1e-4
    assert len(member.trace) == 2 * (6 + 3)  # two restarts, three stages of 2+2+2 iterations plus each stage's start
    assert _dice(tiny_target, tiny_target.predict(result.adversarial), result.clean_prediction) < 0.97
    again = run()
    assert np.array_equal(again.adversarial.array, result.adversarial.array)
    other = MedIS(tiny_target, members_spec=spec, eps=16 / 255, steps=6, seed=6, select="strongest")(volume)
    assert not np.array_equal(other.adversarial.array, result.adversarial.array)  # the seed drives the random starts
    # under the paper's least-perturbation selection a success is all that is needed: it stops there
    least = MedIS(tiny_target, members_spec=spec, eps=16 / 255, steps=6, seed=5)(volume).chosen
    assert least.success and least.trace[-1].success and len(least.trace) < len(member.trace)


def test_a_members_seed_is_added_to_the_runs_seed(tiny_target, scan_file):
    volume = read_volume(scan_file)
    assert Member.parse("apgd:js[random_start=1,seed=2]").option("seed") == 2

    def run(spec: str, seed: int) -> np.ndarray:
        return MedIS(tiny_target, members_spec=spec, eps=16 / 255, steps=2, seed=seed, select="strongest")(volume).adversarial.array

    offset = run("apgd:ce[random_start=1,seed=1]", 5)
    assert np.array_equal(offset, run("apgd:ce[random_start=1]", 6))
    assert not np.array_equal(offset, run("apgd:ce[random_start=1]", 5))


def test_apgd_masked_loss_steps_by_cross_entropy(tiny_target):
    from medis3d.attacks import APGD, Budget, Goal

    ref = np.zeros((4, 4, 4), np.uint8)
    goal = Goal(tiny_target, ref)
    budget = Budget(eps=1.0, step=0.1, steps=2)
    assert APGD(tiny_target, "masked_ce", budget, goal).track is not None  # masked: compared by plain CE
    assert APGD(tiny_target, "ce", budget, goal).track is None


# -- the gradient paths through the preprocessing ------------------------------------------------
@pytest.mark.parametrize("size", [(20, 20, 20), (110, 100, 100)])  # under and over MONAI's 1e6-voxel numpy switch
def test_percentile_scaling_equals_monai_with_a_gradient_at_any_size(size):
    """The same values as MONAI's, and the percentiles' gradient (exact, smoothed) at any size; held constant in the
    attack's standard path."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand((1, *size), generator=g) * 200 - 20
    ours = PercentileScaling(0.5, 99.5, 0.0, 1.0, clip=True)
    theirs = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)
    assert torch.allclose(ours(img), torch.as_tensor(theirs(img)).float(), atol=1e-5)
    assert float(quantile(img.reshape(-1), 0.995)) == pytest.approx(float(np.percentile(img.numpy(), 99.5)), rel=1e-6)
    leaf = img.clone().requires_grad_(True)
    for mode, reached in (("exact", 1), ("smooth", 100)):
        out = ours(leaf, mode)
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        # d(sum out)/dx includes the percentiles' own dependence on x: at the voxels the percentiles land on
        # (exact), or spread over the voxels near them (smooth); a detached percentile would give neither
        bound_voxels = (grad.abs() > 2 * grad.abs().median()).sum()
        assert bound_voxels >= reached, mode
    # the attack's standard path holds them constant (their own derivative, large on one or two voxels, took half
    # of an L2 step): every voxel then gets the same 1 / (high - low), the clip passed straight through
    (grad,) = torch.autograd.grad(ours(leaf, "standard").sum(), leaf)
    spread = float(quantile(img.reshape(-1), 0.995) - quantile(img.reshape(-1), 0.005))
    assert torch.allclose(grad, torch.full_like(grad, 1 / spread), rtol=1e-4)


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_quantile_is_numpys_percentile_with_ties_and_its_gradient_sums_to_one(kind):
    """One selection and the next value above it give numpy's linear percentile, ties included (a head's
    background: a third of the voxels 0; a uint8 scan: few distinct values); the gradient lands on the one or two
    order statistics with weights summing to one."""
    g = torch.Generator().manual_seed(2)
    if kind == "ties":
        flat = torch.randint(0, 6, (3001,), generator=g).float()
    else:
        flat = torch.rand(3001, generator=g) ** 3
        flat[:1000] = 0
    for q in (0.0, 0.0005, 0.005, 0.2, 0.333, 0.5, 0.9, 0.995, 0.9999, 1.0):
        assert float(quantile(flat, q)) == pytest.approx(float(np.percentile(flat.double().numpy(), 100 * q)), abs=1e-6), q
        leaf = flat.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(quantile(leaf, q), leaf)
        assert float(grad.sum()) == pytest.approx(1.0) and int((grad != 0).sum()) <= 2


def test_smooth_path_reaches_every_voxel_of_a_downsampled_scan_with_the_same_forward():
    from medis3d.preprocessing import DifferentiablePreprocessing, build_step

    pre = DifferentiablePreprocessing([build_step("Spacingd", {"keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"}),
                                       build_step("ScaleIntensityRangePercentilesd", {"keys": "image", "lower": 0.5, "upper": 99.5,
                                                                                        "b_min": 0.0, "b_max": 1.0, "clip": True})])
    g = torch.Generator().manual_seed(1)
    x = (torch.rand((1, 32, 32, 32), generator=g) * 100).requires_grad_(True)
    reached, values = {}, {}
    for path in ("standard", "smooth", "exact"):
        out = pre(MetaTensor(x, affine=torch.eye(4, dtype=torch.float64)), gradient=path)
        values[path] = out.detach().as_tensor()
        (grad,) = torch.autograd.grad((out * torch.rand(out.shape, generator=g)).sum(), x)
        reached[path] = float((grad != 0).float().mean())
    reference = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear")(MetaTensor(x.detach(), affine=torch.eye(4, dtype=torch.float64)))
    assert values["standard"].shape == reference.shape
    assert torch.equal(values["standard"], values["smooth"]) and torch.equal(values["standard"], values["exact"])
    assert reached["standard"] < 0.2  # the 2 mm grid's interpolation reads one voxel in eight
    assert reached["smooth"] == 1.0  # the box stand-in spreads it over every voxel a model voxel stands for


def test_smooth_and_transfer_members_lower_dice(tiny_target, scan_file):
    volume = read_volume(scan_file)
    result = MedIS(tiny_target, members_spec="apgd:ce[gradient=smooth],pgd:ce[transfer=0.5]", eps=24 / 255, steps=6,
                   select="strongest")(volume)
    for m in result.members:
        assert _dice(tiny_target, m.prediction, result.clean_prediction) < 0.98, m.name
        assert m.linf_native <= result.eps_native + 1e-4


def test_minimal_norm_member_finds_a_smaller_budget_than_it_was_given(tiny_target, scan_file):
    volume = read_volume(scan_file)
    result = MedIS(tiny_target, members_spec="fmn:margin", eps=64 / 255, step=4 / 255, steps=20, success_threshold=0.9)(volume)
    assert result.chosen.success
    assert result.chosen.linf_native < 0.8 * result.eps_native


# -- the command line ------------------------------------------------------------------------------
def test_attack_with_members_and_preset_on_the_command_line(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--members",
                                 "apgd:js[radii=sea],adam:cosine[step=2/255]", "--eps", "24/255", "--steps", "4",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output)
    assert report["attack"]["members"] == ["apgd:js[radii=sea]", "adam:cosine[step=2/255]"]
    assert {m["member"] for m in report["members"]} == set(report["attack"]["members"])
    assert 0 <= report["adversarial"]["flipped_fraction"] <= 1
    assert report["adversarial"]["flipped_fraction"] > report["clean"]["flipped_fraction"]
    paper = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--preset", "paper", "--steps", "1",
                                "--out", str(tmp_path / "p"), "--json"])
    assert paper.exit_code == 0, paper.output[-2000:]
    assert json.loads(paper.output)["attack"]["members"] == list(PRESETS["paper"].members)
    bad = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--preset", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "--preset" in bad.output and not (tmp_path / "n").exists()


# -- the budget holds in the stored file ---------------------------------------------------------------
@pytest.mark.parametrize("dtype,slope,intercept", [(np.uint8, 1.0, 0.0), (np.int16, 1.0, 0.0), (np.int16, 2.5, -1024.0),
                                                   (np.uint16, 0.7, 3.0)])
def test_quantising_keeps_the_perturbation_inside_the_ball(dtype, slope, intercept):
    from medis3d.io.volume import Volume

    rng = np.random.RandomState(0)
    info = np.iinfo(dtype)
    stored = rng.randint(max(info.min, -500), min(info.max, 500) + 1, size=(1, 6, 7, 8))
    clean = (stored * slope + intercept).astype(np.float32)
    volume = Volume(clean, np.eye(4), stored_dtype=np.dtype(dtype), slope=slope, intercept=intercept)
    eps = 6.98 * slope  # not a whole number of stored units: rounding to nearest would leave the ball
    x = clean + rng.uniform(-1, 1, clean.shape) * eps
    q = volume.quantise(x, clean, eps)
    assert np.abs(q - clean).max() <= eps + 1e-4
    assert np.allclose((q - intercept) / slope, np.rint((q - intercept) / slope), atol=1e-3)  # on the stored grid
    low, high = sorted((info.min * slope + intercept, info.max * slope + intercept))
    assert np.abs(volume.quantise(x) - np.clip(x, low, high)).max() <= abs(slope) / 2 + 1e-4  # without the ball: nearest
    assert np.abs(q - clean).max() > eps - abs(slope)  # and the ball is used up to its last stored unit


@pytest.mark.parametrize("dtype,slope,intercept", [(np.uint8, 1.0, 0.0), (np.int16, 2.5, -1024.0), (np.float32, 1.0, 0.0)])
def test_quantising_keeps_the_perturbation_inside_the_l2_ball(dtype, slope, intercept):
    """Rounding a perturbation spread thinly over many voxels lengthens it (each voxel's change grows to a whole
    stored unit or vanishes); the stored one keeps the L2 budget, its direction, and most of its length."""
    from medis3d.io.volume import Volume

    rng = np.random.RandomState(1)
    stored = rng.randint(0, 200, size=(1, 10, 11, 12))
    clean = (stored * slope + intercept).astype(np.float32)
    integer = np.issubdtype(dtype, np.integer)
    volume = Volume(clean, np.eye(4), stored_dtype=np.dtype(dtype), slope=slope if integer else 1.0,
                    intercept=intercept if integer else 0.0)
    delta = rng.uniform(-1, 1, clean.shape) * 0.8 * slope  # most voxels round to a whole unit: longer than delta
    eps = float(np.linalg.norm(delta))
    assert np.linalg.norm(volume.quantise(clean + delta) - clean.astype(np.float64)) > eps or not integer
    q = volume.quantise(clean + delta, clean, eps, norm="l2").astype(np.float64)
    change = q - clean
    assert np.linalg.norm(change) <= eps * (1 + 1e-9)
    assert np.linalg.norm(change) > 0.8 * eps
    assert np.allclose((q - intercept) / slope, np.rint((q - intercept) / slope), atol=1e-3) or not integer
    assert np.all(change * delta >= 0)  # each voxel moved (if at all) the way the attack moved it
    inside = clean + 0.1 * delta  # already inside once stored: rounded as without the ball
    assert np.array_equal(volume.quantise(inside, clean, eps, norm="l2"), volume.quantise(inside))


def test_attacks_keep_the_budget_exactly_in_the_written_file(tiny_target, scan_file, tmp_path):
    from medis3d.io import write_nifti

    volume = read_volume(scan_file)
    result = MedIS(tiny_target, members_spec="pgd:ce,apgd:ce,igsm:ce", eps=24 / 255, step=4 / 255, steps=3, select="strongest")(volume)
    assert result.eps_native != round(result.eps_native)  # 37.6 HU: rounding to nearest would give 38
    for m in result.members:
        assert np.abs(m.adversarial - volume.array).max() <= result.eps_native + 1e-4, m.name
    written = read_volume(write_nifti(result.adversarial, tmp_path / "adversarial.nii.gz"))
    assert np.abs(written.array - volume.array).max() <= result.eps_native + 1e-4
