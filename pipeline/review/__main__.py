"""Expert review of trait datasets: sample a blinded set, serve the rating page, score it.

    sae-traits review sample --build OUT [--build OUT2 ...] [--label NAME ...] --per-build 30 --seed S --out REVIEW [--json]
    sae-traits review serve REVIEW [--port 8765]
    sae-traits review score REVIEW

(``python -m pipeline.review`` is the same command.)
Each subcommand also takes ``--config FILE.yaml`` and ``--set key=value`` (its config:
:mod:`pipeline.review.config`); the flags are keys like any other, applied last."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import add_config_arguments, flag_overrides, load_config
from pipeline.console import exit_code, markdown_table, say
from pipeline.review.config import (
    ReviewSampleConfig,
    ReviewScoreConfig,
    ReviewServeConfig,
)
from pipeline.review.sample import sample
from pipeline.review.score import score, table_rows
from pipeline.review.server import serve


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "sae-traits review", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw a blinded review set from finished builds")
    s.add_argument("--build", dest="builds", action="append", help="a finished build's output folder (repeatable; key builds)")
    s.add_argument("--label", dest="labels", action="append", help="what the scores call that build (repeatable; key labels)")
    s.add_argument("--sweep", help="a sweep's folder: each of its builds, labelled by its varied values (key sweep)")
    s.add_argument("--per-build", dest="per_build", type=int, help="annotations drawn from each build (key per_build)")
    s.add_argument("--seed", type=int, help="seed of the draw and the shuffle (key seed)")
    s.add_argument("--out", help="the review folder to write (key out)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing review folder (key overwrite)")
    s.add_argument("--by-confidence", dest="by_confidence", action="store_true",
                   help="draw each confidence band in turn, so review score can tell accuracy per band (key by_confidence)")
    s.add_argument("--json", action="store_true", help="print the review's summary as JSON on stdout (for scripts)")
    v = sub.add_parser("serve", help="serve the rating page of a review folder")
    v.add_argument("review", nargs="?", help="the review folder (key review)")
    v.add_argument("--host", help="address to listen on (key host)")
    v.add_argument("--port", type=int, help="port to listen on (key port)")
    c = sub.add_parser("score", help="score a review: per build means, intervals, agreement, flags")
    c.add_argument("review", nargs="?", help="the review folder (key review)")
    for each, (model, _) in zip((s, v, c), COMMANDS.values()):
        add_config_arguments(each, model, "review.md")
    return p


COMMANDS = {"sample": (ReviewSampleConfig, ("builds", "labels", "sweep", "per_build", "seed", "out", "by_confidence")),
            "serve": (ReviewServeConfig, ("review", "host", "port")),
            "score": (ReviewScoreConfig, ("review",))}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    model, keys = COMMANDS[args.command]
    flags = flag_overrides(args, (*keys, "overwrite"))
    def log(line: str) -> None:  # progress on stderr: stdout keeps what a script reads (--json, score's table)
        say(line, err=True)
    cfg = None
    try:
        cfg = load_config(model, args.config, [*args.overrides, *flags])
        if args.command == "sample":
            summary = sample(cfg, log=log)
            if args.json:
                print(json.dumps(summary, indent=2))
        elif args.command == "serve":
            serve(cfg, log=log)
        else:
            print(markdown_table(*table_rows(score(cfg, log=log))))  # the table alone on stdout
    except Exception as exc:
        return exit_code(exc, getattr(cfg, "out", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
