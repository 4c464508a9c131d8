"""Report data: what a stage returns, what the pipeline records. Rendering lives in render.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class StageResult:
    """What a method's `apply` returns. It never touches the Report itself.

    metrics: scalar results (floats/ints/strings). per_module: one row per touched module.
    notes: human-readable remarks (fallbacks taken, layers kept dense). curves: named series
    (e.g. training loss) rendered as PNG. artifacts: files the stage wrote, by name.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    per_module: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    modified_model: bool = True


@dataclass
class StageRecord:
    stage: str
    kind: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    per_module: list[dict[str, Any]]
    notes: list[str]
    curves: dict[str, list[float]]
    artifacts: dict[str, str]
    seconds: float
    modified_model: bool = True


@dataclass
class Report:
    run: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    size: dict[str, Any] = field(default_factory=dict)  # report/size.py: before/after bytes
    schema: int = SCHEMA_VERSION

    def add(self, record: StageRecord) -> None:
        self.stages.append(record)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        stages = [StageRecord(**s) for s in data.get("stages", [])]
        return cls(
            run=data.get("run", {}),
            stages=stages,
            evaluation=data.get("evaluation", {}),
            gates=data.get("gates", []),
            size=data.get("size", {}),
            schema=data.get("schema", SCHEMA_VERSION),
        )

    @classmethod
    def load(cls, path: str | Path) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def stage(self, name: str) -> StageRecord:
        for record in self.stages:
            if record.stage == name:
                return record
        raise KeyError(name)
