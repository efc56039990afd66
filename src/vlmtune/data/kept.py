"""What the checks and the length limit did to a split: samples kept, shrunk, cut, skipped or repeated."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vlmtune.data.sharegpt import Problem


@dataclass
class LengthReport:
    """What the checks and the length limit did to a split: kept, over-long, skipped and duplicate samples."""

    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    downscaled: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)  # every problem of every skipped sample
    duplicates: list[Problem] = field(default_factory=list)  # kept: a repeated sample trains twice

    def skipped_samples(self) -> list[str]:
        """Places of the skipped samples, each once, in order."""
        return list(dict.fromkeys(p.where or str(p) for p in self.skipped))

    def skipped_by_kind(self) -> dict[str, int]:
        """Problem count per kind among skipped samples."""
        return dict(Counter(p.kind for p in self.skipped))

    def lines(self, max_length: int) -> list[str]:
        out = []
        if self.skipped:
            kinds = ", ".join(f"{kind} {n}" for kind, n in self.skipped_by_kind().items())
            out.append(f"{len(self.skipped_samples())} bad sample(s) skipped (data.on_bad_sample: skip): {kinds}")
            out += [f"  skipped {p}" for p in self.skipped[:10]]
            if len(self.skipped) > 10:
                out.append(f"  ... and {len(self.skipped) - 10} more problem(s), all in the run folder's data report")
        for what, items in (
            ("dropped", self.dropped),
            ("downscaled", self.downscaled),
            ("text-truncated", self.truncated),
        ):
            if items:
                first = ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
                out.append(
                    f"{len(items)} sample(s) over max_length={max_length} {what} (image tokens are never cut): {first}"
                )
        if self.duplicates:
            first = ", ".join(str(p) for p in self.duplicates[:3]) + (" ..." if len(self.duplicates) > 3 else "")
            out.append(f"{len(self.duplicates)} duplicate sample(s) kept (each trains as often as it appears): {first}")
        return out

    def to_dict(self) -> dict:
        """Everything as plain JSON data, for the run folder."""
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "downscaled": self.downscaled,
            "truncated": self.truncated,
            "skipped_samples": len(self.skipped_samples()),
            "skipped_by_kind": self.skipped_by_kind(),
            "skipped": [p.to_dict() for p in self.skipped],
            "duplicates": [p.to_dict() for p in self.duplicates],
        }
