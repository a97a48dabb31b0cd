"""Train splade-tiny from a list of dicts, with a sink of your own next to the built-in ones.

    python examples/train_from_records.py [OUTPUT_DIR]

A few steps on records made in Python (the training-file schema: query, positive(s), optional negatives and
teacher scores). The run is tracked in MLflow (./mlruns) and traced (OUTPUT_DIR/logs/traces.jsonl) as
`splade-obs train` would; the sink below prints each step's loss and sparsity.
"""

from __future__ import annotations

import sys

from splade_obs import Sink, TrainConfig, train
from splade_obs.events import RunFinished, StepDone

CITIES = [("Lyon", "the Rhone"), ("Vienna", "the Danube"), ("Cairo", "the Nile"), ("Cologne", "the Rhine"),
          ("London", "the Thames"), ("Budapest", "the Danube"), ("Prague", "the Vltava"), ("Paris", "the Seine")]


def records() -> list[dict]:
    """One record per city: the passage that answers, and another city's passage as a hard negative."""
    passages = [f"{city} lies on {river}, which flows through the old town." for city, river in CITIES]
    return [{"query": f"which river flows through {city}?", "positive": passages[i],
             "negatives": [passages[(i + 1) % len(passages)]]} for i, (city, _) in enumerate(CITIES)]


class LossPrinter(Sink):
    """A user sink: override the hooks you need (on_<event kind>); a sink that raises never stops the run."""

    name = "loss-printer"

    def on_step_done(self, e: StepDone) -> None:
        print(f"step {e.step}/{e.total_steps}: loss {e.loss:.4f}, query terms {e.query_nnz:.0f}, "
              f"document terms {e.doc_nnz:.0f}", flush=True)

    def on_run_finished(self, e: RunFinished) -> None:
        print(f"run {e.status.lower()} after {e.step} steps", flush=True)


def main() -> None:
    output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/example-records"
    config = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": output_dir},
        "optim": {"batch_size": 4, "max_steps": 3, "seed": 7},
        "model": {"max_query_length": 16, "max_doc_length": 32},
        "logging": {"progress": "none"},
    })
    result = train(config, data=records(), sinks=[LossPrinter()])
    print(f"model: {result.model_path}")
    print(f"final metrics: {result.metrics}")
    print(f"MLflow run: {result.run_id}, trace: {result.trace_id}")


if __name__ == "__main__":
    main()
