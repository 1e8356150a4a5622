"""IGSM / BIM, the paper's iterative attack: sign-gradient steps of ``step``, projected to the
budget and the valid intensity range, stopping at the first step that meets the success
criterion and otherwise keeping the best iterate (the loop lives in the base class)."""

from __future__ import annotations

from medis3d.attacks.base import Attack


class IGSM(Attack):
    """Iterative gradient sign method (Kurakin et al. 2017), as MedIS uses it."""

    name = "igsm"
    early_stop = True
