"""A small lm-eval task for tests: the first items of the shipped `tinystories_cloze` as a plain
task YAML with a local data file (the route any user's offline task takes, via `--tasks-dir`)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_ITEMS = (Path(__file__).resolve().parent.parent / "assets" / "tasks" / "tinystories_cloze"
                 / "tinystories_cloze.jsonl")


def write_mini_cloze(folder: Path, items: int = 12, name: str = "mini_cloze") -> Path:
    """Write `<name>.yaml` + `<name>.jsonl` (the first `items` cloze items) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = SHIPPED_ITEMS.read_text(encoding="utf-8").splitlines()[:items]
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    return folder
