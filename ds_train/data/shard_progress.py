"""The sharder's progress bar: items/s and tokens/s (tqdm), silent when disabled."""

from __future__ import annotations

import time


class Meter:
    def __init__(self, desc: str, unit: str, enabled: bool, total: int | None = None):
        self.t0 = time.perf_counter()
        self.unit = unit
        self.items = self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=f" {unit}", desc=desc, dynamic_ncols=True, mininterval=0.5)

    def update(self, items: int, tokens: int) -> None:
        self.items += items
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.items / dt:,.0f} {self.unit}/s {self.tokens / dt:,.0f} tok/s", refresh=False
            )
            self.bar.update(items)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
