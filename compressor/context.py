"""Context: what a stage may use besides its model and config (tokenizer, device, data, output)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from . import data
from .offload import execution_device

if TYPE_CHECKING:  # annotation only: a Context for a bare nn.Module has no tokenizer
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
log = logging.getLogger("compressor")


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def eta_seconds(elapsed: float, done: int, total: int | None) -> float | None:
    """Remaining time from the mean time of the items done so far (None before the first)."""
    if not total or done <= 0:
        return None
    return elapsed / done * (total - done)


class MeanEtaColumn(ProgressColumn):
    """ETA = mean time per finished item x items left. Rich's own estimate averages speed over the
    last 30 s only, so with blocks slower than that it shows nothing."""

    def render(self, task) -> Text:
        eta = eta_seconds(task.elapsed or 0.0, int(task.completed), int(task.total) if task.total else None)
        return Text("ETA " + (clock(eta) if eta is not None else "-:--:--"), style="progress.remaining")


class ProgressLog:
    """Progress for output that is not a terminal (CI logs, files): a line with elapsed time and
    ETA at most every `every_s` seconds, and one when the last item is done, so a fast loop logs
    one line and a slow one logs each item."""

    every_s = 5.0
    heartbeat_s = 25.0  # with `beating()`, a line at least this often (under 30 s with jitter) while one item runs long
    first_s = 2.0  # `Context.waiting`: the first line after this long, so a step that fails at once prints only its error

    def __init__(self, description: str, total: int | None, stream=None):
        self.description, self.total = description, total
        self.stream = stream or sys.stderr
        self.started = self.last = time.perf_counter()
        self.done = 0
        self._lock = threading.Lock()

    def update(self, done: int, extra: str = "") -> None:
        with self._lock:
            self.done = done
            now = time.perf_counter()
            if now - self.last < self.every_s and done != self.total:
                return
            self._print(now, extra)

    def _print(self, now: float, extra: str = "") -> None:
        self.last = now
        elapsed = now - self.started
        eta = eta_seconds(elapsed, self.done, self.total)
        count = f"{self.done}/{self.total}, " if self.total else f"{self.done}, " if self.done else ""
        line = f"{self.description}: {count}elapsed {clock(elapsed)}" + (f", ETA {clock(eta)}" if eta is not None
                                                                         else "")
        print(line + (f", {extra}" if extra else ""), file=self.stream, flush=True)

    @contextlib.contextmanager
    def beating(self):
        """While inside, a status line every `heartbeat_s` seconds when no item finished meanwhile
        (one forward batch of a large model on one CPU thread can take minutes)."""
        stop = threading.Event()

        def beat() -> None:
            # Wake when `heartbeat_s` will have passed since the last line, whoever printed it.
            while not stop.wait(max(self.heartbeat_s - (time.perf_counter() - self.last), 0.01)):
                with self._lock:
                    now = time.perf_counter()
                    if now - self.last >= self.heartbeat_s:
                        self._print(now, "running")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


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
    evaluate: the run's evaluation settings (compressor.protocol.PROTOCOL and the recipe's
        `evaluate:`); stages that score held-out text use its `seq_len`, so their numbers are the run's.
    checkpoint_dtype: the dtype the run writes floats in (None: not known, e.g. the Python API);
        stages that budget bytes on disk (`target_bytes`) price scales and other floats in it.
    """

    tokenizer: PreTrainedTokenizerBase | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    out_dir: Path | None = None
    model_source: str = "default"
    quiet: bool = False
    text_column: str | None = None
    evaluate: dict[str, Any] | None = None
    checkpoint_dtype: torch.dtype | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))

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
        """Iterate with a progress bar and ETA on a terminal, log lines otherwise (silent when quiet)."""
        if self.quiet:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if not self.console.is_terminal:
            log_lines = ProgressLog(description, total, self.console.file)
            with log_lines.beating():
                for done, item in enumerate(iterable, start=1):
                    yield item
                    log_lines.update(done)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), MeanEtaColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)

    @contextlib.contextmanager
    def waiting(self, description: str):
        """A step with no items to count (loading a model): a spinner on a terminal, else a
        line after ProgressLog.first_s seconds and one every heartbeat_s seconds until it ends
        (nothing when it ends sooner: a missing path prints its one-line error alone)."""
        if self.quiet:
            yield
        elif self.console.is_terminal:
            with self.console.status(description):
                yield
        else:
            log_lines = ProgressLog(description, None, self.console.file)
            log_lines.last -= log_lines.heartbeat_s - log_lines.first_s  # the first beat at first_s
            with log_lines.beating():
                yield
