"""What `compress`, `finetune` and `run` print last: the quality table, a hint the user can act on
with the method that ran, the size of what was written, and a closing line naming the commands
that use it (tests/test_next_steps.py runs them)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from compressor.ckpt_format import is_compressed_config

from .common import console

# Warnings already printed as `warning:` lines (cli.main): a stage note saying the same is not repeated.
SHOWN_WARNINGS: set[str] = set()
# Compression methods whose keep ratio is a flag of `compress` (the rest keep more another way).
KEEP_FLAG = {"dsformer": "keep_bytes"}
RANK_METHODS = ("svd", "asvd", "svd-llm", "saes-svd", "welore", "maestro")


def print_outcome(report, out: Path | str | None, command: str) -> None:
    """The quality table, a hint when quality did not move or collapsed, the size of the output,
    and the closing line (how to use what was written)."""
    print_evaluation(report.evaluation)
    hint = quality_hint(report.evaluation, report.stages, command, out)
    if hint:
        console.print(hint, style="yellow", highlight=False, soft_wrap=True)
    for line in size_lines(report.size, out):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(closing_line(out), highlight=False, soft_wrap=True)


def print_notes(record) -> None:
    """A stage's notes (the first 20), except those already shown as warnings."""
    for note in [n for n in record.notes if n not in SHOWN_WARNINGS][:20]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


def print_evaluation(evaluation: dict[str, dict[str, Any]]) -> None:
    if not evaluation:
        return
    from rich.table import Table

    table = Table(title="quality (held-out text)", title_justify="left")
    keys = sorted({k for v in evaluation.values() for k in v})
    table.add_column("when")
    for key in keys:
        table.add_column(key, justify="right")
    for when, values in evaluation.items():
        table.add_row(when, *[f"{values[k]:.4g}" if isinstance(values.get(k), float) else str(values.get(k, ""))
                              for k in keys])
    console.print(table)


# -- hints -------------------------------------------------------------------------------------


def quality_hint(evaluation: dict[str, dict[str, Any]], stages: list, command: str,
                 out: Path | str | None = None) -> str | None:
    """One line of advice when held-out perplexity did not move (< 0.1 %) or rose more than 10×,
    naming only flags and stages that apply to the methods that ran (`stages`: StageRecords)."""
    before = evaluation.get("before", {}).get("perplexity")
    after = evaluation.get("after", {}).get("perplexity")
    if before is None or after is None or not before > 0:
        return None
    ratio = after / before
    kinds = {s.kind for s in stages}
    if ratio > 10:
        advice = [keep_more(i, s.stage, s.config, command) for i, s in enumerate(stages) if s.kind == "compress"]
        if "compress" in kinds:
            advice.append(heal_advice(command, out))
        if "finetune" in kinds:
            advice.append(f"lower the learning rate ({flag(command, stages, 'lr')}; the run diverged)")
        return f"hint: held-out perplexity rose {ratio:.0f}× ({before:.4g} → {after:.4g}); " + "; or ".join(advice)
    if abs(ratio - 1) < 1e-3 and "finetune" in kinds:
        return (f"hint: held-out perplexity did not move ({before:.4g} → {after:.4g}); use a larger learning rate "
                f"({flag(command, stages, 'lr')}, e.g. 10×) or more steps ({flag(command, stages, 'steps')})")
    return None


def flag(command: str, stages: list, field: str) -> str:
    """How `command` sets a finetune stage's `field`: a flag, or `--set stages.N.field=` for a recipe."""
    if command != "run":
        return "--" + field.replace("_", "-")
    index = next((i for i, s in enumerate(stages) if s.kind == "finetune"), 0)
    return f"--set stages.{index}.{field}=..."


