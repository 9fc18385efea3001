"""What the benchmarks share: printing (tables, RESULT lines, headers, the summary), the machine
they run on (machine info, how busy its CPUs are), the memory of a process tree, a local Ray,
a free port, the GCS actor table, and the demo candidates the annotate benchmarks send.

A benchmark imports it as ``benchmarks.common`` once the repository root is on sys.path (each
bench_*.py puts it there first); tests import ``benchmarks.common`` too (free_port, gcs_actors).
Standard library only at module level, so importing it starts neither Ray nor torch: bench_cluster
sets RAY_TMPDIR before Ray is first imported, and everything that needs Ray, torch, PIL or the
package imports it inside the function.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections import defaultdict
from pathlib import Path

def offline_env(root: Path) -> None:
    """What every benchmark's processes need before Ray or the models load: the checkout on
    PYTHONPATH (children and Ray workers import the package from it), the hub offline, quiet
    libraries, Ray without token auth."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TQDM_DISABLE", "1"), ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------- output

RESULTS: list[str] = []
"""Every RESULT line printed so far (record / result), for the summary and the JSON of a run."""


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for r in cells:
        print("  " + "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "").replace("-", "").replace("x", "").isdigit()


def record(line: str) -> None:
    """Print a RESULT line and keep it for the summary."""
    RESULTS.append(line)
    print(line, flush=True)


def result(name: str, ratio: float | None, target: str, passed: bool | None, note: str = "") -> None:
    """``RESULT name: ratio=X (target ...) PASS|MISS  [note]``, or ``RESULT name: note`` without a ratio."""
    if ratio is None:
        line = f"RESULT {name}: {note or 'skipped'}"
    else:
        line = f"RESULT {name}: ratio={ratio:.3f} (target {target}) {'PASS' if passed else 'MISS'}"
        if note:
            line += f"  [{note}]"
    record(line)


def header(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(3, 70 - len(title)), flush=True)


def print_summary() -> None:
    """The RESULT lines of the run again, under a summary header."""
    header("summary")
    for line in RESULTS:
        print(line)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def human_bytes(n: float) -> str:
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:,.1f} {unit}"
    return f"{n:,.0f} B"


# --------------------------------------------------------------------------- the machine

