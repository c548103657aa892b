"""Start a run folder for an ablation that shares its first stages with an existing run (issue 16).

The stages are deterministic functions of the seeds, the base and their own
settings (a prompt's seeds and sampling seed derive from the run seed and its
number), so a variant that changes only later settings repeats the same
stage 0 and stage 1 bit for bit. This creates the variant's folder with its
own run.json (its own settings) and copies the named stage outputs from the
source run; `carve specialize ... --resume` then resumes from them and runs
only what differs. Copy only what the changed settings cannot affect.

    .venv/bin/python docs/results/fork_run.py runs/q-smollm2 runs/top1-smollm2 seeds/biomedical \
        data/corpus/pubmed_sample.jsonl smollm2-135m-instruct retrieval=top1 -- seed_adapter generations.jsonl
    carve specialize seeds/biomedical --corpus data/corpus/pubmed_sample.jsonl --base smollm2-135m-instruct \
        --profile quick --retrieval top1 --out runs/top1-smollm2 --resume
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from carve.specialize.config import build_config
from carve.specialize.run import Manifest, prepare


def main(source: Path, out: Path, seeds: Path, corpus: Path, base: str, overrides: dict[str, object], copies: list[str]) -> None:
    config = build_config("quick", base=base, **overrides)
    inputs = prepare(config, seeds, corpus, out, resume=False)
    out.mkdir(parents=True)
    Manifest.open(inputs)
    for name in copies:
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name, out / name)
    print(f"{out}: run.json with {overrides or 'the quick profile'}; copied {', '.join(copies)} from {source}")


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain word: top1, corpus


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 5 or "--" not in args:
        sys.exit(__doc__)
    split = args.index("--")
    settings = {key: _value(value) for key, value in (a.split("=", 1) for a in args[5:split])}
    main(Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]), args[4], settings, args[split + 1 :])
