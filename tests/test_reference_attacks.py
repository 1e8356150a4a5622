"""medis3d's attacks against independent plain ones (``plain_attacks.py``: a few lines of torch with full autograd
through MONAI's transforms and ``sliding_window_inference``, no medis3d code) on the same tiny model, scan and
budget, scored the same independent way. An attack of ours that stops short of the plain one (a masked or
wrong gradient, a projection that wastes the budget, a stop before the budget is spent) fails here; and both
must take Dice to near zero at a finite budget (Carlini et al.'s first check)."""

from __future__ import annotations

import math

import numpy as np
import plain_attacks as plain
import pytest
import torch

from conftest import SCAN_AFFINE, TINY_CONFIG, save_nifti, synthetic_scan

from medis3d.fusion import MedIS
from medis3d.io import read_volume

UNIT = 400 / 255  # the tiny bundle's window is -100..300 HU: budgets in 1/255 of it
TOLERANCE = 0.05  # ours may be weaker by this much Dice at most (its loss is taken on the scan's grid, the plain one on the model's)


@pytest.fixture(scope="module")
def problem(tiny_target, tmp_path_factory):
    """The tiny bundle's network as MONAI runs it, the scan, its volume for medis3d, and the clean prediction."""
    model = plain.PlainModel(tiny_target.network, TINY_CONFIG, SCAN_AFFINE)
    hu, _ = synthetic_scan(7)
    volume = read_volume(save_nifti(tmp_path_factory.mktemp("ref") / "scan.nii.gz", hu))
    reference = model.predict(torch.from_numpy(hu.astype(np.float32))[None])
    return model, hu, volume, reference


def _ours(tiny_target, volume, member: str, eps: int, steps: int, step: float) -> np.ndarray:
    """Our member under the worst-case selection (every iteration run, its strongest iterate kept: IGSM too, whose
    perturbation grows step by step), at the same whole-HU budget as the plain attack."""
    result = MedIS(tiny_target, members_spec=member, eps=math.floor(eps * UNIT), eps_units="native", step=step * UNIT,
                   steps=steps, select="strongest")(volume)
    assert len(result.members[0].trace) == steps + 1  # no stop at the first success
    return result.members[0].adversarial


# (member, plain attack, iterations, step in 1/255 per unit of eps/8)
ATTACKS = {
    "fgsm": ("fgsm:ce", lambda m, hu, eps, steps, step: plain.fgsm(m, hu, eps), 1, None),
    "igsm": ("igsm:ce", lambda m, hu, eps, steps, step: plain.igsm(m, hu, eps, step, steps), 10, 1.0),
    "pgd": ("pgd:ce", lambda m, hu, eps, steps, step: plain.pgd(m, hu, eps, step, steps), 10, 2.0),
    "apgd": ("apgd:ce", lambda m, hu, eps, steps, step: plain.apgd(m, hu, eps, steps), 10, None),
    "adam": ("adam:ce", lambda m, hu, eps, steps, step: plain.adam(m, hu, eps, step, steps), 10, 2.0),
    "lowfreq": ("lowfreq:ce[factor=2]", lambda m, hu, eps, steps, step: plain.lowfreq(m, hu, eps, step, steps, 2), 10, 2.0),
    "dag": ("dag", lambda m, hu, eps, steps, step: plain.dag(m, hu, eps, step, steps), 10, 2.0),
    "segpgd": ("segpgd", lambda m, hu, eps, steps, step: plain.weighted_pgd(m, hu, eps, step, steps, "segpgd"), 10, 2.0),
    "cospgd": ("cospgd", lambda m, hu, eps, steps, step: plain.weighted_pgd(m, hu, eps, step, steps, "cospgd"), 10, 2.0),
    "fmn": ("fmn:ce", lambda m, hu, eps, steps, step: plain.fmn(m, hu, eps, step, steps), 10, 2.0),
}
# DAG scales each step by the gradient's largest entry, so most voxels barely move inside an L-inf ball: the plain DAG
# itself leaves 0.98 at 16/255 and 0.93 at 64/255 here (ours the same). It only has to lower Dice.
# FMN searches the smallest breaking radius: it starts at eps/4, grows while it fails (reaching eps by half the steps
# before its first success) and shrinks once it succeeds (measured: ours 0.726 / plain 0.730 at 16/255, 0.426 both
# at 64/255; before the radius and step were made to reach the budget, 0.872 / 0.890 and 0.489).
WORKS = {"dag": (0.99, 0.95)}


