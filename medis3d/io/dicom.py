"""DICOM series in and out: find image series under a folder, read one into a :class:`Volume`
(RAS+ affine, native units), and write a derived (adversarial) series on the source's grid.

Geometry convention. Voxel index ``(i, j, k)`` is (column, row, slice): ``i`` runs along a
slice's rows (ImageOrientationPatient's first cosine), ``j`` down its columns (the second
cosine), ``k`` through the slices in increasing position along the slice normal
``row x column``. This is SimpleITK's index order (and what nibabel sees in a NIfTI written
from SimpleITK), so the affine below equals SimpleITK's origin/spacing/direction turned from
DICOM's LPS into RAS+ (``diag(-1, -1, 1)``). The slice step is measured from
ImagePositionPatient (first to last slice), never taken from SliceThickness.

Skipped objects. Files that are DICOM but not image slices (SR, SEG, RTSTRUCT, presentation
states, DICOMDIR, anything without pixel data or without ImagePositionPatient) are left out
of every series; each call that scans a folder reports them with one
:class:`SkippedDicomWarning` whose ``skipped`` attribute lists ``(path, reason)``.
Files that are not DICOM at all (and hidden files and folders) are ignored silently.
"""

from __future__ import annotations

import copy
import datetime
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from medis3d import __version__
from medis3d.errors import InputError, first_line
from medis3d.io.atomic import staging_folder
from medis3d.io.limits import check_readable
from medis3d.io.paths import walk_files, within
from medis3d.io.volume import Volume

__all__ = [
    "SeriesInfo",
    "SkippedDicomWarning",
    "looks_like_dicom",
    "find_series",
    "read_dicom_series",
    "write_dicom_series",
    "write_dicom_seg",
    "anonymized_headers",
    "LPS_TO_RAS",
]

#: DICOM patient coordinates are LPS+; nibabel / medis3d affines are RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_TRAILING_PADDING = 0xFFFCFFFC
# Values larger than this are not read while scanning headers (pixel data is only seeked past).
_DEFER_BYTES = 64 * 1024

# SOP classes that are never image slices, even when they carry pixel data (SEG, RT dose ...).
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # screenshots, scanned documents (and the multi-frame kinds, .7.x)
_NON_IMAGE_SOP_ROOTS = (
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation, surfaces
    "1.2.840.10008.5.1.4.1.1.481",  # radiotherapy objects (RTSTRUCT, RT dose, plans)
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)

# Tags a writer or report needs about who and what was scanned.
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "AccessionNumber", "ReferringPhysicianName", "InstitutionName", "Modality",
)

# Attributes that describe the source pixels and are wrong for new ones.
_STALE_PIXEL_KEYWORDS = (
    "SmallestImagePixelValue", "LargestImagePixelValue",
    "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "IconImageSequence", "PixelDataProviderURL",
)

# De-identification (DICOM PS3.15 basic profile, the attributes that occur in image headers).
_ANON_DELETE = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientAge", "PatientSize", "PatientWeight", "MedicalRecordLocator", "MilitaryRank",
    "BranchOfService", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "PatientInsurancePlanCodeSequence", "PatientReligiousPreference", "CountryOfResidence",
    "RegionOfResidence", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "StudyDescription", "ImageComments", "ProtocolName",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "ScheduledProcedureStepDescription", "AdmittingDiagnosesDescription", "RequestAttributesSequence",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "ResponsibleOrganization", "ResponsiblePerson", "IssuerOfPatientID", "InstanceCreatorUID",
    "TimezoneOffsetFromUTC", "PerformedLocation", "DerivationDescription", "SeriesDescription",
)
_ANON_EMPTY = (  # type 2: present but empty
    "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID",
    "StudyDate", "StudyTime",
)
_DICOM_ROOT = "1.2.840.10008."  # well-known UIDs (classes, transfer syntaxes): never remapped

_SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


class SkippedDicomWarning(UserWarning):
    """DICOM files under a scanned folder that are not image slices; ``skipped`` lists ``(path, reason)``."""

    def __init__(self, message: str, skipped: list[tuple[Path, str]]):
        super().__init__(message)
        self.skipped = skipped


@dataclass(eq=False)
class SeriesInfo:
    """One image series found on disk: its identity and its files (headers read without pixels)."""

    uid: str
    description: str
    modality: str
    series_number: int | None
    study_uid: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    # image slices of this series that cannot be placed (no position, orientation or spacing) or whose file is
    # damaged (no pixel data, an unreadable header: a file cut short): reading the series without them would
    # give a shorter volume, so reading it is refused
    incomplete: tuple[tuple[Path, str], ...] = ()

    @property
    def folder(self) -> Path:
        """The deepest folder holding every file of the series."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))

    @property
    def label(self) -> str:
        """One line naming the series for a person: number, description, modality, size, UID."""
        number = "" if self.series_number is None else f"#{self.series_number} "
        description = self.description or "(no description)"
        return f"{number}'{description}' ({self.modality or '?'}, {len(self.files)} files, UID {self.uid})"


# ----------------------------------------------------------------------------- discovery


def looks_like_dicom(path: Path | str) -> bool:
    """True for a DICOM file (``DICM`` preamble, or a preamble-less file pydicom can parse),
    or a folder with at least one such file somewhere beneath it."""
    path = Path(path)
    if path.is_file():
        return _sniff(path)
    if path.is_dir():
        return any(_sniff(f) for f in walk_files(path, recursive=True))
    return False


def find_series(folder: Path | str) -> list[SeriesInfo]:
    """Every image series (by SeriesInstanceUID) in ``folder`` and its subfolders.

    Headers are read without pixel data. Non-image DICOM objects are skipped and reported with
    one :class:`SkippedDicomWarning`. An empty list means no image series was found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    series, skipped = _scan(folder, recursive=True)
    _warn_skipped(folder, skipped)
    return series


