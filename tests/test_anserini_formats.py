"""`splade-obs encode --format anserini`: the impact formats Anserini reads, on the real splade-tiny.

Documents: JsonVectorCollection JSONL ``{"id", "contents", "vector": {term: int > 0}}``; queries: TSV topics
``id<TAB>terms`` with each term repeated by its integer weight. The integer dot products rank like the float
ones (within what rounding can change), and, where Java and Anserini's fat jar are on the machine, Anserini's
own ``-impact -pretokenized`` index and search give exactly those integer scores.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from splade_obs.errors import DataError
from splade_obs_cli.main import cli

from tests._eval_utils import DOCS, QUERIES, read_jsonl, write_beir

SCALE = 100  # the documented default of --format anserini
#: Queries whose terms include Lucene query syntax (splade-tiny weights "+", "#", "!", "-", "@" in them).
SYNTAX_QUERIES = {"q5": "c++ (programming language) vs. c#: which is safe?", "q6": "e-mail: user@host (urgent)!"}
LUCENE_SYNTAX = re.compile(r'[-+!(){}\[\]^"~*?:\\/&|@#]')


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["encode", "--model", "splade-tiny", "--batch-size", "4", *args])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The corpus and the queries, each as float JSONL and in the Anserini format (default scale)."""
    root = tmp_path_factory.mktemp("anserini")
    beir = write_beir(root / "beir")
    with open(beir / "queries.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": qid, "text": text}) + "\n" for qid, text in SYNTAX_QUERIES.items())
    out = {"beir": beir, "docs_float": root / "docs.jsonl", "queries_float": root / "queries.jsonl",
           "docs": root / "collection" / "docs.jsonl", "queries": root / "queries.tsv"}
    out["docs"].parent.mkdir()
    for kind, fmt, key in [("corpus", "jsonl", "docs_float"), ("queries", "jsonl", "queries_float"),
                           ("corpus", "anserini", "docs"), ("queries", "anserini", "queries")]:
        result = _run(["--input", str(beir), "--kind", kind, "--format", fmt, "--output", str(out[key])])
        assert result.exit_code == 0, result.output
    return out


def _floats(path: Path) -> dict[str, dict[str, float]]:
    return {row["id"]: row["vector"] for row in read_jsonl(path)}


def _quantised(vec: dict[str, float], scale: float) -> dict[str, int]:
    q = {t: math.floor(w * scale + 0.5) for t, w in vec.items()}
    return {t: v for t, v in q.items() if v > 0}


def _read_topics(path: Path) -> dict[str, Counter]:
    topics = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, sep, text = line.partition("\t")
        assert sep and "\t" not in text, line
        tokens = text.split(" ")
        assert tokens == text.split(), f"{qid}: terms must be separated by single spaces"
        topics[qid] = Counter(tokens)
    return topics


def test_documents_are_a_json_vector_collection_of_positive_integers(files) -> None:
    from splade_obs.beir import beir_doc_text

    rows = read_jsonl(files["docs"])
    floats = _floats(files["docs_float"])
    assert [r["id"] for r in rows] == list(DOCS)
    for row in rows:
        assert set(row) == {"id", "contents", "vector"}
        title, text = DOCS[row["id"]]
        assert row["contents"] == beir_doc_text({"title": title, "text": text})
        vec = row["vector"]
        assert vec and all(type(w) is int and w > 0 for w in vec.values())
        assert all(t and not re.search(r"\s", t) for t in vec)
        assert vec == _quantised(floats[row["id"]], SCALE)  # int(w * 100 + 0.5), zeros dropped
        assert list(vec.values()) == sorted(vec.values(), reverse=True)


def test_queries_are_tsv_with_each_term_repeated_by_its_weight(files) -> None:
    topics = _read_topics(files["queries"])
    floats = _floats(files["queries_float"])
    assert list(topics) == [*QUERIES, *SYNTAX_QUERIES]
    for qid, counts in topics.items():
        assert dict(counts) == _quantised(floats[qid], SCALE)
        assert all(n > 0 for n in counts.values())


