"""Progress: ETA from the mean time per finished item; log lines when output is not a terminal."""

import io
import re

from rich.console import Console

from compressor.context import Context, ProgressLog, clock, eta_seconds


def test_eta_is_mean_time_per_item_times_items_left():
    assert eta_seconds(30.0, 3, 8) == 50.0
    assert eta_seconds(5.0, 0, 8) is None and eta_seconds(5.0, 2, None) is None
    assert clock(3725) == "1:02:05"


class FakeClock:
    """perf_counter for compressor.context that advances `step` seconds per reading."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_slow_items_log_one_line_each_with_elapsed_and_eta(monkeypatch):
    monkeypatch.setattr("compressor.context.time.perf_counter", FakeClock(6.0))  # > ProgressLog.every_s
    stream = io.StringIO()
    log = ProgressLog("svd-llm: blocks", 8, stream)
    for done in range(1, 9):
        log.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8
    assert lines[2] == "svd-llm: blocks: 3/8, elapsed 0:00:18, ETA 0:00:30"


def test_fast_items_log_at_most_every_five_seconds_and_the_last(monkeypatch):
    monkeypatch.setattr("compressor.context.time.perf_counter", FakeClock(0.125))
    stream = io.StringIO()
    log = ProgressLog("mezo", 1010, stream)
    for done in range(1, 1011):
        log.update(done, f"loss {1.0 / done:.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 26  # one line per 40 readings of 0.125 s (25 lines) + the final step
    assert lines[0].startswith("mezo: 40/1010, elapsed 0:00:05")
    assert lines[-1].startswith("mezo: 1010/1010, elapsed") and lines[-1].endswith("loss 0.0010")


def test_a_fast_loop_logs_one_line_when_not_a_terminal():
    stream = io.StringIO()
    ctx = Context(console=Console(file=stream, force_terminal=False))
    assert list(ctx.progress(range(35), "prune")) == list(range(35))
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["prune: 35/35"]
    quiet = io.StringIO()
    assert list(Context(quiet=True, console=Console(file=quiet)).progress(range(3), "x")) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_a_long_item_still_logs_a_line_every_heartbeat():
    import time

    stream = io.StringIO()
    log = ProgressLog("perplexity after", 8, stream)
    log.heartbeat_s = 0.05
    with log.beating():
        log.update(1)  # under every_s: not printed
        time.sleep(0.3)  # one long batch
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2
    assert re.fullmatch(r"perplexity after: 1/8, elapsed 0:00:00, ETA 0:00:0\d, running", lines[0])
    printed = len(lines)
    time.sleep(0.15)
    assert len(stream.getvalue().splitlines()) == printed  # the beat stops with the loop


def test_waiting_logs_a_line_then_a_heartbeat_until_done(monkeypatch):
    import time

    monkeypatch.setattr(ProgressLog, "heartbeat_s", 0.05)
    monkeypatch.setattr(ProgressLog, "first_s", 0.02)
    stream = io.StringIO()
    with Context(console=Console(file=stream, force_terminal=False)).waiting("loading model.gguf"):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(re.fullmatch(r"loading model.gguf: elapsed 0:00:00, running", line) for line in lines)


def test_waiting_that_ends_before_the_first_line_prints_nothing():
    stream = io.StringIO()
    with Context(console=Console(file=stream, force_terminal=False)).waiting("loading nope"):
        pass
    assert stream.getvalue() == ""


def test_the_heartbeat_counts_from_the_last_line_printed():
    import time

    class Stamped(io.StringIO):
        def write(self, text):
            if text.strip():
                times.append(time.perf_counter())
            return super().write(text)

    times: list[float] = []
    stream = Stamped()
    log = ProgressLog("blocks", 8, stream)
    log.heartbeat_s, log.every_s = 0.5, 0.0
    with log.beating():
        time.sleep(0.3)
        log.update(1)  # printed at 0.3 s: the next beat is due at 0.8 s, not at 1.0 s
        time.sleep(0.65)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("blocks: 1/8") and lines[1].endswith("running")
    assert 0.45 < times[1] - times[0] < 0.65
