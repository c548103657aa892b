"""Rebuild the shipped seed sets from the shared seed pools.

The instructions below are written for Carve (the BoX task definitions in the
pool were the model, not the text). Instances are picked from the pool by a
fixed rule, so the sets can be regenerated and audited:

* extractive tasks (NER, BioASQ factoid/list) keep only instances whose every
  gold item occurs in the input, so no seed teaches an answer the text does
  not support;
* shorter inputs first (short seeds keep the 3-seed generation prompt small);
* label tasks take the labels in turn, so a seed set does not teach one label.

Run from the repository root:  .venv/bin/python seeds/make_seeds.py [--pool ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TAGGED = re.compile(r"(.+?) <([^<>]+)>(?:, |$)")

_NER_FORMAT = "separated by commas, in the order they appear in the text"

BIOMED: dict[str, str] = {
    # Question answering
    "bioasq_factoid": (
        "Answer the question using the context. Reply with only the short phrase from the context that names "
        "the fact asked for (an entity, term or number), not a full sentence."
    ),
    "bioasq_list": (
        "Answer the list question from the context. Give every item the question asks for, separated by commas, "
        "and nothing else."
    ),
    "bioasq_yesno": (
        "Based on the context, is the answer to the question yes or no? Reply with the single lowercase word "
        "'yes' or 'no'."
    ),
    "pubmedqa": (
        "The input holds parts of a study abstract (Context1, Context2, ...) and a question, often the study's "
        "title. Answer it with the study's conclusion in one to three sentences."
    ),
    # Relation and document classification
    "ddi": (
        "The context mentions two drugs, given as Drug_1 and Drug_2. Answer 'true' if it says that taking them "
        "together changes the effect, level or risk of one of them, otherwise answer 'false'."
    ),
    "hoc": (
        "Which hallmarks of cancer is this sentence evidence for? Choose among Sustaining proliferative signaling, "
        "Resisting cell death, Genomic instability and mutation, Activating invasion and metastasis, Tumor "
        "promoting inflammation, Evading growth suppressors, Inducing angiogenesis, Enabling replicative "
        "immortality, Avoiding immune destruction and Cellular energetics, and write the names that apply, "
        "separated by commas."
    ),
    # Named entities
    "anatem": (
        "Find every anatomical entity in the sentence (body parts, organs, tissues, cells, cell parts, body "
        f"substances, pathological formations). Write each mention followed by <Anatomy>, {_NER_FORMAT}."
    ),
    "ncbi_disease": (
        "Extract the disease mentions from the sentence, including abbreviations and descriptions of disorders. "
        f"Write each one followed by <Disease>, {_NER_FORMAT}, repeating a disease each time it is mentioned."
    ),
    "bc2gm": (
        "Mark the gene and gene product names (genes, proteins, promoters, alleles, binding sites) in the sentence. "
        f"Answer with each mention followed by <GENE>, {_NER_FORMAT}."
    ),
    "bc5cdr": (
        "Find the chemicals or drugs and the diseases or adverse effects mentioned in the sentence. List them as "
        f"'mention <Chemical>' or 'mention <Disease>', {_NER_FORMAT}."
    ),
    "linnaeus": (
        "Identify every mention of a species, including everyday words for organisms such as 'human', 'patient' "
        f"or 'yeast'. Write each mention followed by <Species>, {_NER_FORMAT}."
    ),
    "bionlp09": (
        "Name the proteins mentioned in this sentence from a molecular biology abstract. Output each protein "
        f"mention followed by <Protein>, {_NER_FORMAT}."
    ),
    "bionlp11epi": (
        "Extract the protein and gene product mentions from the text, keeping their exact wording. Format the "
        "answer as: name1 <Protein>, name2 <Protein>, ..."
    ),
    "bionlp13ge": (
        "Which proteins does this passage mention? List every occurrence in reading order as 'name <Protein>', "
        "separated by commas; a protein mentioned twice is listed twice."
    ),
    "ex_ptm": (
        "Tag the protein names in this sentence about protein modification. Answer with a comma-separated list "
        "in which each protein is followed by <Protein>."
    ),
    "bionlp11id": (
        "Extract the entities of type Chemical, Organism, Protein and Regulon-operon from the sentence about "
        f"infectious disease. Write each as 'mention <Type>', {_NER_FORMAT}."
    ),
    "bionlp13cg": (
        "Annotate the cancer genetics entities in the sentence with one of these types: Amino_acid, "
        "Anatomical_system, Cancer, Cell, Cellular_component, Developing_anatomical_structure, "
        "Gene_or_gene_product, Immaterial_anatomical_entity, Multi-tissue_structure, Organ, Organism, "
        "Organism_subdivision, Organism_substance, Pathological_formation, Simple_chemical, Tissue. "
        f"Write each as 'mention <Type>', {_NER_FORMAT}."
    ),
    "bionlp13pc": (
        "Extract the Cellular_component, Complex, Gene_or_gene_product and Simple_chemical entities from this "
        f"pathway sentence. Write each as 'mention <Type>', {_NER_FORMAT}."
    ),
    "craft": (
        "Label the biomedical concepts in the sentence with their ontology: CHEBI (chemicals), CL (cell types), "
        "GGP (genes and gene products), GO (cellular components, complexes and processes), Taxon (organisms), "
        f"SO (sequence features such as genes, alleles, primers or introns). Write each as 'mention <TYPE>', "
        f"{_NER_FORMAT}."
    ),
}

FINANCE: dict[str, str] = {
    "fin_ner": (
        "Find the named entities in this sentence from a loan agreement or other SEC filing: people and parties "
        "named by their role such as the borrower or lender (PER), organizations (ORG), locations (LOC) and "
        f"other names (MISC). Write each mention followed by its type, like 'name <ORG>', {_NER_FORMAT}."
    ),
    "fpb_sentiment": (
        "What sentiment does this sentence from financial news convey about the company or market it is about? "
        "Reply with exactly one word: positive, negative or neutral."
    ),
}

DOMAINS = {
    "biomedical": {
        "pool": "biomed/seedpool",
        "domain": {
            "name": "biomedical",
            "tag": "biomedical",
            "description": "Biomedical literature: questions on PubMed abstracts, genes, proteins, diseases, "
            "chemicals, anatomy and species in text, drug interactions, hallmarks of cancer.",
        },
        "instructions": BIOMED,
        "label_tasks": {"bioasq_yesno", "ddi", "hoc"},
        "per_task": 5,  # as the paper: up to 5 per task
    },
    "finance": {
        "pool": "finance/seedpool",
        "domain": {
            "name": "financial",
            "tag": "finance",
            "description": "Financial text: sentiment of financial news, named entities in loan agreements "
            "and SEC filings.",
        },
        "instructions": FINANCE,
        "label_tasks": {"fpb_sentiment"},
        "per_task": 10,  # two tasks only: the whole pool, to reach 20 seeds
    },
}


def gold_items(task: str, output: str) -> list[str]:
    """The strings an extractive answer claims are in the input ([] for non-extractive tasks)."""
    if task == "bioasq_factoid":
        return [output]
    if task == "bioasq_list":
        return [item.strip() for item in output.split(",")]
    tagged = _TAGGED.findall(output)
    return [mention for mention, _ in tagged]


def supported(record: dict) -> bool:
    """Every gold item occurs in the input (case-insensitive); trivially true for label tasks."""
    text = record["input"].lower()
    return all(item.lower() in text for item in gold_items(record["task"], record["output"]))


def pick(records: list[dict], label_task: bool, count: int) -> list[dict]:
    """Shortest supported records first; label tasks cycle through labels so each is shown."""
    usable = sorted((r for r in records if supported(r)), key=lambda r: (len(r["input"]), r["id"]))
    if not label_task:
        return usable[:count]
    by_label: dict[str, list[dict]] = defaultdict(list)
    for record in usable:
        by_label[record["output"]].append(record)
    # Most frequent labels first, then alphabetical: a fixed, data-driven order.
    order = sorted(by_label, key=lambda label: (-len(by_label[label]), label))
    chosen: list[dict] = []
    while len(chosen) < count and any(by_label.values()):
        for label in order:
            if by_label[label] and len(chosen) < count:
                chosen.append(by_label[label].pop(0))
    return chosen


def build(pool_root: Path, tag: str) -> tuple[list[dict], list[str]]:
    """The seeds of one domain and the pool ids they came from."""
    spec = DOMAINS[tag]
    seeds, ids = [], []
    for task, instruction in spec["instructions"].items():
        path = pool_root / spec["pool"] / f"{task}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for record in pick(records, task in spec["label_tasks"], spec["per_task"]):
            seeds.append({"instruction": instruction, "input": record["input"], "output": record["output"], "task": task})
            ids.append(record["id"])
    return seeds, ids


def write(tag: str, seeds: list[dict], ids: list[str]) -> None:
    folder = HERE / tag
    folder.mkdir(exist_ok=True)
    domain = DOMAINS[tag]["domain"]
    (folder / "domain.json").write_text(json.dumps(domain, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [json.dumps(seed, ensure_ascii=False) for seed in seeds]
    (folder / "seeds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "SOURCE_IDS.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args(argv)
    if not args.pool.is_dir():
        print(f"seed pool not found: {args.pool} (pass --pool)", file=sys.stderr)
        return 2
    for tag in DOMAINS:
        seeds, ids = build(args.pool, tag)
        write(tag, seeds, ids)
        print(f"{tag}: {len(seeds)} seeds over {len({s['task'] for s in seeds})} tasks -> seeds/{tag}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
