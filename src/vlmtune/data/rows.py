"""Packed rows: which samples of a batch share a row (first-fit decreasing), decided when the batch is collated.

The layout itself (positions restarting per sample, no mask) is made just before the forward, by
``vlmtune.train.packing.pack``.
"""

from __future__ import annotations

PACK_ROWS = "pack_rows"
"""Batch key: how many samples each packed row holds, in batch order (the collator puts them in that order)."""


def plan_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of at most ``capacity`` tokens, or of the longest
    sample where that is longer (default: the longest, so there are never more rows than samples and no row is
    longer than the padded batch's width)."""
    capacity = max(capacity or 0, max(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows
