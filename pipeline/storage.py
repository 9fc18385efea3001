"""Pluggable storage: every input and output path goes through fsspec, so a local folder and an
``s3://`` bucket are the same code path. Functions here take fsspec options as a dict (the
config's ``storage`` section becomes one in :func:`pipeline.config.fsspec_options`); models and
SAE checkpoints that loaders need as local files are copied once per node (:func:`local_copy`).
Hugging Face hub references (``hf://<org>/<repo>[/<file>]``, or a bare ``<org>/<repo>`` that is no
local path) are downloaded once per node into the hub's own cache (:func:`hub_path`), and read
from it offline (``HF_HUB_OFFLINE=1``). No project imports: every other module may use this one."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import huggingface_hub
import huggingface_hub.errors
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

S3_PROTOCOLS = ("s3", "s3a")
HUB = "hf://"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_ERRORS = (huggingface_hub.errors.EntryNotFoundError, huggingface_hub.errors.LocalEntryNotFoundError,
              huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.RevisionNotFoundError,
              huggingface_hub.errors.GatedRepoError, huggingface_hub.errors.HFValidationError)
LOCAL_PROTOCOLS = (None, "file", "local")


def protocol(url: str) -> str | None:
    """``s3`` for s3://bucket/key, None for a plain path (or a hub id)."""
    return fsspec.core.split_protocol(str(url))[0]


def is_remote(url: str) -> bool:
    return protocol(url) not in LOCAL_PROTOCOLS


def hub_reference(url: str) -> tuple[str, str | None] | None:
    """(repo id, file in it or None for the whole repo) of a hub reference: ``hf://org/repo[/file]``,
    or ``org/repo`` that is no local path; None for anything else."""
    url = str(url)
    if url.startswith(HUB):
        org, _, rest = url[len(HUB):].partition("/")
        repo, _, file = rest.partition("/")
        return f"{org}/{repo}", file or None
    if HUB_REPO_ID.match(url) and not Path(url).exists():
        return url, None
    return None


def hub_path(url: str, revision: str | None = None) -> str:
    """The local path of a hub reference (a file, or a repo's snapshot folder), downloaded into the
    hub's cache once (then read from it, offline too). A reference the hub (or, offline, the cache)
    does not have is a FileNotFoundError naming the repo, the file and the revision."""
    repo, file = hub_reference(url)
    try:
        if file:
            return huggingface_hub.hf_hub_download(repo, file, revision=revision)
        return huggingface_hub.snapshot_download(repo, revision=revision)
    except HUB_ERRORS as exc:
        where = "the local hub cache (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE \
            else "the Hugging Face hub"
        raise FileNotFoundError(f"{url}: {f'file {file!r} of ' if file else ''}hub repo {repo!r} at revision "
                                f"{revision or 'main'} is not in {where} ({type(exc).__name__})") from None


def hub_commit(url: str, revision: str | None = None, file: str = "config.json") -> str | None:
    """The commit a hub reference resolves to (for the manifest): from the cached snapshot path of
    its file (or of ``file`` for a whole repo); None when ``url`` is no hub reference."""
    ref = hub_reference(url)
    if ref is None:
        return None
    repo, in_repo = ref
    path = Path(hub_path(f"{HUB}{repo}/{in_repo or file}", revision))
    return path.parents[len(Path(in_repo or file).parts) - 1].name  # .../snapshots/<commit>/<file>


def cache_dir() -> Path:
    """Where :func:`local_copy` keeps its copies on this node: $SAE_TRAITS_CACHE, else ~/.cache/sae-traits."""
    return Path(os.environ.get("SAE_TRAITS_CACHE") or Path.home() / ".cache" / "sae-traits")


def local_path(url: str, options: dict[str, Any] | None = None, revision: str | None = None) -> str:
    """A local path holding ``url``: a hub reference's in the hub's cache (:func:`hub_path`, at
    ``revision``), a remote URL's copy (:func:`local_copy`), a local path as it is."""
    return hub_path(url, revision) if hub_reference(url) is not None else local_copy(url, options)


