"""Regenerate the small data samples shipped in data/ from the full shared data.

A user's clone has no ../shared, yet the tests and the demo need a retrieval
corpus and a few evaluation examples; these samples are those, drawn with a
fixed seed so the same files come out every time:

* data/corpus/pubmed_sample.jsonl: PubMed abstracts ({id, title, text}) drawn
  at random until the file would pass CORPUS_BUDGET bytes (the repository
  flags tracked files over 2 MB), kept in the corpus's own order;
* data/corpus/finance_sample.jsonl: the same for the finance corpus
  (Financial PhraseBank and SEC-filings sentences), up to FINANCE_BUDGET bytes;
* data/eval/<domain>/<task>.jsonl: PER_TASK examples per evaluation task,
  every line unchanged from the dev split, kept in the dev file's order.

Run from the repository root:  .venv/bin/python data/make_samples.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611
PER_TASK = 12
CORPUS_BUDGET = 1_850_000  # bytes; under the 1.9 MB cap with room for a trailing newline
FINANCE_BUDGET = 400_000
CORPUS_FIELDS = ("id", "title", "text")
DOMAINS = {"biomed": "biomed/dev", "finance": "finance/dev"}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_corpus(source: Path, budget: int = CORPUS_BUDGET, seed: int = SEED) -> list[str]:
    """Random documents, as compact {id,title,text} lines, up to `budget` bytes in all."""
    records = [json.loads(line) for line in _lines(source)]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    used = 0
    for index in order:
        size = len(_corpus_line(records[index]).encode("utf-8")) + 1
        if used + size > budget:
            continue  # a shorter document further on may still fit
        chosen.append(index)
        used += size
    return [_corpus_line(records[i]) for i in sorted(chosen)]


def _corpus_line(record: dict) -> str:
    return json.dumps({key: record[key] for key in CORPUS_FIELDS}, ensure_ascii=False)


def sample_task(source: Path, per_task: int = PER_TASK, seed: int = SEED) -> list[str]:
    """`per_task` lines of one dev file, unchanged, in file order; the draw depends on the task name only."""
    lines = _lines(source)
    rng = random.Random(f"{seed}:{source.stem}")
    picked = sorted(rng.sample(range(len(lines)), min(per_task, len(lines))))
    return [lines[i] for i in picked]


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args(argv)
    corpus = args.shared / "corpus" / "pubmed_abstracts.jsonl"
    if not corpus.is_file():
        print(f"shared data not found: {corpus} (pass --shared)", file=sys.stderr)
        return 2

    docs = sample_corpus(corpus)
    _write(HERE / "corpus" / "pubmed_sample.jsonl", docs)
    print(f"corpus: {len(docs)} abstracts -> data/corpus/pubmed_sample.jsonl")
    sentences = sample_corpus(args.shared / "finance" / "corpus" / "finance_corpus.jsonl", FINANCE_BUDGET)
    _write(HERE / "corpus" / "finance_sample.jsonl", sentences)
    print(f"corpus: {len(sentences)} finance sentences -> data/corpus/finance_sample.jsonl")
    for domain, dev in DOMAINS.items():
        for task_file in sorted((args.shared / dev).glob("*.jsonl")):
            lines = sample_task(task_file)
            _write(HERE / "eval" / domain / task_file.name, lines)
            print(f"eval/{domain}/{task_file.name}: {len(lines)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
