"""One writer per output: the lease a build (or the SAE trainer) holds on its output folder.

Before it writes anything a driver creates ``OUT/_build/lease/<generation>.json`` naming itself
(host, pid, Ray job, start time) and refreshes it every :data:`REFRESH_S` seconds. The highest
generation is the holder. Creating a generation is exclusive — a local file is linked into place
(``link`` fails if the name exists), an ``s3://`` object is put with ``If-None-Match: *`` — so of
two drivers that want the same output, exactly one gets it; never read-then-write.

A second driver finds the holder and judges it (:func:`judge`):
- on this machine (same host, boot and pid namespace): alive while its pid runs with the same
  start time, dead at once otherwise (a killed driver's rerun resumes immediately);
- naming a Ray job on a cluster that answers: alive while the job runs, dead once it has ended;
- otherwise unprovable: alive until its record has not been refreshed for ``output_lease_s``.
A live holder means :class:`OutputBusy` (exit 4 in the drivers); a dead or expired one is taken
over by creating the next generation. Readers (report, export, review, another build's reuse)
never take the lease and never wait for it.

The holder's refresh also notices when it has lost the lease (a newer generation exists, or its
record is gone: it looked expired to another driver) and interrupts the driver, which stops
writing. Creating the record is the build's writability probe: a read-only, full or forbidden
output fails here, before Ray starts."""

from __future__ import annotations

import _thread
import json
import logging
import os
import posixpath
import socket
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.contract import STATE

LEASE = f"{STATE}/lease"
REFRESH_S = 2.0
GCS_CONNECT_TIMEOUT_S = 1.0  # a Ray cluster that does not answer this fast cannot prove anything
logger = logging.getLogger(__name__)


class OutputBusy(Exception):
    """Another live driver holds the output; ``message`` names it, since when, and what to do."""


class LeaseLost(Exception):
    """This driver's lease was taken over by another driver (it had stopped refreshing it)."""


# --------------------------------------------------------------------------- who holds it, and is it alive?

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): a pid reused
    by another process has another."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _machine() -> dict[str, str | None]:
    """What makes two records 'this machine': the host name, its boot and the pid namespace (two
    containers on one kernel share a boot id but not pids)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def holder_record(what: str) -> dict[str, Any]:
    pid = os.getpid()
    # token: this lease's own mark, to know a record as ours when a retried write's first answer was lost
    return {"what": what, "token": uuid.uuid4().hex, **_machine(), "pid": pid, "pid_started": _process_start(pid),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            "ray": None}


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return started is None or _process_start(pid) in (None, started)


def ray_job_running(ray_info: dict[str, Any], pid: int) -> bool | None:
    """Whether the Ray job a holder names still runs: True, False (the cluster answered: ended, or no
    such driver), or None (the cluster does not answer: nothing proven)."""
    host, _, port = str(ray_info.get("gcs_address", "")).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=GCS_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError):
        return None
    try:
        # Ray's GCS client: the job table answers without joining the cluster. Imported here: a
        # driver that is refused or takes over a local holder never needs it.
        from ray._raylet import GcsClient
        jobs = GcsClient(address=ray_info["gcs_address"]).get_all_job_info(timeout=5)
    except Exception:
        logger.warning("the Ray cluster at %s did not list its jobs", ray_info.get("gcs_address"), exc_info=True)
        return None
    for job_id, job in jobs.items():
        if job_id.hex() == ray_info.get("job_id") and job.driver_pid == pid:
            return not job.is_dead
    return False  # the cluster answered and runs no such driver (restarted, or the job is long gone)


def judge(record: dict[str, Any], age_s: float, lease_s: float) -> tuple[bool, str]:
    """(whether the holder may still be writing, why): see the module's docstring."""
    pid = record.get("pid")
    if {k: record.get(k) for k in ("host", "boot_id", "pid_ns")} == _machine():
        if _pid_alive(pid, record.get("pid_started")):
            return True, f"pid {pid} is running on this machine"
        return False, f"its process (pid {pid} on this machine) has exited"
    if record.get("ray"):
        running = ray_job_running(record["ray"], pid)
        if running is not None:
            job = f"Ray job {record['ray'].get('job_id')} on {record['ray'].get('gcs_address')}"
            return running, f"its {job} is {'running' if running else 'no longer running'}"
    if age_s > lease_s:
        return False, f"its lease was last refreshed {age_s:.0f} s ago (output_lease_s={lease_s:g})"
    return True, (f"it refreshed its lease {age_s:.0f} s ago, and a driver on another machine can be judged "
                  f"only by that: it is taken over once not refreshed for output_lease_s={lease_s:g} s")


