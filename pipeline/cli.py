"""``sae-traits``: one command for every entry point, as bioclip's and saev's tools install one.

    sae-traits build --config build.yaml [--set key=value ...]   (= python -m pipeline.build)
    sae-traits demo --out demo_out
    sae-traits sweep | train-sae | export | review | report | cluster-check ...

Each subcommand is the module's own ``main`` with the rest of the command line, so
``python -m pipeline.<module>`` keeps working and both take the same flags; ``--help`` on a
subcommand lists its config sections and keys and points to docs/."""

from __future__ import annotations

import importlib
import sys

# subcommand → (module whose main() it runs, one line for the overview)
COMMANDS = {
    "build": ("pipeline.build", "build a trait dataset from a config (resumes an interrupted build)"),
    "sweep": ("pipeline.sweep", "build every combination of some config values, each build reusing the ones before"),
    "demo": ("pipeline.demo.run", "the offline demo: synthetic photos, tiny models, a trained SAE, a whole build"),
    "train-sae": ("pipeline.train_sae", "train a sparse autoencoder on backbone activations (Ray Train)"),
    "export": ("pipeline.export", "a finished build as a Hugging Face dataset, a Darwin Core Archive or CLIP training shards"),
    "downstream": ("pipeline.downstream", "the paper's downstream check: fine-tune a CLIP on the traits, zero-shot vs a species-only control"),
    "review": ("pipeline.review.__main__", "expert review: sample a blinded set, serve the rating page, score it"),
    "report": ("pipeline.report", "(re)write a build's HTML report"),
    "front": ("pipeline.front", "run the front proxy that publishes the endpoint, its limits taken from the Serve config"),
    "cluster-check": ("pipeline.cluster_check", "check that cluster.yaml can host a serve config's LLM replicas"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sae-traits COMMAND [ARGS ...]   (sae-traits COMMAND --help for its flags and config keys)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "docs: README.md and docs/ in the project's repository"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])  # only the chosen command's imports (Ray, torch) load
    return module.main(rest, prog=f"sae-traits {command}")


if __name__ == "__main__":
    sys.exit(main())
