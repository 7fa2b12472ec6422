"""What the doctor reports: findings (severity, code, files, what to do) and the report around them.

Plain data: the tab, the CLI and the REST API only render it (``to_dict`` is the API's and ``--json``'s shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lora_train.engine.data.dataset import Dataset

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
# what each fix does (the tab's buttons, the CLI's --fix, the API's fixes say these words)
FIXES = {
    "exclude": "move the files (and their captions) into an _excluded subfolder",
    "caption": "write the missing captions with the chosen captioner",
    "trigger": "put the trigger word first in the caption files",
    "tags": "drop repeated tags from the caption files",
}


@dataclass
class Finding:
    """One thing the doctor found.

    ``message`` says what is wrong and what to do; ``files`` are the images concerned, with a ``notes`` entry
    where there is more to say per file; ``fix`` names the one-click fix (``FIXES``) that applies to
    ``targets`` (default: all of ``files``; for duplicates, the copies beyond the first).
    """

    code: str
    severity: Severity
    message: str
    files: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    fix: str | None = None
    targets: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable extras (e.g. the trigger word)

    @property
    def fix_targets(self) -> list[str]:
        return self.files if self.targets is None else self.targets

    def lines(self, limit: int | None = None) -> list[str]:
        """One line per file (``path (note)``), the first ``limit`` and a count of the rest."""
        shown = self.files if limit is None else self.files[:limit]
        lines = [f"{f} ({self.notes[f]})" if f in self.notes else f for f in shown]
        if limit is not None and len(self.files) > limit:
            lines.append(f"... and {len(self.files) - limit} more")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "message": self.message,
            "files": [{"path": f, "note": self.notes.get(f)} for f in self.files],
            "fix": self.fix, "fix_files": self.fix_targets if self.fix else [], "data": self.data,
        }


@dataclass
class Report:
    """Every finding about one dataset and config, the numbers behind them, and the dataset training would use
    (None when an error stops training)."""

    findings: list[Finding]
    stats: dict[str, Any] = field(default_factory=dict)
    dataset: Dataset | None = None
    seconds: float = 0.0

    def of(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.of("error")

    @property
    def ok(self) -> bool:
        """Training can run (warnings and notes do not stop it)."""
        return not self.errors

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def get(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    def summary(self) -> str:
        """One line: ``dataset check: 42 images (3 reg), 1 error, 2 warnings, 3 notes (0.4 s)``."""
        images = self.stats.get("images", 0)
        reg = self.stats.get("reg_images", 0)
        counts = [_plural(len(self.of("error")), "error"), _plural(len(self.of("warning")), "warning"),
                  _plural(len(self.of("info")), "note")]
        reg_text = f" ({reg} reg)" if reg else ""
        return f"dataset check: {_plural(images, 'image')}{reg_text}, {', '.join(counts)} ({self.seconds:.1f} s)"

    def error_text(self) -> str:
        """What stops training, as the training error says it: every error with its files; one error that names
        no file (no folder, say) is its own one-line sentence."""
        errors = self.errors
        if len(errors) == 1 and not errors[0].files:
            return errors[0].message
        return "dataset problems:\n" + "\n".join("\n  ".join([f.message, *f.lines(50)]) for f in errors)

    def text(self, limit: int = 20) -> str:
        """The plain-text report (the CLI's): summary, then findings by severity with their files."""
        out = [self.summary()]
        for finding in sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity)):
            out.append(f"{finding.severity.upper()} [{finding.code}] {finding.message}")
            out += [f"    {line}" for line in finding.lines(limit)]
            if finding.fix:
                how = "lora-train caption --input <folder>" if finding.fix == "caption" else \
                    f"lora-train doctor --fix {finding.fix}"
                out.append(f"    fix: {FIXES[finding.fix]} ({how})")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(), "ok": self.ok,
            "counts": {s: len(self.of(s)) for s in SEVERITIES},
            "stats": self.stats, "seconds": round(self.seconds, 3),
            "findings": [f.to_dict() for f in self.findings],
        }


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