def test_integer_impacts_rank_like_the_float_vectors(files) -> None:
    """Dot products of the integer impacts are ``SCALE**2`` times the float ones up to rounding, within the bound
    rounding allows (each weight moves by at most 0.5/SCALE), so every pair of documents whose float scores differ
    by more than their bounds keeps its order."""
    docs_f, queries_f = _floats(files["docs_float"]), _floats(files["queries_float"])
    docs_i = {r["id"]: r["vector"] for r in read_jsonl(files["docs"])}
    topics = _read_topics(files["queries"])
    decided = pairs = 0
    for qid, qf in queries_f.items():
        exact, approx, bound = {}, {}, {}
        for did, df in docs_f.items():
            shared = qf.keys() & df.keys()
            exact[did] = sum(qf[t] * df[t] for t in shared)
            approx[did] = sum(n * docs_i[did].get(t, 0) for t, n in topics[qid].items()) / SCALE**2
            bound[did] = sum((qf[t] + df[t]) * 0.5 / SCALE + 0.25 / SCALE**2 for t in shared)
            assert abs(approx[did] - exact[did]) <= bound[did] + 1e-6, (qid, did)
        ids = list(docs_f)
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                pairs += 1
                if abs(exact[a] - exact[b]) > bound[a] + bound[b]:
                    decided += 1
                    assert (approx[a] > approx[b]) == (exact[a] > exact[b]), (qid, a, b)
        top_float = max(exact, key=exact.get)
        top_int = max(approx, key=approx.get)
        assert top_int == top_float or abs(exact[top_int] - exact[top_float]) <= bound[top_int] + bound[top_float]
    assert decided >= pairs // 2, f"only {decided}/{pairs} pairs far enough apart to check: the test says little"


def test_quantize_scale_replaces_the_default_and_empty_queries_are_left_out(files, tmp_path) -> None:
    beir = write_beir(tmp_path / "beir")
    floats = _floats(files["queries_float"])
    out = tmp_path / "q10.tsv"
    result = _run(["--input", str(beir), "--kind", "queries", "--format", "anserini", "--quantize-scale", "10",
                   "--output", str(out)])
    assert result.exit_code == 0, result.output
    topics = _read_topics(out)
    assert list(topics) == list(QUERIES)
    for qid, counts in topics.items():
        assert dict(counts) == _quantised(floats[qid], 10)
    assert sum(len(c) for c in topics.values()) < sum(len(v) for v in floats.values())  # zeros were dropped

    # at scale 0.01 no SPLADE weight reaches 50: no query keeps a term, and an empty TSV query breaks Anserini
    assert max(w for vec in floats.values() for w in vec.values()) < 50
    empty = tmp_path / "q001.tsv"
    result = _run(["--input", str(beir), "--kind", "queries", "--format", "anserini", "--quantize-scale", "0.01",
                   "--output", str(empty)])
    assert result.exit_code == 0, result.output
    assert empty.read_text() == ""
    assert f"{len(QUERIES)} queries had no term left" in result.stderr