def _compare(problem, ours: np.ndarray, theirs: torch.Tensor, eps: int, member: str, plain_name: str,
             tolerance: float = TOLERANCE, works: tuple[float, float] = (0.95, 0.5)) -> None:
    """Both inside the same ball as stored; the plain attack works (Dice below ``works`` at 16 and 64/255); ours is
    at most ``TOLERANCE`` weaker."""
    model, hu, _, reference = problem
    ours_t = torch.from_numpy(ours)
    for x in (ours_t, theirs):
        assert float((x - torch.from_numpy(hu.astype(np.float32))).abs().max()) <= math.floor(eps * UNIT) + 1e-3
    dice_ours, dice_plain = plain.dice(model.predict(ours_t), reference), plain.dice(model.predict(theirs), reference)
    print(f"{member} at {eps}/255: Dice ours {dice_ours:.3f}, the plain {plain_name} {dice_plain:.3f}")  # shown with -s
    assert dice_plain < works[0 if eps == 16 else 1], (plain_name, dice_plain)  # the plain attack itself works
    assert dice_ours <= dice_plain + tolerance, f"{member} at {eps}/255: Dice {dice_ours:.3f}, the plain {plain_name} {dice_plain:.3f}"


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("eps", [16, 64])
def test_our_attack_is_as_strong_as_a_plain_one(problem, tiny_target, name, eps):
    model, hu, volume, reference = problem
    member, run_plain, steps, per8 = ATTACKS[name]
    step = eps if per8 is None else per8 * max(1.0, eps / 8)  # FGSM takes its one step of eps
    ours = _ours(tiny_target, volume, member, eps, steps, step)
    _compare(problem, ours, run_plain(model, hu, eps * UNIT, steps, step * UNIT), eps, member, name,
             works=WORKS.get(name, (0.95, 0.5)))


# The reliable preset's members, and a default member's random start: each against a plain APGD with the same loss
# (``bench/reference.LOSSES``), the same gradient path (``smooth``: through a stand-in of the resampling), a start of
# the same kind (``seed``: a random point of the ball, drawn independently), and the loss taken where medis3d takes
# it: on the scan's grid, the probabilities mapped back by MONAI's own inverse (``scan``) or, for SEA's spherical
# loss, the network's logits (``scan_raw``). So the match is closer than the model-grid one above.
MEMBERS = {
    "apgd:masked_spherical": ("masked_spherical", "standard", None, "scan_raw"),
    "apgd:js": ("js", "standard", None, "scan"),
    "apgd:margin": ("margin", "standard", None, "scan"),
    "apgd:ce[gradient=smooth]": ("ce", "smooth", None, "scan"),
    "apgd:masked_spherical[random_start=1]": ("masked_spherical", "standard", 0, "scan_raw"),
    "apgd:masked_spherical_logp": ("masked_spherical", "standard", None, "scan"),
}
# Ten APGD steps from the same start are chaotic at a large budget: the plain masked_spherical attack itself ended
# at Dice 0.327-0.360 at 64/255 over four runs whose starts differed by at most 5e-4 HU (0.872-0.876 at 16/255), and
# on another host CI measured ours at 0.361 against the plain one's 0.328 (here 0.351 against 0.346). So at
# 64/255 ours may trail one plain run by more than at 16/255; a masked gradient costs far more than either.
MEMBER_TOLERANCE = {16: 0.03, 64: 0.05}


@pytest.mark.parametrize("member", list(MEMBERS))
@pytest.mark.parametrize("eps", [16, 64])
def test_reliable_members_are_as_strong_as_plain_apgd(problem, tiny_target, member, eps):
    model, hu, volume, _ = problem
    loss, gradient, seed, grid = MEMBERS[member]
    ours = _ours(tiny_target, volume, member, eps, 10, eps)
    theirs = plain.apgd(model, hu, eps * UNIT, 10, loss, gradient, seed, grid)
    # two independent random starts end further apart than two attacks from the clean scan
    tolerance = MEMBER_TOLERANCE[eps] if seed is None else TOLERANCE
    _compare(problem, ours, theirs, eps, member, f"apgd:{loss} ({gradient} gradient, {grid} grid)", tolerance)


def test_masked_spherical_takes_the_networks_logits_as_sea_does(problem, tiny_target):
    """The spherical loss is not invariant to a shift of a voxel's logits: ``masked_spherical`` takes the network's
    own logits mapped back to the scan grid (SEA's), ``masked_spherical_logp`` the log-probabilities. Ours of each
    ends where the plain one of the same form does, and on this model the two forms end far apart (which one
    breaks more depends on the model: on the shipped brain SegResNet it is SEA's)."""
    model, hu, volume, reference = problem

    def ours(member: str) -> float:
        return plain.dice(model.predict(torch.from_numpy(_ours(tiny_target, volume, member, 16, 10, 16))), reference)

    raw, logp = ours("apgd:masked_spherical"), ours("apgd:masked_spherical_logp")
    plain_raw = plain.dice(model.predict(plain.apgd(model, hu, 16 * UNIT, 10, "masked_spherical", grid="scan_raw")), reference)
    assert abs(raw - plain_raw) <= MEMBER_TOLERANCE[16], (raw, plain_raw)  # not the log-probabilities in disguise
    assert logp < raw - 0.1, (logp, raw)


