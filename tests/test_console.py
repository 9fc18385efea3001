"""What a user's console shows (pipeline.console): the project's lines on the console, everything
Ray and the libraries write in the run's log file."""

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.console import Progress, quiet, say
from pipeline.demo.run import demo_build_config

REPO = Path(__file__).resolve().parents[1]
# Lines of our own that a build prints to a non-terminal: stage start and end, the summary table, the last line.
OURS = ("[sae-traits] ", "sae-traits build summary", "  ")


def test_quiet_sends_what_the_process_writes_to_the_log_and_says_to_the_console(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    with quiet(log):
        os.write(1, b"written by C code\n")
        os.write(2, b"a core-worker message\n")
        print("a library's print")
        say("[sae-traits] ours")
        with quiet(tmp_path / "inner.log"):  # nested: the inner log takes the output until it exits
            print("inside the build")
            say("[sae-traits] ours too", err=True)
        print("after the build")
    out, err = capfd.readouterr()
    assert out == "[sae-traits] ours\n" and err == "[sae-traits] ours too\n"
    assert log.read_text().splitlines() == ["written by C code", "a core-worker message", "a library's print",
                                            "after the build"]
    assert (tmp_path / "inner.log").read_text() == "inside the build\n"
    print("the console is back")
    assert capfd.readouterr().out == "the console is back\n"


def test_progress_lines_count_rows_against_the_total_when_not_a_terminal(capsys):
    done = iter(range(0, 1000, 10))
    with Progress("encode", "rows", None, lambda: next(done), poll_s=0.01, every_s=0.05) as progress:
        progress.expect(200, "images")  # 0 written before: the line counts from here
        time.sleep(0.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(line.startswith("[sae-traits] encode: ") and "/200 images (" in line for line in lines)
    line = progress.line(50, 10.0)
    assert line == "[sae-traits] encode: 50/200 images (25%), 5.0/s, ETA 30s, 10s so far"


def test_build_console_is_a_line_per_stage_and_the_summary(ray_local, demo_dir, tmp_path):
    """`sae-traits build` as a user runs it (not a terminal, as under `ray job logs`), joined to the
    session's Ray: only the project's lines reach the console; Ray's go to OUT/_build/logs/."""
    out = tmp_path / "build"
    cfg = demo_build_config(demo_dir, [f"output={out}", "encoder.num_gpus=1", "encoder.num_cpus=0.25", "report=false"])
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--config", str(config),
                           "--set", f"ray.address={address}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-40:])
    assert proc.stderr == "", proc.stderr
    strays = [line for line in console if line and not line.startswith(OURS)]
    assert not strays, strays
    assert len(console) <= 30, console
    started = [line for line in console if line.startswith("[sae-traits] stage ") and line.endswith(" ...")]
    assert [line.split()[2] for line in started] == ["index", "encode", "count", "select", "candidates", "annotate"]
    assert console[-1].startswith(f"[sae-traits] built {out} in ") and "log: " in console[-1]
    logs = list((out / "_build" / "logs").glob("build-*.log"))
    assert len(logs) == 1 and console[-1].endswith(str(logs[0]))
    log = logs[0].read_text()
    assert "Execution plan" in log or "Starting execution" in log, log[-3000:]  # Ray Data's INFO lines, kept