def test_explicit_jsonl_format_is_the_float_output(files, tmp_path) -> None:
    out = tmp_path / "q.jsonl"
    result = _run(["--input", str(files["beir"]), "--kind", "queries", "--format", "jsonl", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == files["queries_float"].read_bytes()
    assert any(not float(w).is_integer() for vec in _floats(out).values() for w in vec.values())


def test_terms_are_made_safe_for_the_whitespace_analyzer() -> None:
    from splade_obs.encoding import anserini_terms, write_vectors
    import scipy.sparse as sp

    vocab = ["[CLS]", "##s", "(", "a b", "tab\there", "", "x" * 256, "c d", "c%20d", "ok"]
    safe = anserini_terms(vocab)
    assert safe[:5] == ["[CLS]", "##s", "(", "a%20b", "tab%09here"]  # Lucene syntax stays; whitespace escaped
    assert safe[5:9] == [None, None, None, None]  # empty, too long for one token, clashing once escaped
    assert safe[9] == "ok"

    def write(ids, cols, kind):
        rows = len(ids)
        matrix = sp.csr_matrix((np.ones(rows), (np.arange(rows), cols)), shape=(rows, len(vocab)))
        buf = io.StringIO()
        write_vectors(buf, ids, matrix, safe, 100, texts=["t"] * rows, fmt="anserini", kind=kind)
        return buf.getvalue()

    assert write(["q1"], [3], "queries") == "q1\t" + " ".join(["a%20b"] * 100) + "\n"
    assert json.loads(write(["d1"], [0], "corpus")) == {"id": "d1", "contents": "t", "vector": {"[CLS]": 100}}
    with pytest.raises(DataError, match="vocabulary id 6, a term Anserini cannot index"):
        write(["d1"], [6], "corpus")
    with pytest.raises(DataError, match="tab or line break"):
        write(["q\t1"], [9], "queries")


# ------------------------------------------------------------------------------ Anserini itself, end to end
def _anserini_jar() -> Path | None:
    """``$SPLADE_OBS_ANSERINI_JAR``, the jar ``.ci/run`` fetches into ~/.cache/splade-obs/anserini, or pyserini's."""
    if os.environ.get("SPLADE_OBS_ANSERINI_JAR"):
        return Path(os.environ["SPLADE_OBS_ANSERINI_JAR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splade-obs" / "anserini"
    jars = sorted(cache.glob("anserini-*-fatjar.jar"))
    if not jars:
        import importlib.util

        spec = importlib.util.find_spec("pyserini")
        if spec and spec.submodule_search_locations:
            jars = sorted(Path(next(iter(spec.submodule_search_locations)), "resources", "jars").glob("*fatjar.jar"))
    return jars[-1] if jars else None


def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return 0
    return int(m.group(2) or 0) if m.group(1) == "1" else int(m.group(1))


def _jar_java_major(jar: Path) -> int:
    """The Java release Anserini's classes were compiled for (class-file major version - 44)."""
    import zipfile

    with zipfile.ZipFile(jar) as z, z.open("io/anserini/index/IndexCollection.class") as f:
        return int.from_bytes(f.read(8)[6:8], "big") - 44


@pytest.fixture(scope="module")
def anserini() -> list[str]:
    java, jar = shutil.which("java"), _anserini_jar()
    if java is None or jar is None or not jar.is_file():
        pytest.skip("needs Java and Anserini's fat jar (.ci/run fetches pyserini 0.22.1's into "
                    "~/.cache/splade-obs/anserini; or set SPLADE_OBS_ANSERINI_JAR)")
    needed = _jar_java_major(jar)
    if _java_major(java) < needed:
        pytest.skip(f"{jar.name} needs Java {needed}+, {java} is Java {_java_major(java)}")
    return [java, "-cp", str(jar)]


def test_anserini_indexes_and_searches_what_encode_wrote(files, anserini, tmp_path) -> None:
    index, run = tmp_path / "index", tmp_path / "run.trec"
    for main, args in [("io.anserini.index.IndexCollection",
                        ["-collection", "JsonVectorCollection", "-generator", "DefaultLuceneDocumentGenerator",
                         "-input", str(files["docs"].parent), "-index", str(index), "-threads", "1"]),
                       ("io.anserini.search.SearchCollection",
                        ["-index", str(index), "-topics", str(files["queries"]), "-topicreader", "TsvString",
                         "-output", str(run), "-hits", "100"])]:
        proc = subprocess.run([*anserini, main, *args, "-impact", "-pretokenized"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    hits: dict[str, dict[str, float]] = {}  # in the run's rank order
    for line in run.read_text().splitlines():
        qid, _, did, _rank, score, _tag = line.split()
        hits.setdefault(qid, {})[did] = float(score)
    docs = {r["id"]: r["vector"] for r in read_jsonl(files["docs"])}
    topics = _read_topics(files["queries"])
    assert set(hits) == set(topics)
    assert any(LUCENE_SYNTAX.search(t) for c in topics.values() for t in c)  # query syntax went through, literally
    for qid, counts in topics.items():
        ours = {did: sum(n * vec.get(t, 0) for t, n in counts.items()) for did, vec in docs.items()}
        assert hits[qid] == {did: float(s) for did, s in ours.items() if s > 0}, qid  # Anserini's scores = ours
        in_rank_order = [ours[did] for did in hits[qid]]
        assert in_rank_order == sorted(in_rank_order, reverse=True)  # Anserini's ranking is ours (ties aside)
