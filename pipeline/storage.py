"""Pluggable storage: every input and output path goes through fsspec, so a local folder and an
``s3://`` bucket are the same code path. Functions here take fsspec options as a dict (the
config's ``storage`` section becomes one in :func:`pipeline.config.fsspec_options`); models and
SAE checkpoints that loaders need as local files are copied once per node (:func:`local_copy`).
Hugging Face hub references (``hf://<org>/<repo>[/<file>]``, or a bare ``<org>/<repo>`` that is no
local path) are downloaded once per node into the hub's own cache (:func:`hub_path`), and read
from it offline (``HF_HUB_OFFLINE=1``). No project imports: every other module may use this one."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import botocore.exceptions
import fsspec
import huggingface_hub
import huggingface_hub.errors
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from fsspec.asyn import sync_wrapper
from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

S3_PROTOCOLS = ("s3", "s3a")
HUB = "hf://"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_ERRORS = (huggingface_hub.errors.EntryNotFoundError, huggingface_hub.errors.LocalEntryNotFoundError,
              huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.RevisionNotFoundError,
              huggingface_hub.errors.GatedRepoError, huggingface_hub.errors.HFValidationError)
LOCAL_PROTOCOLS = (None, "file", "local")
logger = logging.getLogger(__name__)


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
    """The fsspec filesystem for ``url`` and the path within it (an s3:// URL: :class:`S3FileSystem`)."""
    if protocol(url) in S3_PROTOCOLS:
        fs = S3FileSystem(**(storage_options or {}))
        return fs, fs._strip_protocol(str(url))
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


# --------------------------------------------------------------------------- s3:// requests: retries and failures

class StorageUnavailable(Exception):
    """An s3:// request that still failed once its retries were spent: the store could not be
    reached, or answered with a server error (5xx) every time. ``message`` names the s3:// path,
    the request and the last failure. Whatever the build wrote before stays: a rerun resumes.
    Not an OSError on purpose: code that takes an OSError for a bad file (a cut-off Parquet file
    deleted on resume, a truncated tar shard) must not take an unreachable store for one."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # str(self) may grow: Ray Data appends its own notes to args[0]

    def __reduce__(self):
        return type(self), (self.message,)


def unavailable_error(exc: BaseException | None) -> StorageUnavailable | None:
    """The StorageUnavailable behind ``exc`` — itself, its cause or context, or (raised in a Ray
    task) the task error's cause — if that is what ended it; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if isinstance(exc, StorageUnavailable):
            return exc
        if isinstance(exc, _UNREACHABLE):  # one that met no project hook (botocore's retries are spent)
            return StorageUnavailable(f"{_s3_url_of_endpoint(exc)}: no answer ({type(exc).__name__}: {exc}), "
                                      "retries spent")
        exc = exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------- outputs that cannot be written

# errno → what the user does about it. ENOSPC, EDQUOT, EROFS and EFBIG can only come from a write;
# EACCES and EPERM count only for a path under the output (reading an input is not writing).
WRITE_ERRNOS = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
                errno.EFBIG: "raise the file-size limit", errno.EROFS: "make the output writable",
                errno.EACCES: "grant write permission on the output", errno.EPERM: "grant write permission on the output"}
_ERRNO_IN_MESSAGE = re.compile(r"\[?errno (\d+)\]?", re.IGNORECASE)  # Arrow's and Ray's wrapped OSErrors


class OutputUnwritable(Exception):
    """A command's output could not be written (full, read-only, forbidden); with ``resumes`` (a
    build, a training run) what was written is kept and a rerun goes on from it."""

    def __init__(self, path: str, code: int, resumes: bool = True):
        self.path, self.code = path, code
        kept, then = ("what was written is kept: ", " to resume") if resumes else ("", "")
        super().__init__(f"cannot write {path}: {os.strerror(code)} (errno {code}); {kept}"
                         f"{WRITE_ERRNOS[code]} and rerun the same command{then}")


def write_failure(exc: BaseException | None, output: str, where: str, resumes: bool = True) -> OutputUnwritable | None:
    """The OutputUnwritable behind ``exc`` (itself, its cause or context, a Ray task's cause), if a
    write under ``output`` failed for want of space or permission; ``where`` names the path when
    the error does not (Arrow's write errors name none; a Ray task's error may carry the task's
    OSError only as text)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutputUnwritable):
            return exc
        code, path = (exc.errno, exc.filename) if isinstance(exc, OSError) else (None, None)
        if code is None and (found := _ERRNO_IN_MESSAGE.search(str(exc))):
            code = int(found.group(1))
        if code is None and isinstance(exc, PermissionError):  # s3fs's AccessDenied
            code = errno.EACCES
        if code in WRITE_ERRNOS:
            if code not in (errno.EACCES, errno.EPERM):
                return OutputUnwritable(str(path) if path else where, code, resumes)
            if isinstance(exc, OSError) and (path is None or _under(str(path), output)):
                return OutputUnwritable(str(path) if path else where, code, resumes)
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception
        exc = inner if isinstance(inner, BaseException) else exc.__cause__ or exc.__context__
    return None


def _under(path: str, output: str) -> bool:
    if not is_remote(output):
        path, output = os.path.abspath(path), os.path.abspath(output)
    return str(path).split("://", 1)[-1].startswith(str(output).split("://", 1)[-1].rstrip("/"))


def _s3_url_of_endpoint(exc: BaseException) -> str:
    """s3://bucket/key of the path-style endpoint URL a botocore connection error names."""
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")
    path = url.split("://", 1)[-1].split("/", 1)[1] if url.count("/") >= 3 else ""
    return f"s3://{path.split('?', 1)[0]}" if path else "s3://(the store)"


