"""medis3d: adversarial robustness of 3D medical image segmentation models (MedIS, in volumes)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["read_volume", "write_volume", "load_bundle", "MedIS", "MedISResult", "Target", "__version__"]


def __getattr__(name: str):
    # Lazy imports keep `medis3d --help` fast and avoid importing torch for plain I/O.
    if name == "read_volume":
        from medis3d.io import read_volume

        return read_volume
    if name == "write_volume":
        from medis3d.io import write_volume

        return write_volume
    if name == "MedISResult":
        from medis3d.fusion import MedISResult

        return MedISResult
    if name == "load_bundle":
        from medis3d.bundle import load_bundle

        return load_bundle
    if name == "MedIS":
        from medis3d.fusion import MedIS

        return MedIS
    if name == "Target":
        from medis3d.target import Target

        return Target
    raise AttributeError(name)
