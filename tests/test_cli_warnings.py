"""CLI warnings: one plain `warning:` line per message, once, no source line; library deprecation
notices (nothing a user can act on) are not shown; a stage note already shown is not repeated."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

from compressor.cli import main, outcome


def test_a_warning_is_one_plain_line_once_and_deprecations_are_dropped(capsys, monkeypatch):
    monkeypatch.setattr(outcome, "SHOWN_WARNINGS", set())
    monkeypatch.setattr(main, "SHOWN_WARNINGS", outcome.SHOWN_WARNINGS)
    with warnings.catch_warnings():
        main.plain_warnings()
        for _ in range(2):
            warnings.warn("saes-svd: only 16 calibration windows; raise `num_windows`", UserWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: saes-svd: only 16 calibration windows; raise `num_windows`\n"
    record = SimpleNamespace(notes=["saes-svd: only 16 calibration windows; raise `num_windows`", "kept dense: x"])
    outcome.print_notes(record)
    assert capsys.readouterr().out == "note: kept dense: x\n"