def machine_info() -> None:
    """Print the machine, its memory and GPU, how busy its CPUs are, and the torch and Ray versions
    (imports torch, and Ray when installed)."""
    import torch

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    total = kib_field("/proc/meminfo", "MemTotal:")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    print(f"machine: {platform.machine()} {platform.system()}, cpu_count={cpus} (usable {usable}), "
          f"RAM {human_bytes(total)}, GPU: {gpu}")
    busy = cpu_busy_fraction()
    print(f"CPU busy (other processes, 1 s sample before starting): {busy:.0%}"
          + ("  -- WARNING: the machine is busy, timings will be noisy" if busy > 0.15 else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__} (default threads "
          f"{torch.get_num_threads()}), ray {ray_version}")


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs' time spent outside idle/iowait over a short window (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]
    try:
        total0, idle0 = snap()
        time.sleep(seconds)
        total1, idle1 = snap()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def kib_field(path: str, field: str) -> int:
    """Bytes of a ``Name:  N kB`` line of a /proc file (0 when missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --------------------------------------------------------------------------- a process tree's memory

def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        children[ppid].append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _proc_name(pid: int, root_pid: int) -> str:
    if pid == root_pid:
        return "driver (build process)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):  # ray::Class or ray::Class.method (the method changes as it runs)
        name, depth = argv[0].split(" ")[0], 0
        for i, ch in enumerate(name[5:], start=5):
            depth += (ch in "([") - (ch in ")]")
            if ch == "." and depth == 0:
                name = name[:i]
                break
        return name[:64]
    for a in argv:  # python -m/ script: name it by the Ray component it runs
        base = os.path.basename(a)
        if base.endswith(".py") or base in ("raylet", "gcs_server"):
            return base
    return os.path.basename(argv[0])[:40]


def sample_memory(root_pid: int) -> tuple[int, int, int, list[tuple[str, int, int]]]:
    """(summed RSS, summed PSS, summed anonymous RSS, [(process name, rss, anon)]) of a process and all
    its descendants. RSS counts shared pages (Ray's object store, libraries) once per process
    that maps them; PSS splits them; anonymous RSS leaves them out."""
    per = [(_proc_name(p, root_pid), kib_field(f"/proc/{p}/status", "VmRSS:"),
            kib_field(f"/proc/{p}/smaps_rollup", "Pss:"), kib_field(f"/proc/{p}/status", "RssAnon:"))
           for p in process_tree(root_pid)]
    return (sum(x[1] for x in per), sum(x[2] for x in per), sum(x[3] for x in per),
            [(x[0], x[1], x[3]) for x in per if x[1]])


# --------------------------------------------------------------------------- Ray

def start_ray(num_cpus: int = 2):
    """A fresh local Ray of ``num_cpus`` CPUs, quiet (no dashboard, no worker logs, no Ray Data
    progress bars); returns the ray module."""
    import logging

    import ray
    import ray.data

    # address="local": always a fresh local cluster, never one another process started with `ray start`.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.print_on_execution_start = False
    except AttributeError:
        pass
    # ERROR: e.g. "the cluster has no available CPUs" is expected when the encoder actor takes both.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def gcs_actors(job_id: str | None = None) -> list[dict]:
    """Every actor the connected cluster's GCS knows (dead ones too), with the node it is (was) on
    and its restarts — what ray.util.state.list_actors gives, without needing a dashboard."""
    from ray._private.state import state
    from ray._raylet import JobID
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    out = []
    for raw in accessor.get_actor_table(JobID(bytes.fromhex(job_id)) if job_id else None, None):
        a = gcs_pb2.ActorTableData.FromString(raw)
        out.append({"actor_id": a.actor_id.hex(), "job_id": a.job_id.hex(), "class_name": a.class_name,
                    "name": a.name, "namespace": a.ray_namespace,
                    "repr_name": a.repr_name, "state": gcs_pb2.ActorTableData.ActorState.Name(a.state),
                    "num_restarts": a.num_restarts, "node_id": a.address.node_id.hex(), "pid": a.pid,
                    "required_resources": dict(a.required_resources), "death": " ".join(str(a.death_cause).split())})
    return out


# --------------------------------------------------------------------------- servers

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the annotate benchmarks' workload

def stage_candidates(folder: Path, images_per_species: int, seed: int = 0) -> list[dict]:
    """Candidate rows (as candidates/ holds them) for every labelled demo image, written to
    ``folder``: one latent (0) per species, a 3x3 patch zone near the centre (shifted a little per
    image), consensus groups of 3. No Ray, no model."""
    from PIL import Image

    from pipeline.boxes import zones_to_boxes
    from pipeline.config import PreprocessConfig, SourceConfig
    from pipeline.demo.specimens import generate_demo_dataset
    from pipeline.preprocessing import GEOMETRY_COLUMNS, PATCH_PX, plan_geometry
    from pipeline.sources import build_index

    generate_demo_dataset(folder, images_per_species=images_per_species, n_unlabelled=0, seed=seed)
    index, _ = build_index(SourceConfig(format="bioscan", root=str(folder)))
    preprocess = PreprocessConfig()
    side = preprocess.image_size // PATCH_PX
    by_species = defaultdict(list)
    for row in index.to_pylist():
        if row["species"]:
            by_species[row["species"]].append(row)
    rows = []
    for species, members in sorted(by_species.items()):
        n_full = len(members) // 3 * 3
        for rank, row in enumerate(sorted(members, key=lambda r: r["image_id"])):
            with Image.open(row["path"]) as img:
                w, h = img.size
            geom, _ = plan_geometry("squash", w, h, preprocess)
            r0, c0 = side // 2 - 2 + rank % 2, side // 2 - 2 + rank % 3
            patches = [(r0 + dr) * side + c0 + dc for dr in range(3) for dc in range(3)]
            rows.append({**row, **{k: getattr(geom, k) for k in GEOMETRY_COLUMNS}, "latent": 0, "patches": patches,
                         "boxes": zones_to_boxes(patches, geom), "activation_sum": float(100 - rank),
                         "image_rank": rank, "consensus_group": rank // 3 if rank < n_full else None})
    return rows