# What a request ends with when its retries met a store that is down or failing, not an answer
# about the object (no such key, access denied, ...).
_UNREACHABLE = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)


class _Outages:
    """Per process and store (endpoint host): since when every attempt has failed, not one answered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def answered(self, store: str) -> None:
        with self._lock:
            self._since.pop(store, None)

    def failing_for(self, store: str) -> float:
        """Seconds since the first of the failures in a row (0 for the first one)."""
        with self._lock:
            now = time.monotonic()
            return now - self._since.setdefault(store, now)


_OUTAGES = _Outages()


def _operation(method: str) -> str:
    return "".join(word.title() for word in method.split("_"))  # get_object → GetObject


def _s3_url(params: dict[str, Any]) -> str:
    return f"s3://{params.get('Bucket', '')}/{params.get('Key') or params.get('Prefix') or ''}"


def _status(status: int, code: str | None) -> str:
    """'HTTP 503 SlowDown'; 'HTTP 500' for an answer without an error code (HEAD has no body)."""
    return f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")


def _server_error(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """The 5xx ClientError behind an error s3fs translated (into an OSError), if that is what it is."""
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError) and \
            cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
        return cause
    return None


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs for every s3:// path of the project (see :func:`filesystem`), retrying as the storage
    section says and telling what happens:

    - botocore retries each request (``config_kwargs.retries``: storage.max_attempts, retry_mode);
      every retry is logged (logger ``pipeline.storage``, WARNING): ``[sae-traits] retrying s3
      GetObject s3://bucket/key (attempt 2 of 8) after HTTP 503 SlowDown``; a GetObject answer that
      breaks off mid-body (read again by s3fs) likewise;
    - once every request of this process to the store has failed for ``give_up_after_s`` seconds
      in a row (no answer, or 5xx; storage.give_up_after_s), failed attempts are no longer retried:
      an outage ends the build in about that time instead of after every request's backoffs;
    - a request that fails once its retries are spent raises :class:`StorageUnavailable` naming
      its s3:// path (not the raw botocore error, and not retried again by an outer s3fs loop).

    Pickles like s3fs (Ray tasks get it through :func:`arrow_filesystem`); its hooks are put on
    each client it makes, in whichever process."""

    def __init__(self, *args, give_up_after_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.give_up_after_s = give_up_after_s

    async def set_session(self, refresh=False, kwargs={}):
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        events = client.meta.events
        events.register("before-parameter-build.s3", _note_url, unique_id="sae-traits-note-url")
        events.register_first("needs-retry.s3", functools.partial(_after_attempt, give_up_after_s=self.give_up_after_s),
                              unique_id="sae-traits-after-attempt")
        events.register("request-created.s3", _log_retry, unique_id="sae-traits-log-retry")
        return client

    async def _call_s3(self, method, *akwarglist, **kwargs):
        params = {k: v for a in akwarglist for k, v in a.items()} | kwargs
        try:
            resp = await super()._call_s3(method, *akwarglist, **kwargs)
        except _UNREACHABLE as exc:
            raise StorageUnavailable(f"{_s3_url(params)}: no answer to {_operation(method)} "
                                     f"({type(exc).__name__}: {exc}), retries spent") from exc
        except OSError as exc:
            if (error := _server_error(exc)) is None:
                raise
            status = _status(error.response["ResponseMetadata"]["HTTPStatusCode"], error.response["Error"].get("Code"))
            raise StorageUnavailable(f"{_s3_url(params)}: {_operation(method)} answered {status} ({exc}), "
                                     "retries spent") from exc
        if method == "get_object" and "Body" in resp:
            resp["Body"] = _WatchedBody(resp["Body"], _s3_url(params))
        return resp

    call_s3 = sync_wrapper(_call_s3)  # s3fs binds its own _call_s3 to call_s3, which its files use (writes)

    async def _mkdir(self, path, *args, **kwargs):
        # s3fs probes the bucket first and takes a failed probe for no bucket: the request that
        # fails is then CreateBucket, which names no more than the bucket. Name the folder too.
        try:
            return await super()._mkdir(path, *args, **kwargs)
        except StorageUnavailable as exc:
            raise StorageUnavailable(f"creating s3://{self._strip_protocol(path)}: {exc.message}") from exc

    mkdir = sync_wrapper(_mkdir)  # s3fs binds its own _mkdir to mkdir


class _WatchedBody:
    """A GetObject body whose failed read is logged: the answer broke off after its headers (s3fs's
    own retry loop then asks for the object again)."""

    def __init__(self, body, url: str):
        self._body, self._url = body, url

    def __getattr__(self, name):
        return getattr(self._body, name)

    async def read(self, *args, **kwargs):
        try:
            return await self._body.read(*args, **kwargs)
        except Exception as exc:
            logger.warning("[sae-traits] retrying s3 GetObject %s: the answer broke off (%s)", self._url,
                           type(exc).__name__)
            raise

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return await self._body.__aexit__(*exc)


def _note_url(params, context, **_):
    """before-parameter-build: the s3:// path of the request, for the log lines."""
    context["sae_traits_url"] = _s3_url(params)


def _after_attempt(request_dict, response=None, caught_exception=None, endpoint=None, operation=None,
                   give_up_after_s=30.0, **_):
    """needs-retry, first of its handlers (after each attempt, before botocore decides): note what
    the attempt got; veto the retry (False) once the store has failed for give_up_after_s."""
    store = getattr(endpoint, "host", "")
    if caught_exception is None and (response is None or response[0].status_code < 500):
        _OUTAGES.answered(store)  # an answer, if only a 404: the store is there
        return None
    if caught_exception is not None:
        failure = type(caught_exception).__name__
    else:
        failure = _status(response[0].status_code, response[1].get("Error", {}).get("Code"))
    context = request_dict["context"]
    context["sae_traits_failure"] = failure
    failing = _OUTAGES.failing_for(store)
    if failing < give_up_after_s:
        return None
    logger.warning("[sae-traits] not retrying s3 %s %s: every request to %s has failed for %.0f s "
                   "(storage.give_up_after_s), this one with %s", getattr(operation, "name", ""),
                   context.get("sae_traits_url", ""), store, failing, failure)
    return False


def _log_retry(request, operation_name, **_):
    """request-created (each attempt): a second or later attempt is a retry, logged."""
    context = getattr(request, "context", None) or {}
    retries = context.get("retries") or {}
    attempt = retries.get("attempt", 1)
    if attempt > 1:
        most = f" of {retries['max']}" if retries.get("max") else ""
        logger.warning("[sae-traits] retrying s3 %s %s (attempt %d%s) after %s", operation_name,
                       context.get("sae_traits_url", request.url), attempt, most,
                       context.get("sae_traits_failure", "a failed attempt"))


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
    local = is_local(fs)
    if local:  # an object store has no folders (s3fs would only probe, or create, the bucket)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    target = f"{path}.partial" if local else path
    try:
        with fs.open(target, "wb") as f:
            f.write(data)
    except OSError:
        if local and os.path.exists(target):  # a disk that filled up mid-write: leave nothing half-written
            os.unlink(target)
        raise
    if local:
        fs.mv(target, path)


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
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


def describe_size(url: str, storage_options: dict | None = None) -> str:
    """``N bytes`` for a file, ``a folder: NAME N bytes, ...`` for a folder (what an error says of a path)."""
    try:
        fs, path = filesystem(url, storage_options)
        if fs.isdir(path):
            files = sorted((posixpath.basename(e["name"]), e.get("size") or 0) for e in fs.ls(path, detail=True)
                           if e.get("type") == "file")
            return "a folder: " + (", ".join(f"{name} {size:,} bytes" for name, size in files[:6]) or "no files")
        return f"{fs.size(path):,} bytes"
    except Exception:  # a hub reference, or a path the store will not describe
        return "size unknown"


def move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a file or folder: a rename on a local disk; on an object store each object copied
    (server-side), then deleted, so a move cut short is finished by running it again."""
    if is_local(fs) and not fs.exists(dst):
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    files = [src] if fs.isfile(src) else sorted(fs.find(src))
    for path in files:
        target = dst if path == src else join(dst, posixpath.relpath(path, src))
        fs.copy(path, target)
        fs.rm(path)


def count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows of a Parquet folder, from the footers only."""
    return sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in parquet_files(fs, path))


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> dict | None:
    """Create ``path`` holding ``data`` only if nothing is there: the written object's info (its
    ``ETag`` on an object store) when this call created it, None when another was first. A local
    file is written beside it and linked into place, so no reader ever sees it half written; an
    object store gets a conditional PutObject (If-None-Match). The one exclusive create of the
    project: the output lease's records and the claims below."""
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".create-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)  # fails if the name exists
            return {}
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
    try:
        return fs.pipe_file(path, data, mode="create") or {}
    except FileExistsError:
        return None


def claim_once(fs: fsspec.AbstractFileSystem, marker: str) -> bool:
    """True the first time any process asks for ``marker`` (a file created then), False after:
    an exclusive create, so two processes reaching it together claim it once."""
    fs.makedirs(posixpath.dirname(marker), exist_ok=True)
    try:
        return create_exclusive(fs, marker, b"") is not None
    except (ValueError, NotImplementedError):  # a store without exclusive create
        if fs.exists(marker):
            return False
        fs.touch(marker)
        return True