def _sniff(path: Path) -> bool:
    """Cheap test: DICOM preamble, or a file starting with a group 0002/0008 tag that pydicom parses."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    if len(head) < 8 or int.from_bytes(head[:2], "little") not in (0x0002, 0x0008):
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"])
    except Exception:
        return False
    return any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"))


def _read_header(path: Path) -> tuple[Dataset | None, bool, str | None]:
    """``(header, has_pixels, None)`` for a DICOM file, ``(None, False, reason)`` for a broken one,
    ``(None, False, None)`` for anything else.

    The header keeps no pixel data and no values still waiting in the file.
    """
    if not _sniff(path):
        return None, False, None
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
    except Exception as exc:
        return None, False, f"unreadable DICOM ({first_line(exc)})"
    has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    for tag in (*_PIXEL_TAGS, _TRAILING_PADDING):
        if tag in ds:
            del ds[tag]
    try:
        for tag in list(ds.keys()):
            # convert every value now (a deferred one is read from the file, so the header no longer needs it): a
            # value that cannot be decoded (an unknown VR, a bad length) makes the file unreadable here, not later
            ds[tag]
    except Exception as exc:
        return None, False, f"unreadable DICOM ({first_line(exc)})"
    return ds, has_pixels, None


_UNPLACED = "not a positioned slice"  # an image slice of a series that lacks its geometry


def _not_an_image(ds: Dataset, has_pixels: bool) -> str | None:
    """Why a header is not an image slice of a series, or None when it is one."""
    sop = str(ds.get("SOPClassUID", "") or "")
    kind = UID(sop).name if sop else "unknown SOP class"
    if any(sop == root or sop.startswith(root + ".") for root in _NON_IMAGE_SOP_ROOTS):
        return f"{kind}, not an image"
    if not has_pixels:
        return f"no pixel data ({kind})"
    if not ds.get("SeriesInstanceUID"):
        return f"no SeriesInstanceUID ({kind})"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 0
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"a colour image ({photometric}, {samples} samples per pixel), not a greyscale slice ({kind})"
    if sop == _SECONDARY_CAPTURE or sop.startswith(_SECONDARY_CAPTURE + "."):
        return f"a secondary capture, not an acquired slice ({kind})"
    if _frames(ds) > 1:
        return None  # an image; reading it explains that multi-frame objects are not supported
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if not ds.get(keyword):
            return f"no {keyword}, {_UNPLACED} ({kind})"
    return None


def _image_class(sop: str) -> bool:
    """Whether ``sop`` is a storage class of acquired images (CT, MR, PET ...), whose files are slices of a series."""
    if not sop or sop.startswith(_SECONDARY_CAPTURE) or any(sop == r or sop.startswith(r + ".") for r in _NON_IMAGE_SOP_ROOTS):
        return False
    return UID(sop).name.endswith("Image Storage")


def _file_class(path: Path, ds: Dataset | None) -> str:
    """The SOP class a file says it holds: its data set's, else its file meta's (read alone where the data set is broken)."""
    sop = str(ds.get("SOPClassUID", "") or "") if ds is not None else ""
    meta = getattr(ds, "file_meta", None) if ds is not None else None
    if not sop and meta is None:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
        except Exception:
            meta = None
    return sop or (str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else "")


def _at_a_slice(ds: Dataset, members: list[tuple[Path, Dataset]]) -> bool:
    """Whether ``ds`` lies where a slice of ``members`` lies (a header-only copy of a slice that is there)."""
    try:
        position = np.asarray(_floats(ds, "ImagePositionPatient", 3))
    except InputError:
        return False
    for _, member in members:
        try:
            if np.allclose(_floats(member, "ImagePositionPatient", 3), position, rtol=0, atol=1e-3):
                return True
        except InputError:
            continue
    return False


def _scan(folder: Path, recursive: bool) -> tuple[list[SeriesInfo], list[tuple[Path, str]]]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[tuple[Path, str]] = []
    incomplete: dict[str, list[tuple[Path, str]]] = {}
    damaged: list[tuple[Path, Dataset | None, str]] = []  # image files without pixels (cut short, broken): maybe a slice
    for path in walk_files(folder, recursive):
        ds, has_pixels, problem = _read_header(path)
        if problem is not None:
            skipped.append((path, problem))
            if _image_class(_file_class(path, None)):
                damaged.append((path, None, problem.replace("unreadable DICOM", "an unreadable header", 1)))
        if ds is None:
            continue
        reason = _not_an_image(ds, has_pixels)
        if reason is not None:
            skipped.append((path, reason))
            if _UNPLACED in reason and ds.get("SeriesInstanceUID"):
                incomplete.setdefault(str(ds.SeriesInstanceUID), []).append((path, reason.split(",")[0]))
            elif not has_pixels and _image_class(_file_class(path, ds)):
                damaged.append((path, ds, reason))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    for path, ds, reason in damaged:  # a slice of a series whose file holds no pixels: reading without it is shorter
        uid = str(ds.get("SeriesInstanceUID", "") or "") if ds is not None else ""
        uids = [uid] if uid else [u for u, members in groups.items() if any(p.parent == path.parent for p, _ in members)]
        for u in uids:
            if u in groups and not (ds is not None and _at_a_slice(ds, groups[u])):
                incomplete.setdefault(u, []).append((path, reason))
    series = [_series_info(uid, members, skipped, incomplete.get(uid, [])) for uid, members in groups.items()]
    series.sort(key=lambda s: (str(s.folder), s.study_uid, s.series_number or 0, s.description, s.uid))
    return series, skipped


def _series_info(uid: str, members: list[tuple[Path, Dataset]], skipped: list[tuple[Path, str]],
                 incomplete: Sequence[tuple[Path, str]] = ()) -> SeriesInfo:
    seen: dict[str, Path] = {}
    kept: list[tuple[Path, Dataset]] = []
    for path, ds in members:
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen:
            skipped.append((path, f"duplicate of {seen[sop]} (same SOPInstanceUID)"))
            continue
        seen[sop] = path
        kept.append((path, ds))
    first = kept[0][1]
    number = first.get("SeriesNumber")
    return SeriesInfo(
        uid=uid,
        description=str(first.get("SeriesDescription", "") or ""),
        modality=str(first.get("Modality", "") or ""),
        series_number=int(number) if number not in (None, "") else None,
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        files=tuple(p for p, _ in kept),
        headers=tuple(d for _, d in kept),
        incomplete=tuple(incomplete),
    )


def skipped_notice(folder: Path, skipped: list[tuple[Path, str]]) -> str:
    """The one-line notice for DICOM files under ``folder`` left out of every series (the first three named)."""
    shown = "; ".join(f"{p.name}: {reason}" for p, reason in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"{folder}: skipped {len(skipped)} DICOM file(s) that are not image slices ({shown}{more})"


def _warn_skipped(folder: Path, skipped: list[tuple[Path, str]]) -> None:
    if not skipped:
        return
    warnings.warn(SkippedDicomWarning(skipped_notice(folder, skipped), skipped), stacklevel=3)


# ----------------------------------------------------------------------------- reading


def read_dicom_series(path: Path | str | SeriesInfo, series_uid: str | None = None) -> Volume:
    """Read one DICOM image series into a channel-first float32 :class:`Volume` in native units.

    ``path`` is a folder (searched recursively; it must hold exactly one image series unless
    ``series_uid`` picks one), any file of the series (the series' other files are taken from
    the same folder), or a :class:`SeriesInfo` from :func:`find_series`. Slices are ordered by
    position along the slice normal and each is rescaled with its own RescaleSlope and
    RescaleIntercept. ``meta`` keeps what :func:`write_dicom_series` needs: ``dicom_files``,
    ``dicom_headers`` (no pixel data) and ``sop_instance_uids`` in slice order, plus
    ``sop_class_uid``, ``series_instance_uid``, ``study_instance_uid``,
    ``frame_of_reference_uid``, ``series_description``, ``series_number``, ``modality``,
    ``transfer_syntax_uid`` and ``patient`` (patient and study tags as text).
    """
    if isinstance(path, SeriesInfo):
        info = path
        if series_uid is not None and series_uid != info.uid:
            raise InputError(f"{info.folder}: series_uid {series_uid} does not match the given series {info.uid}")
        return _read_series(info)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        series, skipped = _scan(path, recursive=True)
        _warn_skipped(path, skipped)
        if not series:
            why = ""
            if skipped:
                why = f" ({len(skipped)} DICOM file(s) skipped, e.g. {skipped[0][0].name}: {skipped[0][1]})"
            raise InputError(f"{path}: no DICOM image series found{why}")
        if series_uid is not None:
            chosen = [s for s in series if s.uid == series_uid]
            if not chosen:
                raise InputError(f"{path}: no image series with UID {series_uid}; found: "
                                 + "; ".join(s.label for s in series))
            return _read_series(chosen[0])
        if len(series) > 1:
            raise InputError(f"{path}: holds {len(series)} image series; give a file of the one to read (or its series UID): "
                             + "; ".join(f"{s.label}, e.g. {s.files[0]}" for s in series))
        return _read_series(series[0])

    header, has_pixels, problem = _read_header(path)
    if header is None:
        raise InputError(f"{path}: {problem or 'not a DICOM file'}")
    reason = _not_an_image(header, has_pixels)
    if reason is not None:
        raise InputError(f"{path}: {reason}")
    uid = str(header.SeriesInstanceUID)
    if series_uid is not None and series_uid != uid:
        raise InputError(f"{path}: belongs to series {uid}, not {series_uid}")
    series, skipped = _scan(path.parent, recursive=False)
    _warn_skipped(path.parent, skipped)
    chosen = [s for s in series if s.uid == uid]
    if not chosen or path.resolve() not in {f.resolve() for f in chosen[0].files}:
        # the file itself is hidden (or vanished meanwhile): at least read what is there
        members = list(zip(chosen[0].files, chosen[0].headers)) if chosen else []
        chosen = [_series_info(uid, [(path, header), *members], [], chosen[0].incomplete if chosen else ())]
    return _read_series(chosen[0])


_ENHANCED_TO_CLASSIC = {  # enhanced (multi-frame) image storage -> the classic single-frame class of its slices
    "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2",  # Enhanced CT -> CT
    "1.2.840.10008.5.1.4.1.1.2.2": "1.2.840.10008.5.1.4.1.1.2",  # Legacy Converted Enhanced CT -> CT
    "1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR
    "1.2.840.10008.5.1.4.1.1.4.4": "1.2.840.10008.5.1.4.1.1.4",  # Legacy Converted Enhanced MR -> MR
    "1.2.840.10008.5.1.4.1.1.128.1": "1.2.840.10008.5.1.4.1.1.128",  # Legacy Converted Enhanced PET -> PET
}
_FUNCTIONAL_GROUPS = {  # functional group sequence -> the attributes a classic slice carries at top level
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
}


def _frames_as_slices(path: Path, ds: Dataset) -> list[Dataset]:
    """An enhanced multi-frame object's frames as classic slice headers (shared and per-frame functional
    groups moved to the top level), each knowing its frame (``_medis3d_frame``) and its source's class."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != _frames(ds):
        raise InputError(f"{path}: {_frames(ds)} frames but {len(per_frame)} per-frame functional groups")
    base = Dataset()
    for element in ds:
        if element.keyword not in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames"):
            base.add(copy.deepcopy(element))
    base.SOPClassUID = _ENHANCED_TO_CLASSIC[str(ds.SOPClassUID)]
    slices = []
    for k, groups in enumerate(per_frame):
        header = copy.deepcopy(base)
        for source in (shared[0], groups):  # per-frame values override shared ones
            for sequence, keywords in _FUNCTIONAL_GROUPS.items():
                item = source.get(sequence)
                if item:
                    for keyword in keywords:
                        if keyword in item[0]:
                            setattr(header, keyword, item[0].data_element(keyword).value)
        header._medis3d_frame = k
        header._medis3d_source_class = str(ds.SOPClassUID)
        slices.append(header)
    return slices


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _number(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{getattr(ds, 'filename', None) or 'DICOM header'}: malformed {keyword} {_show(value)}") from None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...]:
    """A multi-valued decimal attribute, checked for its number of values."""
    try:
        values = tuple(float(v) for v in ds.get(keyword))
    except (TypeError, ValueError):
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise InputError(f"{getattr(ds, 'filename', None) or 'DICOM header'}: malformed {keyword} {ds.get(keyword)!r}")
    return values


def _read_series(info: SeriesInfo) -> Volume:
    """The series as a volume; a header too malformed for any check below is still one line naming the series."""
    try:
        return _read_checked_series(info)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # values of the wrong kind where a number or text was due (a corrupted header)
        raise InputError(f"{info.folder}: series {info.uid}: malformed header values ({type(exc).__name__}: "
                         f"{first_line(exc)})") from exc


def _read_checked_series(info: SeriesInfo) -> Volume:
    files, headers = list(info.files), list(info.headers)
    where = f"{info.folder}: series " + (f"{info.description!r} ({info.uid})" if info.description else info.uid)
    if info.incomplete:
        path, reason = info.incomplete[0]
        more = f" (and {len(info.incomplete) - 1} more)" if len(info.incomplete) > 1 else ""
        raise InputError(f"{where}: slice {path.name} has {reason}{more}; refusing to read the series "
                         "without it (a shorter volume); fix or remove that file")
    for f, h in zip(files, headers):
        if _frames(h) > 1:
            sop = str(h.get("SOPClassUID", ""))
            if sop not in _ENHANCED_TO_CLASSIC or len(files) > 1:
                raise InputError(f"{f}: multi-frame DICOM ({UID(sop).name}, {_frames(h)} frames) is not supported"
                                 f"{' beside other files of its series' if sop in _ENHANCED_TO_CLASSIC else ''}; "
                                 "convert it to one file per slice first")
            headers = _frames_as_slices(f, h)
            files = [f] * len(headers)
    if len(files) < 2:
        raise InputError(f"{where}: only one image slice; a 3D volume needs at least 2")

    def check_same(describe: Callable[[Dataset], Any], what: str,
                   same: Callable[[Any, Any], bool] = lambda a, b: a == b) -> None:
        ref = describe(headers[0])
        for f, h in zip(files[1:], headers[1:]):
            value = describe(h)
            if not same(ref, value):
                raise InputError(f"{where}: {what} differs between slices "
                                 f"({_show(ref)} in {files[0].name}, {_show(value)} in {f.name})")

    def close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return bool(np.allclose(a, b, rtol=0, atol=1e-4))

    check_same(lambda h: (int(h.get("Rows", 0)), int(h.get("Columns", 0))), "image size (Rows, Columns)")
    check_same(lambda h: _floats(h, "ImageOrientationPatient", 6), "ImageOrientationPatient", close)
    check_same(lambda h: _floats(h, "PixelSpacing", 2), "PixelSpacing", close)
    check_same(lambda h: (int(h.get("BitsAllocated", 0)), int(h.get("PixelRepresentation", 0))),
               "pixel type (BitsAllocated, PixelRepresentation)")
    check_same(lambda h: str(h.get("PhotometricInterpretation", "")), "PhotometricInterpretation")

    first = headers[0]  # greyscale: colour objects never join a series (see _not_an_image)
    bits, signed = int(first.get("BitsAllocated", 16)), int(first.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32):
        raise InputError(f"{where}: BitsAllocated {bits} is not supported (8, 16 or 32)")
    stored_dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")

    # Geometry: order along the normal, check the spacing, measure the step.
    orientation = np.asarray(_floats(first, "ImageOrientationPatient", 6))
    row_cos, col_cos = orientation[:3], orientation[3:]
    if min(np.linalg.norm(row_cos), np.linalg.norm(col_cos), np.linalg.norm(np.cross(row_cos, col_cos))) < 1e-3:
        raise InputError(f"{files[0]}: degenerate ImageOrientationPatient {_show(tuple(orientation))}")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    positions = np.asarray([_floats(h, "ImagePositionPatient", 3) for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    positions = positions[order]
    along = positions @ normal
    gaps = np.diff(along)
    same_place = np.flatnonzero(gaps < 1e-3)
    if same_place.size:
        i = int(same_place[0])
        raise InputError(f"{where}: {files[i].name} and {files[i + 1].name} lie at the same position "
                         f"({along[i]:.4g} mm along the slice normal); series with several acquisitions, "
                         "echoes or time points are not supported")
    typical = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - typical) > max(0.01, 0.02 * typical))
    if uneven.size:
        i = int(uneven[0])
        gap = float(gaps[i])
        if gap > 1.5 * typical:
            missing = max(1, int(round(gap / typical)) - 1)
            raise InputError(f"{where}: slice(s) missing: a gap of {gap:.4g} mm between {files[i].name} and "
                             f"{files[i + 1].name} (at {along[i]:.4g} and {along[i + 1]:.4g} mm along the slice "
                             f"normal) where slices are {typical:.4g} mm apart, about {missing} slice(s) missing")
        raise InputError(f"{where}: uneven slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                         f"(first odd gap between {files[i].name} and {files[i + 1].name})")
    step = (positions[-1] - positions[0]) / (len(files) - 1)
    spacing = np.asarray(_floats(first, "PixelSpacing", 2))  # (between rows, between columns)
    if spacing.min() <= 0:
        raise InputError(f"{files[0]}: PixelSpacing must be positive, got {_show(tuple(spacing))}")
    expected = positions[0] + np.arange(len(files))[:, None] * step
    off_line = np.linalg.norm(positions - expected, axis=1)
    if off_line.max() > 0.01 + 0.1 * min(float(spacing.min()), typical):
        i = int(np.argmax(off_line))
        raise InputError(f"{where}: slice positions do not lie on a straight line "
                         f"({files[i].name} is {off_line[i]:.3g} mm off)")

    sideways = float(np.linalg.norm(step - (step @ normal) * normal))
    if sideways > 1e-3 * abs(float(step @ normal)):  # gantry tilt: a sheared grid, which ITK-based viewers cannot show
        angle = float(np.degrees(np.arctan2(sideways, abs(float(step @ normal)))))
        raise InputError(f"{where}: the slices are tilted {angle:.2f} degrees from the slice normal (gantry tilt: a sheared "
                         "grid); resample the series to a regular grid first (e.g. dcm2niix corrects gantry tilt)")
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # i: along a row, one column to the next
    lps[:3, 1] = col_cos * spacing[0]  # j: down a column, one row to the next
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps

    rows, columns = int(first.Rows), int(first.Columns)
    check_readable(where, (columns, rows, len(files)))
    data = np.empty((columns, rows, len(files)), dtype=np.float32)
    slopes = np.empty(len(files))
    intercepts = np.empty(len(files))
    transfer_syntax = ""
    decoded: dict[Path, tuple[np.ndarray, str]] = {}
    for k, (f, h) in enumerate(zip(files, headers)):
        if "ModalityLUTSequence" in h and "RescaleSlope" not in h:
            raise InputError(f"{f}: a Modality LUT Sequence (instead of RescaleSlope/Intercept) is not supported")
        slopes[k] = _number(h, "RescaleSlope", 1.0)
        intercepts[k] = _number(h, "RescaleIntercept", 0.0)
        if slopes[k] == 0:
            raise InputError(f"{f}: RescaleSlope is 0")
        if not (np.isfinite(slopes[k]) and np.isfinite(intercepts[k])):
            raise InputError(f"{f}: RescaleSlope / RescaleIntercept are not finite ({slopes[k]:g}, {intercepts[k]:g})")
        frame = getattr(h, "_medis3d_frame", None)
        if frame is None:
            pixels, syntax = _read_pixels(f)
        else:  # one frame of an enhanced object: decode the object once
            if f not in decoded:
                decoded[f] = _read_pixels(f)
            pixels, syntax = decoded[f][0][frame], decoded[f][1]
        transfer_syntax = transfer_syntax or syntax
        if pixels.shape != (rows, columns):
            raise InputError(f"{f}: pixel data of shape {pixels.shape}, expected {rows} x {columns}")
        data[:, :, k] = (pixels.astype(np.float64) * slopes[k] + intercepts[k]).T
        if not np.isfinite(data[:, :, k]).all():
            raise InputError(f"{f}: values out of the float32 range after RescaleSlope {slopes[k]:g} / "
                             f"RescaleIntercept {intercepts[k]:g}")

    def per_slice(values: np.ndarray) -> float | np.ndarray:
        return float(values[0]) if np.all(values == values[0]) else values.reshape(1, 1, -1)

    number = first.get("SeriesNumber")
    meta = {
        "dicom_files": files,
        "dicom_headers": headers,
        "sop_instance_uids": [str(h.get("SOPInstanceUID", "")) for h in headers],
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "series_instance_uid": info.uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "series_description": info.description,
        "series_number": int(number) if number not in (None, "") else None,
        "modality": info.modality,
        "transfer_syntax_uid": transfer_syntax,
        "multi_frame_source": str(getattr(first, "_medis3d_source_class", "") or ""),
        "patient": {kw: str(first.get(kw)) for kw in _PATIENT_STUDY_KEYWORDS if kw in first},
    }
    return Volume(
        array=data[None],
        affine=affine,
        path=info.folder,
        format="dicom",
        stored_dtype=stored_dtype,
        slope=per_slice(slopes),
        intercept=per_slice(intercepts),
        meta=meta,
    )


def _read_pixels(path: Path) -> tuple[np.ndarray, str]:
    """One slice's stored values (no rescale) and the file's transfer syntax."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot be read ({first_line(exc)})") from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: the syntax is the one pydicom found
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                          else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        return np.asarray(ds.pixel_array), str(syntax)
    except Exception as exc:
        try:
            compressed = syntax.is_compressed
        except (ValueError, TypeError) as syntax_exc:  # not a transfer syntax UID at all
            raise InputError(f"{path}: unknown transfer syntax {str(syntax)!r}; its pixel data cannot be decoded") from syntax_exc
        if compressed:
            raise InputError(f"{path}: pixel data compressed as {syntax.name} cannot be decoded "
                             f"({first_line(exc)}); install a decoder (pylibjpeg with its plugins, or python-gdcm) "
                             "or decompress the series first (e.g. gdcmconv --raw)") from exc
        raise InputError(f"{path}: pixel data cannot be decoded ({first_line(exc)})") from exc


# ----------------------------------------------------------------------------- writing


def write_dicom_series(
    source: Volume,
    array: np.ndarray,
    out_dir: Path | str,
    *,
    series_description: str,
    derivation: str,
    anonymize: bool = False,
    uid_map: dict | None = None,
    series_number: int | None = None,
) -> list[Path]:
    """Write ``array`` as a new DICOM series derived from ``source``, one file per source slice.

    ``array`` holds native values on the source grid, ``(I, J, K)`` or ``(1, I, J, K)``. Each
    slice keeps its source header (geometry, rescale, patient and study) and gets its pixels
    in the source's stored type, quantised with that slice's slope and intercept and clipped
    to the type's range; where float32 cannot tell the stored values apart, each voxel is the
    source's stored value plus its change from ``source.array`` (:func:`_stored`), so a voxel left
    as the source has it keeps the source file's stored value exactly (BitsStored is set to BitsAllocated so every value of the type is
    valid). New SeriesInstanceUID and SOPInstanceUIDs, ``series_description``, ImageType
    DERIVED\\SECONDARY, DerivationDescription ``derivation`` and a SourceImageSequence naming
    the source instance. ``series_number`` defaults to the source's plus 1000.

    ``anonymize=True`` applies a basic-profile de-identification: names, IDs, dates and times,
    accession, institution, physicians, free-text descriptions and private tags are removed
    or emptied; PatientName and PatientID become one pseudonym; every instance UID (study,
    frame of reference, referenced instances) is replaced through ``uid_map`` (old -> new,
    filled in as needed; pass the same dict for several series of one study to keep them one
    study). The pseudonym is kept in ``uid_map`` under ``"PatientID:<old id>"``.

    Files go to a hidden temporary folder beside ``out_dir`` which is renamed into place when
    all are written, so a failure leaves nothing behind. ``out_dir`` must not exist or be an
    empty folder, and must not hold any source file. Returns the files in slice order.
    """
    headers = source.meta.get("dicom_headers")
    source_files = source.meta.get("dicom_files") or []
    if source.format != "dicom" or not headers:
        raise InputError(f"{source.path}: not read from a DICOM series; cannot write a derived DICOM series")
    values = np.asarray(array)
    if values.ndim == 4:
        if values.shape[0] != 1:
            raise InputError(f"{source.path}: a DICOM series holds one channel, got {values.shape[0]}")
        values = values[0]
    if values.shape != source.spatial_shape or values.shape[2] != len(headers):
        raise InputError(f"{source.path}: array of shape {values.shape} is not on the source grid "
                         f"{source.spatial_shape}")
    if not np.isfinite(values).all():
        raise InputError(f"{source.path}: {int((~np.isfinite(values)).sum())} value(s) are NaN or infinite")

    out_dir = Path(out_dir)
    _check_output_folder(out_dir, source_files)
    stored = _stored(source, values)
    if uid_map is None:
        uid_map = {}
    if series_number is None:
        base = source.meta.get("series_number")
        series_number = (int(base) if base is not None else 0) + 1000
    series_uid = generate_uid()
    now = datetime.datetime.now()
    width = max(4, len(str(len(headers))))

    staging = staging_folder(out_dir)
    try:
        names = []
        for k, header in enumerate(headers):
            ds = _derived_slice(header, stored[:, :, k], series_uid=series_uid, series_number=series_number,
                                series_description=series_description, derivation=derivation,
                                anonymize=anonymize, uid_map=uid_map, now=now)
            name = f"{k + 1:0{width}d}.dcm"
            ds.save_as(staging / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():  # an empty folder, checked above; it must still be empty
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in names]


def _stored(source: Volume, values: np.ndarray) -> np.ndarray:
    """``values`` (native, ``(I, J, K)``) in the source's stored type, rounded with each slice's slope and intercept and
    clipped to the type's range.

    ``source.array`` is float32. Where float32 cannot tell the stored values apart (:meth:`Volume.float32_is_coarse`:
    an int32 series stored near 2**31 with RescaleSlope 1e-6 has native values near 2147, where a float32 step is 244
    stored units), rounding ``values`` alone would move voxels nobody changed (1022 of 1024 there, by up to 122 units),
    and a change by as much. There each voxel is its source stored value plus ``values - source.array`` in stored units
    (float64, rounded): the source files' own stored values, read again, wherever ``source.array`` is what they give
    (read as :func:`read_dicom_series` reads them), else ``source.array``'s rounded. A voxel left as the source has it
    keeps its stored value exactly, and a change is written as the change it is (:meth:`Volume.stored_as_change`, which
    the NIfTI writer shares)."""
    if not source.float32_is_coarse():
        return source.to_stored(values)
    return source.stored_as_change(values, source.array[0], _source_stored(source, source.array.shape[1:]))


def _source_stored(source: Volume, shape: tuple[int, ...]) -> np.ndarray | None:
    """The source series' stored values ``(I, J, K)`` (int64), read again from its files; None where any cannot be."""
    files, headers = source.meta.get("dicom_files") or [], source.meta.get("dicom_headers") or []
    if len(files) != shape[2] or len(headers) != shape[2]:
        return None
    out = np.empty(shape, np.int64)
    decoded: dict[Path, np.ndarray] = {}
    try:
        for k, (f, h) in enumerate(zip(files, headers)):
            frame = getattr(h, "_medis3d_frame", None)
            if frame is None:
                pixels = _read_pixels(Path(f))[0]
            else:
                if f not in decoded:
                    decoded[f] = _read_pixels(Path(f))[0]
                pixels = decoded[f][frame]
            if pixels.T.shape != shape[:2]:
                return None
            out[:, :, k] = pixels.T
    except InputError:
        return None
    return out


def _check_output_folder(out_dir: Path, source_files: list[Path]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; refusing to overwrite it")
    for f in source_files:
        if within(Path(f).resolve().parent, out_dir):  # the source lies in the output folder, or below it
            raise InputError(f"{out_dir}: holds the source series ({Path(f).name}); choose another output folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: exists and is not empty; refusing to overwrite it")


def _derived_slice(
    header: Dataset,
    stored_ij: np.ndarray,
    *,
    series_uid: str,
    series_number: int,
    series_description: str,
    derivation: str,
    anonymize: bool,
    uid_map: dict,
    now: datetime.datetime,
) -> Dataset:
    ds = Dataset()
    for element in header:
        ds.add(copy.deepcopy(element))
    for keyword in _STALE_PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    source_sop_class = getattr(header, "_medis3d_source_class", None) or str(header.get("SOPClassUID", ""))
    source_sop_instance = str(header.get("SOPInstanceUID", ""))
    source_frame = getattr(header, "_medis3d_frame", None)
    if anonymize:
        _anonymize(ds, uid_map)
        source_sop_instance = _remapped(uid_map, source_sop_instance)
    else:
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")

    sop_instance = generate_uid()
    ds.SOPInstanceUID = sop_instance
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY", *list(header.get("ImageType", []) or [])[2:]]
    ds.DerivationDescription = derivation[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_sop_class
    reference.ReferencedSOPInstanceUID = source_sop_instance
    if source_frame is not None:
        reference.ReferencedFrameNumber = source_frame + 1
        ds.InstanceNumber = source_frame + 1  # the multi-frame object's own number is one for all its frames
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_IMAGE_PURPOSE
    reference.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    ds.SourceImageSequence = DicomSequence([reference])

    dtype = stored_ij.dtype
    bits = dtype.itemsize * 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    ds.Rows, ds.Columns = int(stored_ij.shape[1]), int(stored_ij.shape[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if np.issubdtype(dtype, np.signedinteger) else 0
    data = np.ascontiguousarray(stored_ij.T).astype(dtype.newbyteorder("<")).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.add(DataElement(0x7FE00010, "OB" if bits == 8 else "OW", data))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _remapped(uid_map: dict, uid: str) -> str:
    if not uid or uid.startswith(_DICOM_ROOT):
        return uid
    if uid not in uid_map:
        uid_map[uid] = generate_uid()
    return str(uid_map[uid])


def _anonymize(ds: Dataset, uid_map: dict) -> None:
    """Basic-profile de-identification of one header in place (before new UIDs are set)."""
    old_id = str(ds.get("PatientID", "") or "")
    pseudonym = uid_map.setdefault(f"PatientID:{old_id}", f"ANON-{secrets.token_hex(5).upper()}")
    ds.remove_private_tags()

    def scrub(dataset: Dataset) -> None:
        for keyword in _ANON_DELETE:
            if keyword in dataset:
                delattr(dataset, keyword)
        for tag in list(dataset.keys()):
            element = dataset[tag]
            if element.VR == "SQ":
                for item in element.value:
                    scrub(item)
            elif element.VR in ("DA", "DT", "TM", "PN"):
                element.value = ""
            elif element.VR == "UI":
                if element.VM > 1:
                    element.value = [_remapped(uid_map, str(v)) for v in element.value]
                else:
                    element.value = _remapped(uid_map, str(element.value or ""))

    scrub(ds)
    for keyword in _ANON_EMPTY:
        setattr(ds, keyword, "")
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medis3d: DICOM PS3.15 basic profile (subset), UIDs remapped"


def anonymized_headers(headers: Sequence[Dataset], uid_map: dict) -> list[Dataset]:
    """Copies of ``headers`` de-identified as :func:`write_dicom_series` does with ``anonymize=True``: pass the same
    ``uid_map`` to keep a SEG of the source in the anonymised series' study (one pseudonym, the same remapped study,
    frame of reference and source instance UIDs)."""
    copies = []
    for header in headers:
        ds = copy.deepcopy(header)
        _anonymize(ds, uid_map)
        copies.append(ds)
    return copies


def write_dicom_seg(
    source: Volume,
    labels: np.ndarray,
    path: Path | str,
    class_names: dict[int, str],
    *,
    series_description: str = "medis3d segmentation",
    series_number: int | None = None,
    images: Sequence[Dataset] | None = None,
) -> Path:
    """Write a label map on the source grid as a DICOM SEG (binary, one segment per class) with highdicom.

    ``labels`` is ``(I, J, K)`` or ``(1, I, J, K)`` integers; ``class_names`` maps label values
    (0 = background is never a segment) to names. Or, for a multi-label (sigmoid) model, ``labels``
    is ``(C, I, J, K)`` 0/1 with ``C > 1``, one channel per label, which may overlap; ``class_names``
    then maps channel indices (0 included) to names. Labels not named are left out. The SEG
    references ``images`` (headers of a series on the source grid in its slice order: the adversarial
    series written from it, or the source's :func:`anonymized_headers`; default the source's own) and
    takes their patient, study and frame of reference.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise InputError(f"{path}: writing DICOM SEG needs highdicom (pip install 'medis3d[dicom]')") from exc
    headers = source.meta.get("dicom_headers")
    if source.format != "dicom" or not headers:
        raise InputError(f"{source.path}: not read from a DICOM series; cannot write a DICOM SEG")
    if images is not None:
        if len(images) != len(headers):
            raise InputError(f"{path}: {len(images)} image header(s) for a series of {len(headers)} slices")
        headers = list(images)
    values = np.asarray(labels)
    values = values[0] if values.ndim == 4 and values.shape[0] == 1 else values
    channels = values.ndim == 4  # one 0/1 channel per label (sigmoid), segments may overlap
    if values.shape[-3:] != tuple(source.spatial_shape) or values.ndim not in (3, 4):
        raise InputError(f"{path}: label map of shape {values.shape} is not on the source grid {source.spatial_shape}")
    named = sorted(int(v) for v in class_names if int(v) != 0 or channels)
    if channels and any(v >= values.shape[0] for v in named):
        raise InputError(f"{path}: class_names name channels {named}, the label map has {values.shape[0]}")
    if not named:
        raise InputError(f"{path}: no classes to write (class_names names only the background)")
    if channels:  # (slices, rows, columns, segments), one binary plane per segment
        pixels = np.stack([np.transpose(values[v] > 0, (2, 1, 0)) for v in named], axis=-1).astype(np.uint8)
    else:
        segment_map = np.zeros(values.shape, dtype=np.uint16)
        for number, value in enumerate(named, start=1):  # SEG segment numbers run 1..n
            segment_map[values == value] = number
        pixels = np.transpose(segment_map, (2, 1, 0))  # (slices, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(name="medis3d", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(class_names[value])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(named, start=1)
    ]
    base = source.meta.get("series_number")
    with warnings.catch_warnings():  # an anonymised series' pseudonym is one name component, as meant
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=list(headers),
            pixel_array=np.ascontiguousarray(pixels),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number if series_number is not None else (int(base) if base is not None else 0) + 2000,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="medis3d",
            manufacturer_model_name="medis3d",
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description[:64],
        )
    _refer_to_frames(seg, headers)
    path = Path(path)
    from medis3d.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def _refer_to_frames(seg: Dataset, headers: Sequence[Dataset]) -> None:
    """A SEG of an enhanced (multi-frame) object's frames, read as slices, references that object once, in its own
    class, and each frame by its number: highdicom takes every frame for an image of its own (one reference per frame,
    in the classic class of the slice headers, and no frame numbers)."""
    if not headers or any(getattr(h, "_medis3d_frame", None) is None for h in headers):
        return
    frames = [int(h._medis3d_frame) for h in headers]
    source_class = str(getattr(headers[0], "_medis3d_source_class", "") or headers[0].SOPClassUID)

    def key(position: Any) -> tuple[float, ...]:
        return tuple(round(float(v), 3) for v in position)

    number = {key(h.ImagePositionPatient): f + 1 for h, f in zip(headers, frames)}

    def once(items: Sequence[Dataset]) -> DicomSequence:
        unique: dict[str, Dataset] = {}
        for item in items:
            item.ReferencedSOPClassUID = source_class
            unique.setdefault(str(item.ReferencedSOPInstanceUID), item)
        return DicomSequence(list(unique.values()))

    seg.SourceImageSequence = once(seg.SourceImageSequence)
    for series in seg.ReferencedSeriesSequence:
        series.ReferencedInstanceSequence = once(series.ReferencedInstanceSequence)
    for group in seg.PerFrameFunctionalGroupsSequence:
        frame = number[key(group.PlanePositionSequence[0].ImagePositionPatient)]
        for derivation in group.get("DerivationImageSequence", []):
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPClassUID = source_class
                item.ReferencedFrameNumber = frame


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return str(value)


