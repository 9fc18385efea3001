"""Build a trait dataset from a config: the driver of the build graph (:mod:`pipeline.graph`).

    sae-traits build --config FILE.yaml [--set key=value ...] [--reuse OUT ...] [--update] [--overwrite] [--verbose]
    (= python -m pipeline.build ...)

Before it loads torch or Ray, the driver checks the config and takes the output's lease
(:mod:`pipeline.lease`): a second driver on the same output is refused in a few seconds, and an
output that cannot be written (read-only, full, forbidden) is found by creating the lease's record.
Exit codes: 0 built (or finished earlier); 1 the build failed (the traceback is in its log);
2 a config to fix; 3 the store or the output could not be reached or written — what was written
is kept and the same command resumes; 4 another driver is writing this output."""

from __future__ import annotations

import argparse
import sys

from pipeline import storage
from pipeline.config import BuildConfig, ConfigError, add_config_arguments, load_config
from pipeline.console import EXIT_FAILED, PREFIX, say, stopped
from pipeline.contract import STAGE
from pipeline.lease import LeaseLost, OutputLease


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.build", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, BuildConfig, "build.md")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build in the output")
    parser.add_argument("--reuse", action="append", default=[], metavar="OUT",
                        help="an earlier finished build to take results from instead of computing them (repeatable; "
                             "adds to the config's reuse: list)")
    parser.add_argument("--update", action="store_true", help="bring the finished build in the output up to date "
                        "with its source: only new or changed images are encoded, only new requests asked")
    parser.add_argument("--verbose", action="store_true", help="also show what Ray and the libraries print (Ray's "
                        "INFO lines, execution plans, workers' output); by default it goes to OUT/_build/logs/")
    args = parser.parse_args(argv)
    build = lease = cfg = None
    try:
        cfg = load_config(BuildConfig, args.config, args.overrides)  # fails before Ray starts
        if args.reuse:
            cfg.reuse = [*cfg.reuse, *(r for r in args.reuse if r not in cfg.reuse)]
        if args.update and args.overwrite:
            raise ConfigError("--update and --overwrite: choose one (--overwrite rebuilds from scratch)")
        with OutputLease(cfg.output, cfg.storage_options, cfg.output_lease_s, "build") as lease:
            if lease.took_over:
                say(f"{PREFIX} output: taking over from {lease.took_over}")
            # Imported once the lease is held: torch, transformers and Ray take seconds to load, and a
            # second driver on this output must be refused before they do.
            from pipeline.graph import Build
            build = Build(cfg, lease)
            try:
                manifest = build.run(overwrite=args.overwrite, quiet_log=not args.verbose, update=args.update)
            except KeyboardInterrupt:
                if lease.lost:  # the lease's refresh found another driver holding the output
                    raise LeaseLost(lease.lost) from None
                raise
    except Exception as exc:
        return failure_exit(exc, cfg, build, args.verbose)
    say(f"{PREFIX} built {cfg.output} in {manifest['wall_s']:.1f} s"
        + (f"; log: {build.log_path}" if build.log_path else ""))
    return 0


def failure_exit(exc: Exception, cfg: BuildConfig | None, build, verbose: bool) -> int:
    """One clear line for a build that stopped, and its exit code (re-raised when nothing better can be said)."""
    where = storage.join(cfg.output, STAGE[build.current].output) if cfg and build and build.current else None
    log_path = build.log_path if build else None
    if (code := stopped(exc, cfg.output if cfg else None, where, resumes=True, log_path=log_path)) is not None:
        return code
    if verbose or log_path is None:
        raise exc
    say(f"error: the build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        f"\n  the full traceback is in {log_path}; what was written is kept and the same command resumes", err=True)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