@pytest.mark.parametrize("eps", [16, 64])
def test_a_chained_member_is_as_strong_as_two_plain_apgd_runs_end_to_end(problem, tiny_target, eps):
    """``apgd:A[then=B]``: APGD ascending A for half the member's iterations, then the other half ascending B from A's
    strongest iterate; against a plain APGD with A whose strongest iterate starts a plain APGD with B. 20 iterations
    are 10 + 10: the passes of one loss's 20 (and one more, the second stage's start)."""
    model, hu, volume, _ = problem
    member = "apgd:masked_spherical_logp[then=js]"
    result = MedIS(tiny_target, members_spec=member, eps=math.floor(eps * UNIT), eps_units="native", step=eps * UNIT, steps=20,
                   select="strongest")(volume)
    assert len(result.members[0].trace) == 2 * (10 + 1)
    first = plain.apgd(model, hu, eps * UNIT, 10, "masked_spherical", grid="scan")
    theirs = plain.apgd(model, hu, eps * UNIT, 10, "js", grid="scan", start=first)
    _compare(problem, result.members[0].adversarial, theirs, eps, member, "apgd:masked_spherical then apgd:js", MEMBER_TOLERANCE[eps])


# An L2 ball (HU) on a float copy of the scan, so neither side rounds: an L2 step along g/||g|| spends its length where
# the gradient is large, so a gradient that lands on the wrong voxels (as the percentiles' own derivative did on the
# real T1) shows here as a weaker attack than the plain one.
@pytest.mark.parametrize("eps", [1500.0, 6000.0])
def test_l2_apgd_is_as_strong_as_a_plain_one(problem, tiny_target, tmp_path, eps):
    model, hu, _, reference = problem
    scan = hu.astype(np.float32)
    volume = read_volume(save_nifti(tmp_path / "scan_float.nii.gz", scan))
    result = MedIS(tiny_target, members_spec="apgd:ce", eps=eps, eps_units="native", steps=10, norm="l2", select="strongest")(volume)
    ours = torch.from_numpy(result.members[0].adversarial)
    theirs = plain.apgd_l2(model, scan, eps, 10)
    x0 = torch.from_numpy(scan)[None]
    for x in (ours, theirs):
        assert float((x - x0).norm()) <= eps * (1 + 1e-5)
    dice_ours, dice_plain = plain.dice(model.predict(ours), reference), plain.dice(model.predict(theirs), reference)
    print(f"apgd:ce in an L2 ball of {eps:g} HU: Dice ours {dice_ours:.3f}, the plain one {dice_plain:.3f}")  # shown with -s
    assert dice_plain < (0.95 if eps < 5000 else 0.5)  # the plain attack itself works
    assert dice_ours <= dice_plain + MEMBER_TOLERANCE[16]



# FGSM, IGSM and PGD in an L2 ball (HU, a float scan) against plain ones stepping along g/||g|| (steps of a tenth of
# eps, a fifth for PGD, as the L-inf table doubles PGD's), both with the loss on the scan's grid.
L2_ATTACKS = {
    "fgsm": ("fgsm:ce", lambda m, scan, eps: plain.fgsm_l2(m, scan, eps), 1, 1.0),
    "igsm": ("igsm:ce", lambda m, scan, eps: plain.igsm_l2(m, scan, eps, eps / 10, 10), 10, 0.1),
    "pgd": ("pgd:ce", lambda m, scan, eps: plain.pgd_l2(m, scan, eps, eps / 5, 10), 10, 0.2),
}


@pytest.mark.parametrize("name", list(L2_ATTACKS))
@pytest.mark.parametrize("eps", [1500.0, 6000.0])
def test_l2_step_attacks_are_as_strong_as_plain_ones(problem, tiny_target, tmp_path, name, eps):
    model, hu, _, reference = problem
    member, run_plain, steps, step = L2_ATTACKS[name]
    scan = hu.astype(np.float32)
    volume = read_volume(save_nifti(tmp_path / "scan_float.nii.gz", scan))
    result = MedIS(tiny_target, members_spec=member, eps=eps, eps_units="native", step=step * eps, steps=steps, norm="l2",
                   select="strongest")(volume)
    ours, theirs = torch.from_numpy(result.members[0].adversarial), run_plain(model, scan, eps)
    x0 = torch.from_numpy(scan)[None]
    for x in (ours, theirs):
        assert float((x - x0).norm()) <= eps * (1 + 1e-5)
    dice_ours, dice_plain = plain.dice(model.predict(ours), reference), plain.dice(model.predict(theirs), reference)
    print(f"{member} in an L2 ball of {eps:g} HU: Dice ours {dice_ours:.3f}, the plain one {dice_plain:.3f}")  # shown with -s
    assert dice_plain < (0.97 if eps < 5000 else 0.85)  # the plain attack itself works (FGSM: 0.934, 0.796)
    assert dice_ours <= dice_plain + MEMBER_TOLERANCE[16]


def test_dice_falls_to_near_zero_at_a_finite_budget(problem, tiny_target):
    """The eps sweep of our strongest single member: Dice falls with the budget, no flat stretch, and reaches
    about zero (a model that keeps its Dice at any budget masks its gradient)."""
    model, hu, volume, reference = problem
    sweep = {}
    for eps in (8, 32, 128):
        sweep[eps] = plain.dice(model.predict(torch.from_numpy(_ours(tiny_target, volume, "apgd:ce", eps, 10, 1.0))), reference)
    assert sweep[8] > sweep[32] + 0.1 and sweep[32] > sweep[128], sweep
    assert sweep[128] <= 0.1, sweep
