"""Bad-input bookkeeping shared by every reader: skip-and-count by default, raise with --strict."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("clocmllm.data")


@dataclass(frozen=True)
class Problem:
    """One bad sample: where it is (file, 1-based line, field) and why."""

    file: str
    line: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"


class DataError(ValueError):
    """Raised in strict mode; the message names file, line and field."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class ProblemLog:
    """Collects problems. strict=True turns the first one into a DataError."""

    strict: bool = False
    problems: list[Problem] = field(default_factory=list)
    seen: int = 0

    def add(self, file: str, line: int | None, field_name: str | None, reason: str) -> None:
        problem = Problem(str(file), line, field_name, reason)
        if self.strict:
            raise DataError(problem)
        self.problems.append(problem)

    @property
    def skipped(self) -> int:
        """Distinct bad samples: by line, or, in a file without lines (a COCO JSON), by the
        item the field names (`annotations[3].bbox` -> `annotations[3]`)."""
        return len({_sample_key(p) for p in self.problems})

    def summary(self, first: int = 5) -> str:
        if not self.problems:
            return f"{self.seen} samples read, none skipped"
        head = "\n  ".join(str(p) for p in self.problems[:first])
        more = f"\n  ... and {len(self.problems) - first} more" if len(self.problems) > first else ""
        return f"{self.seen} samples read, {self.skipped} skipped:\n  {head}{more}"

    def log_summary(self, what: str = "data") -> None:
        """End-of-run report: the count and the first reasons (never silent)."""
        if self.problems:
            log.warning("%s: %s", what, self.summary())
        else:
            log.info("%s: %s", what, self.summary())


def _sample_key(p: Problem) -> tuple:
    if p.line is not None or not p.field:
        return (p.file, p.line)
    return (p.file, None, p.field.split(".")[0])
