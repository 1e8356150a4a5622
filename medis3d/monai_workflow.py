"""medis3d inside MONAI's own bundle runner.

``medis3d bundle fragment`` prints the path of a config fragment that adds an ``attack``
workflow to any bundle::

    python -m monai.bundle run attack \\
        --config_file "['configs/inference.json', '<fragment>']" --dataset_dir DATA --output_dir OUT

It runs MedIS over the bundle's own ``datalist`` (its own image key), writing each volume's
adversarial scan, predictions and report into ``output_dir/<name>/`` (``<name>_2``... for a file named like an
earlier one), next to what the
bundle's inference writes, and ``medis3d_summary.json`` there. Its settings (losses, eps,
step, steps, eps_units, and members: ``attack:loss[options],...`` in place of IGSM with the
losses) can be overridden on the command line like any config value, e.g.
``--medis3d_attack#steps 20`` or ``--medis3d_attack#members apgd:masked_spherical,apgd:js``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medis3d.io.volume import make_names_unique, scan_name

FRAGMENT = Path(__file__).resolve().parent / "fragments" / "attack.json"


def fragment_path() -> Path:
    return FRAGMENT


class BundleAttack:
    """The ``attack`` workflow of the fragment: MedIS over a bundle's datalist."""

    def __init__(
        self,
        bundle_root: str,
        datalist: Sequence,
        output_dir: str,
        image_key: str = "image",
        config: str = "inference.json",
        losses: str = "all",
        eps: float | None = None,  # None: the paper's 10/255 of the model's range; required under eps_units native
        step: float | None = None,  # None: the paper's 1/255 of the model's range, in any eps units
        steps: int = 10,
        eps_units: str = "normalized",
        device: str | None = None,
        members: str | None = None,
    ):
        self.bundle_root, self.datalist, self.output_dir = Path(bundle_root), list(datalist), Path(output_dir)
        self.image_key, self.config = image_key, config
        self.losses, self.steps, self.eps_units = losses, int(steps), eps_units
        self.eps = None if eps is None else float(eps)
        self.step = None if step is None else float(step)
        self.device = device
        self.members = members  # attack:loss[options],... instead of IGSM with ``losses``

    def named_inputs(self) -> list[tuple[Path, str]]:
        """The datalist's images, each with its own output folder's name (``image``, ``image_2``... where several
        files share a name, as in ``case1/image.nii.gz``, ``case2/image.nii.gz``: one folder would hold the last)."""
        paths = [Path(item[self.image_key] if isinstance(item, dict) else item) for item in self.datalist]
        named = make_names_unique([SimpleNamespace(name=scan_name(p)) for p in paths])
        return [(p, n.name) for p, n in zip(paths, named)]

    def run(self) -> list[dict]:
        import torch

        from medis3d.bundle import load_bundle
        from medis3d.config import AttackConfig
        from medis3d.fusion import PAPER_STEP
        from medis3d.workflow import run_attack

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # MONAI's runner already executes this config's code: the user trusts it.
        target = load_bundle(self.bundle_root, config=self.config, trust=True, device=device)
        from medis3d.members import parse_members

        members = tuple(m.name for m in parse_members(self.members)) if self.members else ()
        budget: dict[str, Any] = {} if self.eps is None else {"eps": self.eps}  # not given: AttackConfig's (10/255; refused under native)
        options = AttackConfig(members=members, preset="" if members else "paper", losses=self.losses, **budget,
                               step=PAPER_STEP if self.step is None else self.step, preset_step=self.step is None,
                               steps=self.steps, eps_units=self.eps_units)
        rows = []
        for path, name in self.named_inputs():
            report = run_attack(path, target, options, self.output_dir / name)
            rows.append({"input": str(path), "output_dir": report["output_dir"], "success": report["success"],
                         "selected": report["selected"], "clean_dice": report["clean"]["dice"],
                         "adversarial_dice": report["adversarial"]["dice"]})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "medis3d_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        return rows
