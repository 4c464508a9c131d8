"""Progress: ETA from the mean time per finished item; log lines when output is not a terminal."""

import io
import re

from rich.console import Console

from compressor.context import Context, ProgressLog, clock, eta_seconds


def test_eta_is_mean_time_per_item_times_items_left():
    assert eta_seconds(30.0, 3, 8) == 50.0
    assert eta_seconds(5.0, 0, 8) is None and eta_seconds(5.0, 2, None) is None
    assert clock(3725) == "1:02:05"


def test_few_items_log_one_line_each_with_elapsed_and_eta():
    stream = io.StringIO()
    log = ProgressLog("svd-llm: blocks", 8, stream)
    for done in range(1, 9):
        log.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8
    assert re.fullmatch(r"svd-llm: blocks: 3/8, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d", lines[2])


def test_many_steps_log_every_twentieth_and_the_last():
    stream = io.StringIO()
    log = ProgressLog("mezo", 1010, stream)
    for done in range(1, 1011):
        log.update(done, f"loss {1.0 / done:.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20  # every 51 steps (19 lines) + the final step
    assert lines[-1].startswith("mezo: 1010/1010, elapsed") and lines[-1].endswith("loss 0.0010")


def test_context_progress_logs_lines_when_not_a_terminal():
    stream = io.StringIO()
    ctx = Context(console=Console(file=stream, force_terminal=False))
    assert list(ctx.progress(range(3), "blocks")) == [0, 1, 2]
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["blocks: 1/3", "blocks: 2/3",
                                                                               "blocks: 3/3"]
    quiet = io.StringIO()
    assert list(Context(quiet=True, console=Console(file=quiet)).progress(range(3), "x")) == [0, 1, 2]
    assert quiet.getvalue() == ""
