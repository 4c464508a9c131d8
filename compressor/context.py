"""Context: what a stage may use besides its model and config (tokenizer, device, data, output)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import data
from .offload import execution_device

T = TypeVar("T")
log = logging.getLogger("compressor")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` = the first CUDA device when one is available, else the CPU; other names as torch reads them."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Context:
    """Shared services for one pipeline run.

    tokenizer: the model's tokenizer (None for a bare nn.Module in tests).
    device: where heavy maths runs. seed: the run's seed. out_dir: a staging folder the stage may
    write artifacts into (renamed into place when the whole run succeeds); None = nothing is saved.
    model_source: how the model was named (id, folder, file). quiet: no progress bars.
    text_column: the column read from tabular text sources when a stage names none.
    """

    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    out_dir: Path | None = None
    model_source: str = "default"
    quiet: bool = False
    text_column: str | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_model(cls, model, tokenizer=None, **kwargs) -> Context:
        """A context for the Python API: the default tokenizer, the model's device."""
        if tokenizer is None:
            from .models import default_tokenizer

            tokenizer = default_tokenizer()
        return cls(tokenizer=tokenizer, device=execution_device(model), **kwargs)

    def windows(
        self,
        source: str = "default",
        *,
        split: str = "calib",
        seq_len: int = 256,
        num_windows: int | None = None,
        text_column: str | None = None,
    ) -> torch.Tensor:
        """Token windows (N, seq_len), LongTensor on CPU; see compressor.data.windows_for."""
        return data.windows_for(
            self.tokenizer, source, split=split, seq_len=seq_len, num_windows=num_windows,
            seed=self.seed, text_column=text_column or self.text_column,
        )

    def progress(self, iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
        """Iterate with a rich progress bar (silent when quiet)."""
        if self.quiet:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)

    def note(self, message: str) -> None:
        """Record a run-level remark (also logged)."""
        self.notes.append(message)
        log.info(message)
