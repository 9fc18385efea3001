"""An output that cannot be written ends the build with one line and exit 3, and loses nothing:
a read-only file system is found by the lease's probe before Ray starts; a disk that fills up
during encode stops the build, and once space is freed the same command resumes to the clean
build's tables. The file systems are real: small tmpfs mounts (the tests run as root, as CI does)."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.build import main
from tests.tables import assert_same_build
from tests.test_resume import REPO, write_config

FREE_AT_START = 48 * 1024  # bytes left on the full disk: the lease, config and index fit, the activations do not


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"these tests mount a small tmpfs (root or CAP_SYS_ADMIN): {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def build(capsys, config: Path) -> tuple[int, str, str, float]:
    """`sae-traits build --config CONFIG` in this process: (exit code, stdout, stderr, seconds)."""
    capsys.readouterr()
    start = time.monotonic()
    code = main(["--config", str(config)])
    took = time.monotonic() - start
    captured = capsys.readouterr()
    return code, captured.out, captured.err, took


def driver(config: Path, address: str, timeout_s: float) -> tuple[int, str, str, float]:
    """The same as a driver process of its own joined to the session's Ray: its exit ends its job's
    workers (a failed build's encoder actor would otherwise hold the GPU its rerun asks for)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", "--config", str(config), "--set",
                           f"ray.address={address}"], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def test_a_read_only_output_is_refused_before_ray_starts(demo_dir, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, out, err, took = build(capsys, write_config(demo_dir, tmp_path / "build.yaml", [f"output={disk}/out"]))
    with capsys.disabled():
        print(f"\n[write failures] read-only output: exit {code} in {took:.1f} s:\n  {err.strip()}")
    assert code == 3, err[-3000:]
    assert err.strip() == (f"error: cannot write {disk}/out/_build: Read-only file system (errno 30); what was "
                           "written is kept: make the output writable and rerun the same command to resume")
    assert out == ""  # not a stage started: found before the build graph (and torch, and Ray) is even imported


def test_a_disk_that_fills_during_encode_stops_the_build_in_one_line_and_the_rerun_resumes(
        ray_local, demo_dir, demo_build, load_factor, tmp_path, capsys):
    address = ray_local.get_runtime_context().gcs_address
    clean, _ = demo_build
    with tmpfs(tmp_path / "disk", "64m") as disk:  # the traits hold their renderings: ~20 MB
        out = disk / "out"
        config = write_config(demo_dir, tmp_path / "build.yaml", [f"output={out}"])
        filler = disk / "filler"
        stat = os.statvfs(disk)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - FREE_AT_START)
        code, out_text, err, took = driver(config, address, 300 * load_factor)
        error = err.strip().splitlines()
        with capsys.disabled():
            print(f"\n[write failures] disk full during encode: exit {code} after {took:.1f} s:\n  " + "\n  ".join(error[-2:]))
        assert code == 3, err[-3000:]
        assert "stage index: 104 rows" in out_text and "stage encode ..." in out_text
        assert error[0].startswith(f"error: cannot write {out}"), error
        assert error[0].endswith("No space left on device (errno 28); what was written is kept: free space and rerun "
                                 "the same command to resume"), error
        assert len(error) == 2 and error[1].startswith("  the traceback is in "), error
        assert "Traceback" not in err

        filler.unlink()
        code, out_text, err, _ = driver(config, address, 300 * load_factor)
        assert code == 0, err[-3000:]
        assert "stage index: done in an earlier run" in out_text
        assert_same_build(clean, out)


def test_the_demo_ends_a_bad_key_or_a_read_only_folder_in_one_line(tmp_path, capsys):
    """`sae-traits demo` uses the build's exit codes too (docs/build.md#exit-codes)."""
    from pipeline.demo.run import main as demo

    capsys.readouterr()
    assert demo(["--out", str(tmp_path / "demo"), "--set", "contrast.t_freq=often"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration:\n  contrast.t_freq: Input should be a valid number"), err
    assert not (tmp_path / "demo").exists()  # refused before anything was written
    with tmpfs(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert demo(["--out", f"{disk}/demo"]) == 3
        err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {disk}/demo") and err.strip().endswith(
        "Read-only file system (errno 30); make the output writable and rerun the same command"), err
    assert len(err.strip().splitlines()) == 1

