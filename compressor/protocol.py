"""The held-out evaluation protocol, defined once and read everywhere: `compressor eval`, the
before/after of compress / finetune / run (recipe `evaluate:` defaults), the fine-tuning stages'
own held-out perplexity, `compressor compare`, and the CLI's option defaults.

Text source, tokens per window, windows scored (the first ones of the held-out half, in text
order; fewer when the text has fewer) and windows per forward pass. 64 x 256 tokens keeps a CPU
run of a small model short. Plain values, no torch: the CLI reads them for `--help`.
"""

PROTOCOL = {"data": "default", "seq_len": 256, "num_windows": 64, "batch_size": 8}
