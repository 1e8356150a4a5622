"""Batch attacks over a folder: every NIfTI volume and DICOM series, one output folder each,
a summary table, resumable, and sharded across processes under ``torchrun``.

A volume is done when its ``status.json`` says so, for this input (its relative path and the digest of its
contents) and these settings; that file is written last, after every output was moved into place, so a run
killed part-way redoes only unfinished volumes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from medis3d.errors import InputError, Medis3dError, first_line
from medis3d.io.atomic import write_text_atomic
from medis3d.io.nifti import is_nifti
from medis3d.io.outputs import reason
from medis3d.io.paths import walk_files
from medis3d.io.volume import make_names_unique, safe_name

STATUS_FILE = "status.json"
BATCH_OUTPUTS = ("summary.csv", "summary.json")  # beside each volume's folder, which attack's own check covers
# the member that won by its full name (selected_member: 'apgd:ce' and 'pgd:ce' share the loss 'ce', which was all a
# row said) and the perturbation's L-inf and L2 both (the budget's --norm beside eps says which one eps bounds)
SUMMARY_COLUMNS = [
    "name", "input", "series_instance_uid", "status", "error", "clean_dice", "adversarial_dice", "clean_mean_iou",
    "adversarial_mean_iou", "success", "selected_member", "selected_attack", "selected_loss", "selected_steps",
    "linf_normalized", "linf_native", "l2_normalized", "l2_native", "norm", "eps", "eps_units", "time_s", "notices",
]


@dataclass
class BatchItem:
    """One volume of a batch: where it comes from and the output folder name."""

    name: str
    kind: str  # "nifti" or "dicom"
    path: Path
    series: object | None = None  # medis3d.io.dicom.SeriesInfo for DICOM
    notices: list[str] = field(default_factory=list)  # e.g. DICOM files beside the series that were skipped
    relative: str = ""  # the file's path under the input folder; a series': its folder's, then '#' and its UID
    own_name: bool = False  # the name is the relative path itself, not one made safe (it keeps a name others share)

    def identity(self) -> dict[str, str]:
        """What the item's outputs were made from: its relative path and a digest of its contents (the file, or the
        series' files), recorded in its status.json; a folder whose record differs holds another input's outputs."""
        from medis3d.study import contents_digest

        files = list(getattr(self.series, "files", ())) if self.kind == "dicom" else [self.path]
        try:
            digest = contents_digest(files)
        except OSError as exc:  # reading it fails the same way: a failed volume, with its one-line error
            digest = f"unreadable: {reason(exc)}"
        return {"path": self.relative, "digest": digest}

    def read(self):
        from medis3d.io import read_volume

        if self.kind == "dicom":
            from medis3d.io.dicom import read_dicom_series

            return read_dicom_series(self.series)
        return read_volume(self.path)


def discover(input_dir: Path) -> list[BatchItem]:
    """Every NIfTI file and DICOM series under ``input_dir``, in a stable order, with unique safe names."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: not a folder")
    items: list[BatchItem] = []
    for path in sorted(p for p in walk_files(input_dir) if p.is_file() and is_nifti(p)):
        rel = path.relative_to(input_dir).as_posix()
        for ext in (".nii.gz", ".nii"):
            if rel.lower().endswith(ext):
                rel = rel[: -len(ext)]
        name = safe_name(rel.replace("/", "__"))
        items.append(BatchItem(name, "nifti", path, relative=path.relative_to(input_dir).as_posix(),
                               own_name=name == rel.replace("/", "__")))
    from medis3d.io.dicom import SkippedDicomWarning, find_series, skipped_notice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            series = find_series(input_dir)
        except InputError:
            series = []
    notices = [str(w.message) for w in caught]
    skipped = [entry for w in caught if isinstance(w.message, SkippedDicomWarning) for entry in w.message.skipped]
    for info in sorted(series, key=lambda s: (str(s.folder), s.uid)):
        description = safe_name(info.description or info.modality or "series", "series")
        # the files a single attack of this series' folder would report as skipped: those in it or below it
        beside = [(p, why) for p, why in skipped if info.folder in p.parents]
        relative = f"{info.folder.relative_to(input_dir).as_posix()}#{info.uid}"
        items.append(BatchItem(f"{description}_{safe_name(info.uid[-12:])}", "dicom", info.folder, info,
                               [skipped_notice(info.folder, beside)] if beside else [], relative))
    # a name several inputs share stays with the one it names unchanged; the others get a suffix of their own path's
    # digest, so that a file added later never moves an earlier one into another's folder
    return Discovered(make_names_unique(items, key=lambda item: item.relative, owns=lambda item: item.own_name), notices)


class Discovered(list):
    """The items :func:`discover` found, with the notices of the search itself (every DICOM file skipped, also
    those beside no series) for the batch's summary."""

    def __init__(self, items: list[BatchItem], notices: list[str]):
        super().__init__(items)
        self.notices = list(notices)


def _status(folder: Path) -> dict | None:
    try:
        recorded = json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def is_done(folder: Path, settings: str | None = None, identity: dict | None = None) -> bool:
    """Whether the item in ``folder`` was attacked, under ``settings`` (a digest of the attack's settings and the
    model) and from the input ``identity`` (:meth:`BatchItem.identity`) where given: one done under other settings,
    or from another file (one now named like it) or from this file's earlier contents, is run again, not reported
    as this run's."""
    recorded = _status(folder)
    if recorded is None:
        return False
    same = settings is None or recorded.get("settings") == settings
    same_input = identity is None or recorded.get("input") == identity
    return recorded.get("status") == "done" and same and same_input and (folder / "report.json").is_file()


