"""Named errors for everything a user can hand us: files, catalogs, manifests.

Each error says which file (or parameter) was wrong and why, so a CLI or an HTTP
route can show it verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class Fundus2VideoError(Exception):
    """Base class of the project's errors."""


class UnreadableMedia(Fundus2VideoError):
    """A file that should hold an image or a video cannot be decoded."""

    kind = "file"

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.kind} {self.path}: {reason}")


class UnreadableImage(UnreadableMedia):
    kind = "image"


class UnreadableVideo(UnreadableMedia):
    kind = "video"


class MediaTooLarge(UnreadableMedia):
    """Refused before decoding: the header declares more pixels than allowed."""

    def __init__(self, path: str | Path, pixels: int, limit: int):
        self.pixels = pixels
        self.limit = limit
        super().__init__(path, f"{pixels:,} pixels exceeds the limit of {limit:,}")


class CohortError(Fundus2VideoError):
    """A cohort folder or its catalog does not follow the data contract."""


@dataclass(frozen=True)
class RowProblem:
    row: int  # 1-based data row of the manifest (the header is row 0)
    case_id: str | None
    message: str

    def __str__(self) -> str:
        who = f" ({self.case_id})" if self.case_id else ""
        return f"row {self.row}{who}: {self.message}"


class ProblemsError(Fundus2VideoError):
    """Input with problems, every one listed (not only the first), under its source."""

    def __init__(self, source: str | Path, problems: Sequence[object]):
        self.source = str(source)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{self.source}: {len(problems)} problem(s)\n{lines}")


class ManifestError(ProblemsError):
    """A user manifest has bad rows (`RowProblem`s)."""

    def __init__(self, manifest: str | Path, problems: list[RowProblem]):
        super().__init__(manifest, problems)
        self.manifest = self.source


class OutputExists(Fundus2VideoError, FileExistsError):
    """The output folder the user named already exists or holds files."""


class QueryError(Fundus2VideoError, ValueError):
    """A search or generation request that cannot be answered as asked (names the parameter)."""


class UnknownCase(Fundus2VideoError):
    """A case id that the index does not hold."""

    def __init__(self, case_id: str):
        self.case_id = case_id
        super().__init__(f"unknown case_id {case_id!r}: no such case in the index")


class DuplicateCase(Fundus2VideoError):
    """Adding a case whose id the index already holds."""

    def __init__(self, case_id: str):
        self.case_id = case_id
        super().__init__(f"case_id {case_id!r} is already in the index (delete it first)")


class IndexChanged(Fundus2VideoError):
    """The index folder on disk was rewritten by another process since it was loaded."""


class PersistError(Fundus2VideoError):
    """An update could not be written to disk; the index is back to its last saved state."""


class ServerError(Fundus2VideoError):
    """A server (the API, the dashboard) could not start, or did not answer in time."""


class NearDuplicate(DuplicateCase):
    """Adding a case whose CF photo or FFA video is a near-duplicate of an indexed case's
    (`matches`: the existing case ids, modalities and distances, nearest first)."""

    def __init__(self, case_id: str, matches: list[dict]):
        self.case_id = case_id
        self.matches = matches
        self.existing_case_id = matches[0]["case_id"]
        best = matches[0]
        Fundus2VideoError.__init__(
            self,
            f"case {case_id!r}: its {best['modality']} is a near-duplicate of case "
            f"{self.existing_case_id!r} (distance {best['distance']:.3f} <= "
            f"{best['threshold']:.3f}); pass allow_duplicate to add it anyway",
        )