def local_copy(url: str, options: dict[str, Any] | None = None, cache: str | Path | None = None) -> str:
    """A local path holding ``url`` (a file or a folder), for loaders that need local files
    (``from_pretrained``, safetensors). Local paths and hub ids come back unchanged. A remote URL
    is downloaded once per node into ``cache`` (default :func:`cache_dir`) under a digest of the
    URL and endpoint, then reused without contacting the store: remote models and checkpoints are
    taken to be immutable (write a new one to a new path). The copy is atomic: it is made in a
    temporary folder beside the cache and renamed into place, under a lock, so concurrent actors
    on a node download it once and never see half a copy."""
    url = str(url)
    if not is_remote(url) or hub_reference(url) is not None:
        return url
    options = dict(options or {})
    endpoint = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    digest = hashlib.sha256(json.dumps([url.rstrip("/"), endpoint]).encode()).hexdigest()[:32]
    root = Path(cache or cache_dir())
    final = root / digest
    target = final / (posixpath.basename(url.rstrip("/").split("://", 1)[-1]) or "root")
    if target.exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait and reuse it
        if target.exists():
            return str(target)
        fs, path = filesystem(url, options)
        tmp = Path(tempfile.mkdtemp(prefix=f"{digest}.", suffix=".partial", dir=root))
        try:
            _download(fs, path.rstrip("/"), tmp / target.name, url)
            if final.exists():  # a copy without its content (removed by hand): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _download(fs: fsspec.AbstractFileSystem, path: str, dest: Path, url: str) -> None:
    if fs.isdir(path):
        files = [f for f in fs.find(path) if not f.endswith("/")]
        if not files:
            raise FileNotFoundError(f"{url}: an empty folder")
        for file in files:
            local = dest / posixpath.relpath(file, path)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(file, str(local))
    elif fs.isfile(path):
        fs.get_file(path, str(dest))
    else:
        raise FileNotFoundError(f"{url} does not exist")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def stable_digest(values: list[str], n: int = 16) -> str:
    """A short digest of a list of ids: deterministic names, so a retried task overwrites its own
    output instead of duplicating it."""
    h = hashlib.sha1()
    for v in values:
        h.update(str(v).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def parquet_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The Parquet files of a folder (sorted, at any depth), or the file itself; none when absent."""
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` so that it appears whole or not at all, even if the process is killed
    mid-write (what resume relies on): a local file is written beside and renamed; an object
    store's upload is all-or-nothing already."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    local = is_local(fs)
    target = f"{path}.partial" if local else path
    with fs.open(target, "wb") as f:
        f.write(data)
    if local:
        fs.mv(target, path)


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    publish(fs, path, sink.getvalue().to_pybytes())


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    publish(fs, path, json.dumps(obj, indent=2).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path) as f:
        return json.load(f)


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a folder of Parquet files (an empty folder gives no rows)."""
    if fs.isdir(path):
        tables = [pq.read_table(fs.open(p, "rb"), columns=columns) for p in parquet_files(fs, path)]
        tables = [t for t in tables if t.num_columns]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    return pq.read_table(fs.open(path, "rb"), columns=columns)


def arrow_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """A pyarrow filesystem + path for Ray Data's read/write_parquet (local paths stay native)."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        return LocalFileSystem(), path
    return PyFileSystem(FSSpecHandler(fs)), path


def count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows of a Parquet folder, from the footers only."""
    return sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in parquet_files(fs, path))


def claim_once(fs: fsspec.AbstractFileSystem, marker: str) -> bool:
    """True the first time any process asks for ``marker`` (a file created then), False after:
    an exclusive create, so two processes reaching it together claim it once."""
    fs.makedirs(posixpath.dirname(marker), exist_ok=True)
    try:
        with fs.open(marker, "xb"):
            return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # a store without exclusive create
        if fs.exists(marker):
            return False
        fs.touch(marker)
        return True