def _row_from(item: BatchItem, folder: Path) -> dict:
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(name=item.name, input=str(item.path),  # a DICOM series: which one (a folder may hold several)
               series_instance_uid=str(getattr(item.series, "uid", "")) if item.kind == "dicom" else "")
    status = _status(folder)
    if status is None or status.get("input") != item.identity():  # nothing yet, or another input's outputs
        row.update(status="pending")
        return row
    row.update(status=status.get("status", ""), error=status.get("error", ""), time_s=status.get("time_s", ""),
               notices="; ".join(status.get("notices") or []))
    if status.get("status") != "done":
        return row
    report = json.loads((folder / "report.json").read_text())
    clean, adv = report["clean"], report["adversarial"]
    mean = lambda d: sum(v for v in d.values() if v is not None) / max(1, sum(v is not None for v in d.values()))  # noqa: E731
    row.update(
        clean_dice=round(clean["mean_dice"] if "mean_dice" in clean else mean(clean["dice"]), 6),
        adversarial_dice=round(adv["mean_dice"] if "mean_dice" in adv else mean(adv["dice"]), 6),
        clean_mean_iou=round(clean["mean_iou"], 6),
        adversarial_mean_iou=round(adv["mean_iou"], 6),
        success=report["success"],
        selected_member=report["selected"]["member"],
        selected_attack=report["selected"]["attack"],
        selected_loss=report["selected"]["loss"],
        selected_steps=report["selected"]["steps"],
        linf_normalized=round(report["perturbation"]["linf_normalized"], 8),
        linf_native=round(report["perturbation"]["linf_native"], 6),
        l2_normalized=round(report["perturbation"]["l2_normalized"], 8),
        l2_native=round(report["perturbation"]["l2_native"], 6),
        norm=report["attack"]["norm"],
        eps=report["attack"]["eps"],
        eps_units=report["attack"]["eps_units"],
    )
    return row


def write_summary(items: list[BatchItem], out_dir: Path) -> list[dict]:
    """summary.csv and summary.json from every item's status and report, in discovery order."""
    rows = [_row_from(item, out_dir / item.name) for item in items]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "summary.csv", buffer.getvalue())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "pending")}
    notices = list(getattr(items, "notices", []))  # the search's own, as discover found them
    write_text_atomic(out_dir / "summary.json",
                      json.dumps({"volumes": len(rows), **counts, "notices": notices, "rows": rows}, indent=2) + "\n")
    return rows


def run_one(item: BatchItem, out_dir: Path, attack: Callable[[object, Path], dict], settings: str | None = None) -> dict:
    """Attack one item; record done or failed (with a one-line error) in its status file, with ``settings`` and the
    item's identity. A folder holding another input's outputs (its status.json names another file or other contents)
    is removed first, so that no output of that input is left beside this one's."""
    folder = out_dir / item.name
    identity = item.identity()
    recorded = _status(folder)
    if recorded is not None and recorded.get("input") != identity:
        stale = folder.with_name(f".{folder.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)  # one step: the folder holds that input's outputs, or is gone
        shutil.rmtree(stale)
    start = time.perf_counter()
    try:
        volume = item.read()
        attack(volume, folder)
        status = {"status": "done", "time_s": round(time.perf_counter() - start, 3)}
    except Medis3dError as exc:
        status = {"status": "failed", "error": str(exc), "time_s": round(time.perf_counter() - start, 3)}
    except Exception as exc:  # one volume's failure must not stop the batch
        message = first_line(exc)
        status = {"status": "failed", "error": f"{item.path}: {type(exc).__name__}: {message}", "time_s": round(time.perf_counter() - start, 3)}
    if item.notices:
        status["notices"] = list(item.notices)
    if settings is not None:
        status["settings"] = settings
    status["input"] = identity
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / STATUS_FILE, json.dumps(status) + "\n")
    return status


# how long a rank waits at the barrier for the others to finish their shares: torch's default (30 minutes for gloo,
# 10 for NCCL) ended the whole batch with a RuntimeError, no summary written, wherever one rank's volumes took that
# much longer than another's (a resumed batch whose done volumes were one rank's). A rank that dies ends the group
# by torchrun, not by this wait.
BARRIER_WAIT = timedelta(days=30)


@dataclass
class Shard:
    """This process's share of the batch under torchrun (rank, world size, device)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @classmethod
    def from_env(cls) -> Shard:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():  # only barriers travel: gloo's, on the CPU, whatever the volumes run on
            dist.init_process_group(backend="gloo", timeout=BARRIER_WAIT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)

    def device(self, requested: str | None) -> str:
        import torch

        if requested and requested != "cuda":
            return requested
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.world > 1 else "cuda"
        return "cpu"

    def mine(self, items: list[BatchItem]) -> list[BatchItem]:
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def pending(items: list[BatchItem], out_dir: Path, settings: str | None = None) -> Iterator[BatchItem]:
    """The items not yet done (under ``settings``, where given)."""
    for item in items:
        if not is_done(out_dir / item.name, settings, item.identity()):
            yield item


def settings_digest(target, config) -> str:
    """What a batch item's outcome depends on: the attack's configuration (but how many members share a pass,
    which changes no outcome) and the model as :func:`medis3d.study.run_setting` gives it (its fingerprint, the
    windows, classes and precision)."""
    from medis3d.cache import sha1_digest
    from medis3d.study import run_setting

    attack = {k: v for k, v in config.as_dict().items() if k != "together"}
    return sha1_digest({"attack": attack, **run_setting(target)})
