"""Sparse vectors on disk (splade_obs.csr_store): written by blocks, transposed on disk, searched memory-mapped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from splade_obs.csr_store import CsrWriter, is_memory_mapped, open_csr, release_pages, transpose_to
from splade_obs.errors import DataError
from splade_obs_cli.main import cli

from ._eval_utils import write_beir

QUALITY = ("ndcg@10", "mrr@10", "recall@100", "map@100", "query_nnz", "doc_nnz", "retrieval_flops",
           "index_size_mb", "num_docs", "num_queries")


def _matrix() -> sp.csr_matrix:
    m = sp.random(400, 150, density=0.04, format="lil", dtype=np.float32, random_state=3)
    m[7, :] = 0  # an empty document
    m[:, 11] = 0  # a term no document has
    return m.tocsr()


def test_blocks_written_to_disk_read_back_memory_mapped_and_transposed_like_scipy(tmp_path):
    m = _matrix()
    writer = CsrWriter(tmp_path / "docs", m.shape[1])
    for start in range(0, m.shape[0], 37):
        writer.append(m[start:start + 37])
    docs = open_csr(writer.close())
    assert docs.shape == m.shape and (docs != m).nnz == 0
    assert is_memory_mapped(docs.data) and is_memory_mapped(docs.indices)
    ref = m.T.tocsr()
    ref.sort_indices()
    for chunk in (1, 100, m.nnz, 10 ** 9):  # rows one by one, a few at a time, all at once
        post = transpose_to(docs, tmp_path / f"postings{chunk}", chunk=chunk)
        assert post.shape == ref.shape
        assert np.array_equal(post.indptr, ref.indptr) and np.array_equal(post.indices, ref.indices)
        assert np.array_equal(post.data, ref.data)
        assert is_memory_mapped(post.data)


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise(MADV_DONTNEED) here")
def test_pages_read_from_a_map_leave_the_process_and_come_back_on_reading(tmp_path):
    """What keeps transposing a large index from holding the whole document matrix in memory."""
    writer = CsrWriter(tmp_path / "m", 1000)
    rows = 64 * 1024 * 1024 // 8 // 100  # 64 MB of weights and indices, 100 a row
    writer.append(sp.csr_matrix((np.ones(rows * 100, np.float32), np.tile(np.arange(100), rows),
                                 np.arange(0, rows * 100 + 1, 100)), shape=(rows, 1000)))
    m = open_csr(writer.close())
    before = _rss_mb()
    assert float(m.data.sum()) + float(m.indices.sum()) == rows * 100 * (1 + 49.5)  # every page read
    assert _rss_mb() - before > 50
    release_pages(m.data, m.indices, np.zeros(3))  # an in-memory array is passed over
    assert _rss_mb() - before < 10
    assert float(m.data.sum()) == rows * 100  # the same values, read again from the page cache


def test_a_folder_without_meta_is_refused(tmp_path):
    writer = CsrWriter(tmp_path / "docs", 5)
    writer.append(sp.csr_matrix(np.eye(3, 5, dtype=np.float32)))  # never closed: an interrupted write
    with pytest.raises(DataError, match="no complete sparse matrix"):
        open_csr(tmp_path / "docs")


@pytest.mark.parametrize("idf_power", [0.0, 0.5])
def test_evaluation_from_disk_equals_in_memory(tmp_path, monkeypatch, idf_power):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    beir = write_beir(tmp_path / "beir")
    results = {}
    for name, extra in (("memory", []), ("disk", ["--index-dir", str(tmp_path / "index")])):
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(beir), "--progress", "none",
                                       "--batch-size", "4", "--idf-power", str(idf_power), "--output", str(out),
                                       "--trec-run", str(tmp_path / f"{name}.run"), *extra])
        assert res.exit_code == 0, res.output
        results[name] = json.loads(out.read_text())["metrics"]
    mem, disk = ({k: results[n][k] for k in QUALITY} for n in ("memory", "disk"))
    runs = [(tmp_path / f"{n}.run").read_text().splitlines() for n in ("memory", "disk")]
    if idf_power == 0:  # the same posting lists, value for value: the same run, byte for byte
        assert disk == mem and runs[0] == runs[1] and runs[0]
    else:  # the queries carry the idf instead of the documents: the same product up to float rounding
        assert disk == pytest.approx(mem, rel=1e-6)
        assert [r.split()[:4] for r in runs[1]] == [r.split()[:4] for r in runs[0]]
        scores = [[float(r.split()[4]) for r in run] for run in runs]
        assert scores[1] == pytest.approx(scores[0], rel=1e-5, abs=2e-6)
    index = open_csr(tmp_path / "index" / "postings")
    assert index.shape[1] == 10 and is_memory_mapped(index.indices)


def test_parts_concatenate_on_disk_chunk_by_chunk_into_the_stacked_matrix(tmp_path):
    """How rank 0 merges the shards the torchrun ranks wrote: the rows of every part in order, read a few
    non-zeros at a time (chunk 7 here), equal to vstack in memory; an empty part is fine; the parts are removed."""
    from splade_obs.csr_store import concat_to

    rng = np.random.default_rng(4)
    blocks = [sp.random(n, 50, density=0.2, format="csr", random_state=rng, dtype=np.float32) for n in (9, 0, 13)]
    parts = []
    for i, block in enumerate(blocks):
        writer = CsrWriter(tmp_path / f"docs.part{i}-of-3", 50)
        writer.append(block)
        parts.append(writer.close())
    merged = concat_to(parts, tmp_path / "docs", chunk=7)
    expected = sp.vstack(blocks, format="csr")
    assert merged.shape == (22, 50) and (merged != expected).nnz == 0
    assert (open_csr(tmp_path / "docs") != expected).nnz == 0 and not any(p.exists() for p in parts)
