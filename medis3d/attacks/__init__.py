"""Attacks, one per file, on a common base (:mod:`medis3d.attacks.base`)."""

from medis3d.attacks.apgd import APGD
from medis3d.attacks.base import Attack, BestIterate, Budget, Goal, MemberResult, StepRecord
from medis3d.attacks.cospgd import CosPGD
from medis3d.attacks.dag import DAG
from medis3d.attacks.fgsm import FGSM
from medis3d.attacks.igsm import IGSM
from medis3d.attacks.pgd import PGD
from medis3d.attacks.segpgd import SegPGD

ATTACKS = {"igsm": IGSM, "bim": IGSM, "fgsm": FGSM, "pgd": PGD, "segpgd": SegPGD, "cospgd": CosPGD, "apgd": APGD, "dag": DAG}
# Attacks that bring their own loss: one member each, whatever --losses says.
OWN_LOSS = {name for name, cls in ATTACKS.items() if not cls.uses_loss}

__all__ = ["ATTACKS", "OWN_LOSS", "APGD", "Attack", "BestIterate", "Budget", "CosPGD", "DAG", "FGSM", "Goal", "IGSM", "MemberResult", "PGD", "SegPGD", "StepRecord"]
