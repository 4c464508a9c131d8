"""Render every plot kind once on the embedded stories260K, to look at: reports/plots/<run>/.

Runs (small sizes, CPU) analyze (spectra, κ, WeLore ranks), svd-llm with WeLore allocation (ranks kept), LoRA (adapter
ranks + training curves with held-out evaluations), backprop (curves), dsformer (STF curves) and maestro (perplexity by
keep ratio); a run whose report.json already exists under --runs is only re-rendered. Each run's plots, report.md and
report.json are written to --out/<run>.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from compressor.report import Report, write_report

RUNS = {
    "analyze": "analyze",
    "svd-llm": "compress --method svd-llm --rank 0.6 --set allocation=welore --calib-windows 16",
    "lora": "finetune --method lora --steps 40 --set eval_every=10",
    "backprop": "finetune --method backprop --steps 40 --set eval_every=10",
    "dsformer": "compress --method dsformer --keep-bytes 0.6 --set stf_steps=20",
    "maestro": "compress --method maestro --rank 0.6",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/compressor-gallery-runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/plots"))
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    args = parser.parse_args(argv)
    for name in args.only:
        run = args.runs / name
        if not (run / "report.json").is_file():
            command = [sys.executable, "-P", "-m", "compressor.cli.main", *RUNS[name].split(), "--device", "cpu", "-q",
                       "--out", str(run)]
            print("running", " ".join(command[3:]), flush=True)
            subprocess.run(command, check=True)
        target = args.out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        plots = write_report(Report.load(run / "report.json"), target)
        print(f"{name}: {', '.join(plots)}", flush=True)


if __name__ == "__main__":
    main()
