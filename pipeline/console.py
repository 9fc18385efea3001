"""What a user's console shows: one line per stage, a live progress line, the summary, and one
clear line when something fails. Everything else the process writes — Ray's and Ray Data's INFO
lines and execution plans, core-worker messages, workers' output, library progress bars — goes
to the run's log file (:func:`quiet`), or to the console as before with ``--verbose``.

The project's own lines go through :func:`say`, which writes to the console whether or not the
process's stdout and stderr are redirected to the log."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.lease import LeaseLost, OutputBusy

PREFIX = "[sae-traits]"
# Every command's exit codes (README, docs/build.md): 1 a failure whose traceback is the report;
# 2 a config to fix; 3 the store or the output could not be reached or written; 4 another driver
# is writing the output.
EXIT_FAILED, EXIT_CONFIG, EXIT_STORAGE, EXIT_BUSY = 1, 2, 3, 4
BAR_WIDTH = 24

_console: tuple[TextIO, TextIO] | None = None  # (out, err) while quiet() holds the real console


def _out(err: bool = False) -> TextIO:
    if _console is not None:
        return _console[err]
    return sys.stderr if err else sys.stdout  # looked up at each call (pytest's capsys swaps them)


def say(line: str, err: bool = False) -> None:
    """One line on the user's console (stderr with ``err``)."""
    stream = _out(err)
    stream.write(line + "\n")
    stream.flush()


def stopped(exc: BaseException, output: str | None = None, where: str | None = None, *, resumes: bool = False,
            log_path: str | Path | None = None) -> int | None:
    """If ``exc`` is something the user can act on — a config to fix, a store that does not
    answer, an ``output`` that cannot be written (``where`` names the path when the error does
    not), another driver on the output — say so in one line and return the exit code; None for
    anything else (a bug: the caller re-raises or reports it). ``resumes``: the same command goes
    on from what was written; ``log_path``: where the traceback of a write failure went."""
    if isinstance(exc, ConfigError):
        say(f"error: {exc}", err=True)
        return EXIT_CONFIG
    if isinstance(exc, (OutputBusy, LeaseLost)):
        say(f"error: {exc}", err=True)
        return EXIT_BUSY
    if (unavailable := storage.unavailable_error(exc)) is not None:  # retries spent, in this process or a task
        kept = "what was written is kept: " if resumes else ""
        say(f"error: storage unreachable: {unavailable.message}\n  {kept}rerun the same command once the store "
            f"answers again{' and it resumes' if resumes else ''}", err=True)
        return EXIT_STORAGE  # not 1 (a crash) nor 2 (a config to fix): the same command may work later
    if output is not None and (unwritable := storage.write_failure(exc, output, where or output, resumes)) is not None:
        say(f"error: {unwritable}" + (f"\n  the traceback is in {log_path}" if log_path else ""), err=True)
        return EXIT_STORAGE
    return None


def exit_code(exc: BaseException, output: str | None = None, *, resumes: bool = False) -> int:
    """A command's exit code for ``exc``, said in one line by :func:`stopped`; what that does not
    know is re-raised (a bug: its traceback is the report)."""
    if (code := stopped(exc, output, resumes=resumes)) is None:
        raise exc
    return code


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table padded to line up as plain text too (printed, and in the .md files)."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def is_terminal() -> bool:
    try:
        return _out().isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def quiet(log_path: str | Path) -> Iterator[Path]:
    """Redirect this process's stdout and stderr (file descriptors 1 and 2, so C++ and worker
    output too) to ``log_path``, appending; :func:`say` keeps writing to the console. Nested (a
    build inside the demo), the inner log takes the output until it exits, then the outer again."""
    global _console
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    outermost = _console is None
    opened: list[TextIO] = []
    if outermost:
        _console = (_console_stream(sys.stdout, 1, saved[0], opened), _console_stream(sys.stderr, 2, saved[1], opened))
    streams = sys.stdout, sys.stderr
    try:
        # Python's writes too, wherever sys.stdout pointed (a test's capture, a wrapper): into the log.
        with open(log_path, "ab", buffering=0) as log, open(log_path, "a", buffering=1) as text:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = text
            try:
                yield log_path
            finally:
                text.flush()
                sys.stdout, sys.stderr = streams
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if outermost:
            for stream in opened:
                stream.close()
            _console = None


def _console_stream(stream: TextIO, fd: int, saved_fd: int, opened: list[TextIO]) -> TextIO:
    """Where say() writes while quiet: the console behind ``fd`` (a copy of it, as ``fd`` itself now
    points to the log), or ``stream`` itself when it does not write to ``fd`` (a test's capture)."""
    try:
        writes_to_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        writes_to_fd = False
    if not writes_to_fd:
        return stream
    opened.append(os.fdopen(os.dup(saved_fd), "w", buffering=1))
    return opened[-1]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A live line for one running stage: rows done of the total, rate and ETA. On a terminal a bar
    redrawn in place; otherwise (``ray job logs``, a file) a line every ``every_s`` seconds, so a
    stage shorter than that prints none. ``done()`` is polled in a thread of its own."""

    def __init__(self, stage: str, unit: str, total: int | None, done: Callable[[], int],
                 poll_s: float = 1.0, every_s: float = 30.0):
        self.stage, self.unit, self.total, self.done = stage, unit, total, done
        self.poll_s, self.every_s = poll_s, every_s
        self.terminal = is_terminal()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{stage}", daemon=True)
        self._drawn = False
        self.base = 0  # rows written before the stage began (a resumed stage's earlier rows)

    def expect(self, total: int, unit: str) -> None:
        """Once the stage knows its work: ``total`` rows still to do, counted from what is written now."""
        self.total, self.unit = total, unit
        self.base = self.done()

    def __enter__(self) -> Progress:
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # Not waited for long: its last count may be stuck on a store that stopped answering (the
        # reason the stage is ending), and a stage's end must not wait on its progress line.
        self._thread.join(timeout=1.0)
        if self._drawn:  # end the redrawn line before the stage's closing line
            _out().write("\r" + " " * 100 + "\r")
            _out().flush()

    def line(self, done: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            share = min(1.0, done / self.total)
            filled = int(share * BAR_WIDTH)
            eta = f", ETA {_duration((self.total - done) / rate)}" if rate > 0 and done < self.total else ""
            bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " if self.terminal else ""
            return (f"{PREFIX} {self.stage}: {bar}{done}/{self.total} {self.unit} ({share:.0%}), "
                    f"{rate:.1f}/s{eta}, {_duration(elapsed)} so far")
        return f"{PREFIX} {self.stage}: {done} {self.unit}, {_duration(elapsed)} so far"

    def _run(self) -> None:
        said = self.start
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if not self.terminal and now - said < self.every_s:
                continue
            try:
                done = self.done() - self.base
            except Exception:  # a file half-written or a listing that failed: try again next time
                continue
            said = now
            if self._stop.is_set():  # the stage ended while this count was running: say nothing more
                return
            if self.terminal:
                _out().write("\r" + self.line(done, now - self.start)[:120].ljust(100))
                _out().flush()
                self._drawn = True
            else:
                say(self.line(done, now - self.start))
