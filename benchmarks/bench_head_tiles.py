"""CPU tiling of the fused SPLADE head: vocabulary-block tiles (the library's) vs token-chunk tiles (before).

The CPU forward computes, per document, ``max over tokens of (hidden @ W.T + b)`` for all 30,522 terms. How
the ``(terms x tokens)`` logits are cut into tiles decides whether each tile is read back from cache or from
memory:

* *token chunks* (the former layout, kept here as the baseline): all 30,522 terms x ``chunk`` tokens per
  tile, 7.8 MiB in fp32 at 64 tokens, larger than a core's L2;
* *vocabulary blocks* (``splade_obs.model._max_per_document``): all of a document's tokens x a block of
  terms, ``_CPU_TILE_ELEMENTS`` elements per tile (2 MiB by default).

For each document length, the median over interleaved repeats of the milliseconds per document, on random
hidden states and the real splade-tiny projection (weight, bias); the outputs are checked equal to fp32
rounding.

    OMP_NUM_THREADS=2 python benchmarks/bench_head_tiles.py     # writes benchmarks/results/bench_head_tiles.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime
from pathlib import Path

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import RESULTS, machine, table, write_json


def token_chunk_tiles(hidden, weight, bias, mask, chunk: int):
    """The baseline: per document, ``(V, chunk)`` tiles, reduced into a running max."""
    import torch

    values = torch.full((hidden.shape[0], weight.shape[0]), float("-inf"), dtype=weight.dtype)
    bias_col = bias.unsqueeze(1)
    for b in range(hidden.shape[0]):
        tokens = hidden[b].index_select(0, mask[b].nonzero().squeeze(1))
        for start in range(0, tokens.shape[0], chunk):
            tile = torch.addmm(bias_col, weight, tokens[start:start + chunk].t())
            torch.maximum(values[b], tile.amax(dim=1), out=values[b])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,128,256,512", help="document lengths in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_head_tiles.json")
    args = parser.parse_args()

    import torch

    import splade_obs.model as model
    from splade_obs.model import SpladeEncoder

    enc = SpladeEncoder.from_pretrained("splade-tiny")
    proj = enc.mlm.get_output_embeddings()
    weight, bias = proj.weight.detach().float().contiguous(), proj.bias.detach().float()
    default_tile = model._CPU_TILE_ELEMENTS
    variants = {"token chunks of 64": ("chunk", 64), "token chunks of 128": ("chunk", 128),
                "vocab blocks, 256K-element tiles": ("block", 1 << 18),
                f"vocab blocks, {default_tile >> 10}K (default)": ("block", default_tile),
                "vocab blocks, 1M-element tiles": ("block", 1 << 20)}
    baseline = "token chunks of 64"
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for length in (int(x) for x in args.lengths.split(",")):
            hidden = torch.randn(args.batch_size, length, weight.shape[1])
            mask = torch.ones(args.batch_size, length, dtype=torch.bool)

            def run(kind: str, size: int):
                if kind == "chunk":
                    return token_chunk_tiles(hidden, weight, bias, mask, size)
                model._CPU_TILE_ELEMENTS = size
                try:
                    return model._max_per_document(hidden, weight, bias, mask)
                finally:
                    model._CPU_TILE_ELEMENTS = default_tile

            reference = run("chunk", 64)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for name, spec in variants.items():
                torch.testing.assert_close(run(*spec), reference, rtol=1e-5, atol=1e-5)  # also the warm-up
            for _ in range(args.repeats):  # interleaved: a slow moment of a shared machine hits every variant
                for name, spec in variants.items():
                    start = time.perf_counter()
                    run(*spec)
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1000 * statistics.median(t) / args.batch_size for name, t in times.items()}
            rows.append({"length": length, "ms_per_doc": ms,
                         "speedup_vs_baseline": {name: ms[baseline] / v for name, v in ms.items()}})

    names = list(variants)
    print(f"fused head forward on CPU, ms per document (median of {args.repeats}), batch {args.batch_size}, "
          f"splade-tiny projection ({weight.shape[0]} x {weight.shape[1]})")
    print(table([("length", ">7"), *((n, ">34") for n in names)],
                ([row["length"], *(f"{row['ms_per_doc'][n]:.2f} ({row['speedup_vs_baseline'][n]:.2f}x)" for n in names)]
                 for row in rows)))
    result = {"benchmark": "bench_head_tiles", "date": datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "baseline": baseline, "default_tile_elements": default_tile,
              "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
