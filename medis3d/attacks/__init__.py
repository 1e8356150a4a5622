"""Attacks, one optimiser per file on a common base (:mod:`medis3d.attacks.base`); the losses they
ascend are in :mod:`medis3d.losses`, so any attack runs with any loss."""

from medis3d.attacks.adam import Adam
from medis3d.attacks.apgd import APGD
from medis3d.attacks.base import Attack, BestIterate, Budget, Goal, MemberResult, Objective, StepRecord
from medis3d.attacks.dag import DAG
from medis3d.attacks.fgsm import FGSM
from medis3d.attacks.fmn import FMN
from medis3d.attacks.igsm import IGSM
from medis3d.attacks.lowfreq import LowFrequency
from medis3d.attacks.pgd import PGD

ATTACKS = {"igsm": IGSM, "bim": IGSM, "fgsm": FGSM, "pgd": PGD, "apgd": APGD, "adam": Adam, "fmn": FMN,
           "lowfreq": LowFrequency, "dag": DAG}
# Attacks named by their loss before attacks and losses were separated: PGD with that loss.
ALIASES = {"segpgd": ("pgd", "segpgd"), "cospgd": ("pgd", "cospgd")}
# Attacks that bring their own loss: one member each, whatever --losses says.
OWN_LOSS = {name for name, cls in ATTACKS.items() if not cls.uses_loss}

__all__ = ["ALIASES", "ATTACKS", "OWN_LOSS", "APGD", "Adam", "Attack", "BestIterate", "Budget", "DAG", "FGSM", "FMN", "Goal",
           "IGSM", "LowFrequency", "MemberResult", "Objective", "PGD", "StepRecord"]
