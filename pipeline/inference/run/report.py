"""What one `predict_file` run did (`InferenceReport`): the summary line `segpipe infer` prints and
the figures the benchmarks read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class InferenceReport:
    """What one `predict_file` run did, for the summary line and benchmarks.

    `peak_rss_mb` is the process's resident-memory high-water mark (since start, or since the last
    `reset_peak_rss()`, which `segpipe infer` calls before each image).
    """

    input: Path
    outputs: list[Path]
    shape: tuple[int, int, int]
    dtype: str
    plan: str
    tiles: int
    seconds: float
    peak_rss_mb: float
    notes: list[str] = field(default_factory=list)

    @property
    def megapixels(self) -> float:
        return self.shape[1] * self.shape[2] / 1e6

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        c, h, w = self.shape
        return (
            f"{self.input.name}: {w}x{h}x{c} {self.dtype}, {self.plan}, {self.seconds:.1f} s, "
            f"{self.megapixels_per_second:.2f} Mpx/s, peak RSS {self.peak_rss_mb:.0f} MB "
            f"[{', '.join(self.notes)}] -> {', '.join(str(p) for p in self.outputs)}"
        )
