"""MedIS: fusion selection rules, and real attacks on a small trained network."""

import dataclasses

import numpy as np
import pytest

from medis3d.attacks import MemberResult
from medis3d.errors import InputError
from medis3d.fusion import MedIS, select_member
from medis3d.io import read_volume
from medis3d.metrics import dice_per_class


def member(loss, success, steps, linf, score):
    empty = np.zeros((1, 2, 2, 2), np.float32)
    return MemberResult("igsm", loss, success, steps, empty, empty[0].astype(np.uint8), score, linf)


def test_selection_prefers_fewest_steps_among_successful():
    members = [member("a", True, 5, 5.0, 0.2), member("b", False, 2, 2.0, 0.9), member("c", True, 3, 3.0, 0.45)]
    assert select_member(members, goal_targeted=False) == 2


def test_selection_ties_broken_by_better_score():
    members = [member("a", True, 3, 3.0, 0.40), member("b", True, 3, 3.0, 0.10)]
    assert select_member(members, goal_targeted=False) == 1
    assert select_member(members, goal_targeted=True) == 0  # targeted: higher IoU with the target is better


def test_selection_when_none_succeeded_keeps_strongest():
    members = [member("a", False, 10, 10.0, 0.7), member("b", False, 10, 10.0, 0.55), member("c", False, 10, 9.0, 0.8)]
    assert select_member(members, goal_targeted=False) == 1
    assert select_member(members, goal_targeted=True) == 2


def test_selection_by_perturbation_size_across_attacks():
    """An attack with big steps (APGD) succeeds in fewer steps but with a larger L-inf: least perturbation wins."""
    members = [member("a", True, 2, 8.0, 0.3), member("b", True, 5, 5.0, 0.45)]
    assert select_member(members, goal_targeted=False) == 1
    l2 = [dataclasses.replace(members[0], l2_native=1.0), dataclasses.replace(members[1], l2_native=9.0)]
    assert select_member(l2, goal_targeted=False, norm="l2") == 0


def test_strongest_selection_is_the_worst_case_over_members():
    members = [member("a", True, 3, 3.0, 0.45), member("b", True, 8, 8.0, 0.1), member("c", False, 8, 8.0, 0.6)]
    assert select_member(members, goal_targeted=False) == 0
    assert select_member(members, goal_targeted=False, select="strongest") == 1
    assert select_member(members, goal_targeted=True, select="strongest") == 2


def test_bad_options_are_input_errors(tiny_target):
    with pytest.raises(InputError, match="unknown loss"):
        MedIS(tiny_target, losses="dice,nope")
    with pytest.raises(InputError, match="eps"):
        MedIS(tiny_target, eps=0)
    with pytest.raises(InputError, match="--select"):
        MedIS(tiny_target, select="best")


def _dice(target, pred, ref):
    return dice_per_class(target.masks(pred), target.masks(ref))[0]


def test_untargeted_fusion_lowers_dice_within_budget(tiny_target, scan_file):
    vol = read_volume(scan_file)
    medis = MedIS(tiny_target, losses="dice,ce", eps=24 / 255, step=4 / 255, steps=8)
    result = medis(vol)
    assert len(result.members) == 2 and all(len(m.trace) >= 2 for m in result.members)
    clean = result.clean_prediction
    adv_pred = tiny_target.predict(result.adversarial)
    assert _dice(tiny_target, adv_pred, clean) < 0.8
    delta = result.adversarial.array - vol.array
    assert np.abs(delta).max() <= result.eps_native + 1e-4  # int16 scan: rounded toward the clean scan at the ball's edge
    assert np.array_equal(result.adversarial.array, np.round(result.adversarial.array))  # as stored: integers
    assert result.eps_native == pytest.approx(24 / 255 * 400)


def test_targeted_background_attack_moves_towards_target(tiny_target, scan_file):
    vol = read_volume(scan_file)
    result = MedIS(tiny_target, losses="dice", eps=32 / 255, step=4 / 255, steps=8)(vol, target_mask="background")
    chosen = result.chosen
    first, last = chosen.trace[0].score, chosen.score
    assert last > first  # mean IoU against the all-background target went up
    assert tiny_target.masks(chosen.prediction).sum() < tiny_target.masks(result.clean_prediction).sum()


def test_early_stop_at_success_and_best_iterate_kept(tiny_target, scan_file):
    vol = read_volume(scan_file)
    result = MedIS(tiny_target, losses="ce", eps=64 / 255, step=8 / 255, steps=10, success_threshold=0.95)(vol)
    m = result.chosen
    # a lenient threshold is met quickly: the attack stops at the first successful step
    assert m.success and m.steps == len(m.trace) - 1 and m.steps < 10
    assert [r.success for r in m.trace].index(True) == m.steps


@pytest.mark.parametrize("select", ["least", "strongest"])
@pytest.mark.parametrize("targeted", [False, True])
def test_recorded_outcomes_select_as_live_members(select, targeted):
    """A study's rows and the benchmark's cache select through the same rule as a live fusion."""
    from medis3d.fusion import MemberOutcome

    live = [member("a", True, 5, 5.0, 0.2), member("b", False, 2, 2.0, 0.9), member("c", True, 3, 3.0, 0.45),
            member("d", False, 9, 9.0, 0.1)]
    recorded = [MemberOutcome(m.success, m.score, m.steps, m.linf_native, m.l2_native) for m in live]
    index = select_member(live, goal_targeted=targeted, select=select)
    assert select_member(recorded, goal_targeted=targeted, select=select) == index
    assert index == {("least", False): 2, ("strongest", False): 3, ("least", True): 2, ("strongest", True): 1}[select, targeted]


def test_a_targeted_goal_is_not_reached_by_classes_empty_in_both():
    """Three foreground classes; the target puts class 1 where the clean prediction has none: the untouched clean
    prediction scored 0.668 (classes 2 and 3, empty in both, counted 1 each) and was a targeted success at 0.45."""
    from medis3d.attacks.base import Goal

    class Three:
        foreground_classes = [1, 2, 3]

        def masks(self, seg):
            return np.stack([seg == c for c in self.foreground_classes])

        def loss_target(self, seg):
            return seg

    aim = np.zeros((16, 16, 16), np.uint8)
    aim[2:8, 2:8, 2:8] = 1
    clean = np.zeros_like(aim)
    clean[10:14, 10:14, 10:14] = 1
    goal = Goal(Three(), reference=clean, aim=aim)
    assert goal.score(clean) == pytest.approx(1 / (216 + 64 + 1)) and not goal.succeeded(goal.score(clean))
    assert goal.succeeded(goal.score(aim)) and goal.score(aim) == 1.0
    background = Goal(Three(), reference=clean, aim=np.zeros_like(aim))  # an all-background target
    assert background.score(clean) == pytest.approx(1 / 65) and background.score(np.zeros_like(aim)) == 1.0
