"""bench/strength.py's reliable figure is the per-volume worst case as ``medis3d evaluate`` reports it: the member
that leaves the lowest Dice (ties by mean IoU), a success where any member succeeded."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import strength  # noqa: E402  (bench/strength.py)


def test_the_reliable_figure_is_the_member_with_the_lowest_dice_and_any_members_success(tmp_path, monkeypatch):
    """On a model with several classes the member with the lowest mean IoU need not leave the lowest Dice: A leaves
    Dice 0.50 (IoU 0.50), B 0.571 (IoU 0.40, a success). The figure was B's Dice, chosen by mean IoU; it is A's now,
    and the volume counts as broken, as B broke it."""
    members = {m.name: m for m in strength.PRESETS["reliable"].parsed()}
    outcomes = dict(zip(members, [(0.5, 0.5, False), (4 / 7, 0.4, True)] + [(0.9, 0.8, False)] * (len(members) - 2)))
    runner = strength.Runner(tmp_path, quick=False)

    def member(case, spec, eps, steps, select="strongest", what=""):
        dice, iou, success = outcomes[spec]
        return {"dice": dice, "mean_iou": iou, "success": success, "evaluations": 10, "gradient_passes": 10,
                "linf_255": eps, "key": {"member": spec}}

    monkeypatch.setattr(runner, "member", member)
    fused = runner.fusion(None, "reliable", 8)
    assert fused["dice"] == 0.5 and fused["success"]
