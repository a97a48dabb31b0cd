"""Helpers shared by the evaluation, encoding and mining tests: a small BEIR folder written on the fly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (fresh each call, so a test's monkeypatching stays its own)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling _common
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def run_quick_training_bench(script: str, tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script> --quick [extra]`` on a small BEIR folder and the bundled demo triples, writing ``out``;
    asserts it exited 0."""
    data = write_beir(tmp_path / "beir")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--data", str(data),
                           "--triples", str(BENCH.parent / "splade_obs" / "demo" / "train.jsonl"), "--output", str(out),
                           *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


DOCS = {
    "d0": ("Coffee", "Coffee is a brewed drink prepared from roasted coffee beans."),
    "d1": ("Tea", "Tea is an aromatic beverage made by pouring hot water over cured tea leaves."),
    "d2": ("Python", "Python is a high-level programming language that emphasizes code readability."),
    "d3": ("Volcano", "A volcano is a rupture in the crust of a planet that lets lava and gases escape."),
    "d4": ("Football", "Football is a team sport played with a ball between two teams of eleven players."),
    "d5": ("Insulin", "Insulin is a hormone produced by the pancreas that regulates blood glucose."),
    "d6": ("Jupiter", "Jupiter is the largest planet in the solar system, a gas giant."),
    "d7": ("Espresso", "Espresso is concentrated coffee brewed by forcing hot water through fine grounds."),
    "d8": ("Diabetes", "Diabetes is a disease in which blood sugar levels stay high because of insulin problems."),
    "d9": ("Rust", "Rust is a systems programming language focused on memory safety."),
}
QUERIES = {
    "q1": "how is coffee brewed",
    "q2": "which programming language is safe",
    "q3": "hormone that controls blood sugar",
    "q4": "which planet is the largest",
}
QRELS = [("q1", "d0", 2), ("q1", "d7", 1), ("q2", "d9", 1), ("q2", "d2", 1), ("q3", "d5", 2), ("q3", "d8", 1),
         ("q4", "d6", 1)]


def write_beir(root: Path, split: str = "test", qrels: list[tuple[str, str, int]] | None = None) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/<split>.tsv under ``root``; return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, (title, text) in DOCS.items():
            f.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text, "metadata": {}}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, did, rel in (QRELS if qrels is None else qrels):
            f.write(f"{qid}\t{did}\t{rel}\n")
    return root


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