def keep_more(index: int, method: str, config: dict[str, Any], command: str) -> str:
    """How to keep more of the model with `method` (its own knob, as `command` sets it)."""
    if method == "prune":
        if config.get("score") != "sparsegpt":
            return ("prune with calibration data: SparseGPT re-fits the kept weights "
                    f"({set_flag(command, index, 'score', 'sparsegpt')})")
        if config.get("pattern") == "unstructured":
            return f"prune less ({set_flag(command, index, 'sparsity', '0.3')})"
        return "prune fewer layers (--ignore NAME for the layers that matter most, e.g. down_proj)"
    field = KEEP_FLAG.get(method, "rank" if method in RANK_METHODS or "rank" in config else None)
    if field is None:
        return f"compress less (see `compressor methods {method}`)"
    current = config.get(field)
    higher = min(1.0, round(current + 0.2, 2)) if isinstance(current, float) else 0.8
    if command == "compress":
        return f"keep more (a higher --{field.replace('_', '-')}, e.g. {higher})"
    return f"keep more ({set_flag(command, index, field, higher)})"


def set_flag(command: str, index: int, field: str, value: Any) -> str:
    return f"--set {field}={value}" if command != "run" else f"--set stages.{index}.{field}={value}"


def heal_advice(command: str, out: Path | str | None) -> str:
    if out is None:
        return "heal it: write it with --out DIR, then `compressor finetune --method heal DIR`"
    target = shlex.quote(str(out))
    healed = shlex.quote(f"{str(out).rstrip('/')}-healed")
    return (f"heal it: `compressor finetune --method heal {target} --out {healed}` (or a `heal` stage in the "
            "recipe, see recipes/compress-heal.yaml)")


# -- size --------------------------------------------------------------------------------------


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def size_lines(size: dict[str, Any], out: Path | str | None = None) -> list[str]:
    """The Size row (bytes written; × the input file; × a dense copy in the output dtype) and a
    warning when the output is larger than the input file."""
    after, before, ratio = size.get("after", {}), size.get("before", {}), size.get("ratio", {})
    written = after.get("disk_bytes")
    if not written:
        return []
    parts = [f"size: {megabytes(written)} written ({size.get('dtype', '?')})"]
    if "disk_bytes" in ratio:
        parts.append(f"{ratio['disk_bytes']:.3g}× the input file ({megabytes(before['disk_bytes'])})")
    if "memory_bytes" in ratio:
        parts.append(f"{ratio['memory_bytes']:.3g}× the dense model's in-memory bytes")
    lines = [", ".join(parts)]
    if ratio.get("disk_bytes", 0) > 1 and ratio.get("memory_bytes", 1) < 1:
        lines.append(f"warning: the output is larger than the input file, which is stored in fewer bits "
                     f"(quantized); it is {ratio['memory_bytes']:.3g}× the dense model: compare against dense, "
                     f"or quantize it too: `compressor compress {out or 'OUT'} --method gptq --bits 4` (recipes/gptq.yaml)")
    elif ratio.get("disk_bytes", 0) > 1:
        lines.append("warning: the output is larger than the input file; keep less (a lower keep ratio), "
                     "or write it in a smaller dtype (--dtype bfloat16)")
    return lines


# -- the closing line --------------------------------------------------------------------------


def closing_line(out: Path | str | None) -> str:
    """Where the outputs went and the commands that use them, each in backticks."""
    if not out:
        return "nothing written (no --out)"
    path = Path(out)
    model = shlex.quote(str(out))
    uses = (f"`compressor eval {model}`, `compressor generate {model}`, or in Python "
            f"`compressor.load({str(out)!r})`")
    if (path / "config.json").is_file():
        compressed = is_compressed_config(json.loads((path / "config.json").read_text()))
        what = "a compressed checkpoint" if compressed else "a Hugging Face checkpoint"
        return f"wrote {out} ({what}); use it as MODEL: {uses}"
    adapter = path / "adapter" / "adapter_config.json"
    if adapter.is_file():
        config = json.loads(adapter.read_text())
        kind = "a peft LoRA" if config.get("peft_type") == "LORA" else f"a {str(config.get('method')).upper()}"
        return f"wrote {out} ({kind} adapter in {adapter.parent}, applied to its base model on load); use it as MODEL: {uses}"
    return f"wrote {out} (report.md, report.json, plots)"
