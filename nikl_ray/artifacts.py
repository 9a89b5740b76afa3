"""Results layout, atomic writes and stage manifests.

Every stage writes its files under one results root and finishes by writing a manifest
(`manifest.json`) that records what it was given (inputs, config) and the checksums of the
files it vouches for. A stage whose manifest matches its inputs and whose files still match
their checksums is skipped; anything else is recomputed, so a crashed or resubmitted pipeline
resumes instead of starting over, and a truncated file is never used silently.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | Path, array) -> Path:
    """A float32 `.npy` (read back with allow_pickle=False)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_PACKAGE = Path(__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """The nikl_ray modules a source file imports (at the top or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nikl_ray"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from nikl_ray.stages import split`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nikl_ray"))
    return found


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return _PACKAGE / "__init__.py"
    rel = Path(*parts)
    for cand in (_PACKAGE / rel.with_suffix(".py"), _PACKAGE / rel / "__init__.py"):
        if cand.exists():
            return cand
    return None


def code_files(module: str) -> set[Path]:
    """The source of `module` and of every nikl_ray module it reaches through its imports."""
    seen, todo = set(), [module]
    while todo:
        path = _module_file(todo.pop())
        if path is not None and path not in seen:
            seen.add(path)
            todo.extend(_imports(path))
    return seen


@functools.lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """The package version + a hash of code_files(module): a stage whose code changed is never
    skipped silently, and one whose code did not is not redone for another stage's change."""
    from nikl_ray import __version__

    h = hashlib.sha256()
    for f in sorted(code_files(module)):
        h.update(f.relative_to(_PACKAGE).as_posix().encode() + b"\0" + f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def write_manifest(stage_dir: str | Path, *, inputs: dict, files: list[str | Path], code: str,
                   extra: dict | None = None) -> Path:
    """Vouch for `files` (paths under `stage_dir`) as the result of `inputs`, made by the code of
    module `code` (the stage's, see code_version)."""
    stage_dir = Path(stage_dir)
    checksums = {}
    for f in files:
        rel = Path(f).resolve().relative_to(stage_dir.resolve()).as_posix()
        checksums[rel] = sha256_file(stage_dir / rel)
    manifest = {"inputs": inputs, "inputs_hash": sha256_json(inputs), "files": checksums,
                "code_version": code_version(code), **(extra or {})}
    return write_json(stage_dir / MANIFEST, manifest)


def fresh_run_dir(d: Path, inputs: dict, code: str) -> None:
    """Ray Train resumes a run whose folder holds checkpoints of the same name: right after a kill,
    wrong after a change. A folder made for other inputs (or other code of stage `code`) is cleared."""
    import logging
    import shutil

    marker = {"inputs": inputs, "code_version": code_version(code)}
    path = Path(d) / "run_inputs.json"
    if Path(d).exists() and (not path.exists() or read_json(path) != marker):
        logging.getLogger(code).info("%s: made for other inputs or code: starting it over", Path(d).name)
        shutil.rmtree(d)
    if not path.exists():
        write_json(path, marker)


def manifest_problem(stage_dir: str | Path, inputs: dict, code: str) -> str | None:
    """Why the stage in `stage_dir` must (re)run for `inputs` with the code of module `code`, or None
    when it is complete."""
    stage_dir = Path(stage_dir)
    path = stage_dir / MANIFEST
    if not path.exists():
        return "not run yet"
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        return f"manifest unreadable ({e})"
    if manifest.get("inputs_hash") != sha256_json(inputs):
        return "inputs or config changed"
    if manifest.get("code_version") != code_version(code):
        return f"its code changed (made by {manifest.get('code_version')}, now {code_version(code)})"
    for rel, digest in manifest.get("files", {}).items():
        f = stage_dir / rel
        if not f.exists():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} was truncated or altered"
    return None


def load_manifest(stage_dir: str | Path) -> dict:
    return read_json(Path(stage_dir) / MANIFEST)
