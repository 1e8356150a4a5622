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
}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("eps", [16, 64])
def test_our_attack_is_as_strong_as_a_plain_one(problem, tiny_target, name, eps):
    model, hu, volume, reference = problem
    member, run_plain, steps, per8 = ATTACKS[name]
    step = eps if per8 is None else per8 * max(1.0, eps / 8)  # FGSM takes its one step of eps
    ours = torch.from_numpy(_ours(tiny_target, volume, member, eps, steps, step))
    theirs = run_plain(model, hu, eps * UNIT, steps, step * UNIT)
    for x in (ours, theirs):  # both inside the same ball, as stored
        assert float((x - torch.from_numpy(hu.astype(np.float32))).abs().max()) <= math.floor(eps * UNIT) + 1e-3
    dice_ours, dice_plain = plain.dice(model.predict(ours), reference), plain.dice(model.predict(theirs), reference)
    assert dice_plain < (0.95 if eps == 16 else 0.5), (name, dice_plain)  # the plain attack itself works
    assert dice_ours <= dice_plain + TOLERANCE, f"{member} at {eps}/255: Dice {dice_ours:.3f}, the plain {name} {dice_plain:.3f}"


def test_dice_falls_to_near_zero_at_a_finite_budget(problem, tiny_target):
    """The eps sweep of our strongest single member: Dice falls with the budget, no flat stretch, and reaches
    about zero (a model that keeps its Dice at any budget masks its gradient)."""
    model, hu, volume, reference = problem
    sweep = {}
    for eps in (8, 32, 128):
        sweep[eps] = plain.dice(model.predict(torch.from_numpy(_ours(tiny_target, volume, "apgd:ce", eps, 10, 1.0))), reference)
    assert sweep[8] > sweep[32] + 0.1 and sweep[32] > sweep[128], sweep
    assert sweep[128] <= 0.1, sweep
