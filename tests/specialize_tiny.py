"""A tiny domain for the self-specialization tests: seeds, a corpus, stage-1 generations.

The tiny random model of tests/tiny.py runs every stage for real, but it never
writes a parseable "4. Instruction: ... 4. Input: ..." list, so the stages
after instruction generation would have nothing to work on. Tests that need
instructions write ``generations.jsonl`` first, exactly as an interrupted run
leaves it (one record per prompt); the run then resumes from it: the filters,
retrieval, responses, training and packaging all run on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

DOMAIN = {"name": "biomedical", "tag": "tinybio", "description": "A tiny biomedical test domain."}
SEEDS = [
    {"instruction": "Name the disease in the sentence.", "input": "The child had measles.", "output": "measles", "task": "ner"},
    {"instruction": "Is the drug used for diabetes?", "input": "Metformin lowers blood sugar.", "output": "yes", "task": "qa"},
    {"instruction": "Name the gene in the sentence.", "input": "BRCA1 was measured in tissue.", "output": "BRCA1", "task": "ner"},
    {"instruction": "Classify the sentence as cancer or not.", "input": "The tumour grew quickly.", "output": "cancer", "task": "cls"},
    {"instruction": "Summarize the finding in one phrase.", "input": "Aspirin reduced pain in patients.", "output": "aspirin reduces pain", "task": "sum"},
    {"instruction": "What treatment was given to the patient?", "input": "The patient was treated with aspirin.", "output": "aspirin", "task": "qa"},
]
ITEMS = [
    ("Which gene was measured in the samples?", "Gene expression of BRCA1 was measured in breast cancer tissue samples."),
    ("Say whether the patient recovered.", "The patient was treated with aspirin and recovered within two weeks."),
    ("Extract the drug from the text.", "Metformin is used for type 2 diabetes."),
    ("Find the tissue type in this sentence.", "Expression was measured in breast cancer tissue."),
    ("Give the time to recovery of the patient.", "The patient recovered within two weeks."),
    ("Answer yes or no about the treatment.", "Question: Is metformin used for type 2 diabetes?"),
    ("List the diseases mentioned below.", "The child had measles and the tumour grew."),
    ("Rewrite the sentence in plain words.", "Gene expression of BRCA1 was measured."),
]
# iteration 2 asks for a fresh set: different tasks from ITEMS
FRESH_ITEMS = [
    ("Translate the finding for a patient leaflet.", "Aspirin reduced pain in most adults."),
    ("Does the sentence report a side effect?", "Metformin caused nausea in some patients."),
    ("Propose a follow-up experiment for this result.", "BRCA1 expression was low in tumour tissue."),
    ("Identify the organism studied here.", "Mice were fed a high-fat diet for ten weeks."),
]
CORPUS = [
    {"id": "d1", "title": "Aspirin", "text": "The patient was treated with aspirin and recovered within two weeks."},
    {"id": "d2", "title": "BRCA1", "text": "Gene expression of BRCA1 was measured in breast cancer tissue samples."},
    {"id": "d3", "title": "Metformin", "text": "Metformin is used for type 2 diabetes and lowers blood sugar."},
    {"id": "d4", "title": "Measles", "text": "The child had measles and recovered."},
    {"id": "d5", "title": "Revenue", "text": "Revenue rose 12 percent in the third quarter, the company said."},
    {"id": "d6", "title": "Tumours", "text": "The tumour grew quickly in breast cancer tissue."},
]


def write_seed_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "domain.json").write_text(json.dumps(DOMAIN))
    (folder / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    return folder


def write_corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return path


def write_generations(folder: Path, prompts: int, per_prompt: int = 2, items_pool: list[tuple[str, str]] | None = None) -> Path:
    """generations.jsonl with ``prompts`` records, each continuing the list with ``per_prompt`` items."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt in range(prompts):
        pool = items_pool or ITEMS
        items = [pool[(prompt * per_prompt + j) % len(pool)] for j in range(per_prompt)]
        # vary the wording so the near-duplicate filter keeps some and removes others
        text = ""
        for j, (instruction, input) in enumerate(items):
            number = 4 + j
            variant = instruction if prompt * per_prompt < len(pool) else f"{instruction} Explain case {prompt} briefly."
            text += (f" {variant}\n" if j == 0 else f"{number}. Instruction: {variant}\n") + f"{number}. Input: {input}\n"
        lines.append({"prompt": prompt, "seeds": [0, 1, 2], "text": text + "\n", "finish_reason": "eos", "tokens": 40})
    path = folder / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