def describe(record: dict[str, Any]) -> str:
    """'pid 4985 on host vm (Ray job 01000000), since 2026-12-06 22:32:41 UTC'."""
    ray_job = f" (Ray job {record['ray']['job_id']})" if record.get("ray") else ""
    since = str(record.get("started", "?")).replace("T", " ").replace("+00:00", " UTC")
    return f"pid {record.get('pid')} on host {record.get('host')}{ray_job}, since {since}"


# --------------------------------------------------------------------------- the lease

class OutputLease:
    """``with OutputLease(url, options, lease_s, what):`` holds ``url``'s lease for the block."""

    def __init__(self, url: str, storage_options: dict | None, lease_s: float, what: str = "build"):
        self.url, self.lease_s = url, lease_s
        self.fs, self.root = storage.filesystem(url, storage_options)
        self.dir = storage.join(self.root, LEASE)
        self.local = storage.is_local(self.fs)
        self.new_output = self.local and not os.path.exists(self.root)  # removed again if left empty
        self.record = holder_record(what)
        self.generation: int | None = None
        self.took_over: str | None = None  # whom this lease was taken from, and why
        self.lost: str | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._refreshing = threading.Lock()
        self._thread: threading.Thread | None = None

    def path(self, generation: int) -> str:
        return storage.join(self.dir, f"{generation:08d}.json")

    def generations(self) -> list[int]:
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in (posixpath.basename(p).removesuffix(".json") for p in names) if n.isdigit())

    def _load(self, path: str) -> dict[str, Any]:
        # cat_file, not open: a file opened on S3 reads with If-Match on the ETag it first saw, and
        # its holder's refresh between the two answers 412
        return json.loads(self.fs.cat_file(path))

    def _age_s(self, path: str) -> float:
        info = self.fs.info(path)
        modified = info.get("mtime") or info.get("LastModified") or info.get("created")
        if isinstance(modified, datetime):
            modified = modified.timestamp()
        return max(0.0, time.time() - float(modified))

    def acquire(self) -> OutputLease:
        """Hold the lease, or raise :class:`OutputBusy` naming the holder."""
        for _ in range(5):  # another driver may take or release it between our look and our create
            generations = self.generations()
            if generations:
                top = self.path(generations[-1])
                try:
                    holder = self._load(top)
                    age_s = self._age_s(top)
                except FileNotFoundError:
                    continue  # released just now
                except (ValueError, OSError):  # a record cut off mid-write: its own age decides
                    holder, age_s = {}, self._age_s(top)
                alive, why = judge(holder, age_s, self.lease_s)
                if alive:
                    raise OutputBusy(f"another {holder.get('what', 'driver')} is writing {self.url}: "
                                     f"{describe(holder)} ({why}). Wait for it to finish (this command then "
                                     "resumes or reports it), or stop it and rerun this command; reading the "
                                     "output (report, export, review) needs no waiting")
                candidate = generations[-1] + 1
            else:
                holder, why, candidate = None, "", 1
            if self._create(candidate):
                self.generation = candidate
                if holder is not None:
                    self.took_over = f"{holder.get('what', 'driver')} {describe(holder)}: {why}"
                for old in generations:
                    self._remove(self.path(old))
                self._thread = threading.Thread(target=self._keep, name="output-lease", daemon=True)
                self._thread.start()
                return self
        raise OutputBusy(f"{self.url}: other drivers keep taking its lease; try again in a few seconds")

    def _create(self, generation: int) -> bool:
        """Create the generation's record exclusively: True if this driver did, False if another was first."""
        path = self.path(generation)
        created = storage.create_exclusive(self.fs, path, json.dumps(self.record, indent=2).encode())
        if created is not None:
            self._etag = created.get("ETag")
            return True
        return False if self.local else self._ours(path)

    def _ours(self, path: str) -> bool:
        """Whether the record at ``path`` is this lease's own: a conditional write that the store
        applied but whose answer was lost is retried, and the retry's condition then fails (412)."""
        self.fs.invalidate_cache(path)
        try:
            mine = self._load(path).get("token") == self.record["token"]
            if mine:
                self._etag = self.fs.info(path).get("ETag")
            return mine
        except (OSError, ValueError):
            return False

    def note_ray(self, gcs_address: str, job_id: str) -> None:
        """Name this driver's Ray job in its record (once Ray has started), so a driver on another
        machine can prove it dead."""
        self.record["ray"] = {"gcs_address": gcs_address, "job_id": job_id}
        self.refresh()

    def refresh(self) -> None:
        """Rewrite the record (its modification time is the refresh), unless the lease was lost."""
        # One refresh at a time: the keeper thread's and note_ray's would otherwise race on the ETag
        # (each other's write fails the other's If-Match, and a read's own If-Match; CI saw a lease lost so).
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        path = self.path(self.generation)
        newer = [g for g in self.generations() if g > self.generation]
        if newer:
            return self._lose(self.path(newer[-1]))
        data = json.dumps({**self.record, "refreshed": datetime.now(timezone.utc).isoformat()}, indent=2).encode()
        if not self.local:
            try:  # only over our own record, as we last wrote it
                self._etag = self.fs.pipe_file(path, data, IfMatch=self._etag).get("ETag")
            except FileNotFoundError:  # removed by a driver that took the lease over
                return None if self._stop.is_set() else self._lose(None)
            except OSError as exc:  # 412: rewritten by another driver, or our own write applied but unanswered
                if "condition" not in str(exc):
                    raise
                if not self._ours(path):
                    return self._lose(None)
            return None
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".lease-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if not os.path.exists(path):  # removed by a driver that took the lease over
                return None if self._stop.is_set() else self._lose(None)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return None

    def _lose(self, newer: str | None) -> None:
        holder = ""
        if newer is not None:
            try:
                holder = f": {describe(self._load(newer))} took it over"
            except (OSError, ValueError):
                pass
        self.lost = f"this driver lost its lease on {self.url}{holder} (it had not been refreshed in time)"
        self._stop.set()
        # The driver stops writing: interrupted now where its signal handling allows (pipeline.build.main
        # turns that into LeaseLost), and at the latest at its next check() (each stage's start and end).
        _thread.interrupt_main()

    def check(self) -> None:
        """Raise LeaseLost if another driver has taken this output over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def _keep(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except Exception:  # a store hiccup: the next refresh tries again (the build itself reports outages)
                # Released meanwhile (the driver is ending, its console restored): not the user's news
                level = logging.DEBUG if self._stop.is_set() else logging.WARNING
                logger.log(level, "could not refresh the lease on %s", self.url, exc_info=True)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:  # not waited for long: a refresh may be stuck on a store that went away
            self._thread.join(timeout=1.0)
        if self.generation is not None and self.lost is None:
            store_log = logging.getLogger(storage.__name__)
            level = store_log.level
            store_log.setLevel(logging.ERROR)  # after the build's log has closed: its retries are not the user's news
            try:
                self._remove(self.path(self.generation))
            except Exception:  # a dead holder's record is taken over by the next driver anyway
                logger.debug("could not release the lease on %s", self.url, exc_info=True)
            finally:
                store_log.setLevel(level)
        self.generation = None
        if self.local:  # a run refused before it wrote anything leaves no folder behind
            for folder in (self.dir, os.path.dirname(self.dir), *([self.root] if self.new_output else [])):
                try:
                    os.rmdir(folder)
                except OSError:  # not empty: the build's own files are there
                    break

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
