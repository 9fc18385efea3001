"""Sweep: build every combination of some config values, each build reusing the ones before it.

    python -m pipeline.sweep --config base.yaml --vary KEY=V1,V2 [--vary KEY2=...] --out DIR [--set key=value ...]

Each build goes to ``DIR/<its varied values>/`` (e.g. ``t_freq=0.003``) with the base config, the
``--set`` keys and its values, and ``reuse:`` the base's list plus every build of the sweep before
it (:mod:`pipeline.reuse`): images are encoded once over the whole sweep and no LLM request is sent
twice. The builds run in the order that lets most of them reuse: the key read by the earliest
stage varies slowest. ``DIR/sweep.json`` and ``DIR/sweep.md`` then compare them (what each
computed and reused, what it selected and asked, its time per stage). Running the same command
again resumes the sweep: finished builds are only summarised, an unfinished one resumes."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from typing import Any

import yaml

from pipeline import storage
from pipeline.build import failure_exit
from pipeline.config import BuildConfig, ConfigError, add_config_arguments, load_config
from pipeline.console import PREFIX, markdown_table, say
from pipeline.contract import STAGE_NAMES, STAGES
from pipeline.lease import OutputLease



def parse_vary(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` → (KEY, [V1, V2]), each value read as YAML (numbers, booleans, paths)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"--vary {text!r}: give KEY=VALUE1,VALUE2,...")
    parsed = [yaml.safe_load(v) if v.strip() else v for v in values.split(",")]
    if len(set(map(str, parsed))) != len(parsed):
        raise ConfigError(f"--vary {key}: a value is given twice")
    return key.strip(), parsed


def first_stage_reading(key: str) -> int:
    """The index of the earliest stage whose output the key changes (past the last stage: none)."""
    for i, stage in enumerate(STAGES):
        if any(key == r or key.startswith(f"{r}.") or r.startswith(f"{key}.") for r in stage.reads):
            return i
    return len(STAGES)


def value_name(value: Any) -> str:
    text = str(value)
    if "/" in text:  # a path: its last part says which
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "empty"


def plan(varies: list[tuple[str, list[Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, {key: value}) of every combination, in the order the sweep builds them."""
    ordered = sorted(varies, key=lambda kv: first_stage_reading(kv[0]))  # stable: ties keep the command's order
    leaves = [key.rsplit(".", 1)[-1] for key, _ in ordered]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, (key, _) in zip(leaves, ordered)]
    builds = []
    for combo in itertools.product(*(values for _, values in ordered)):
        name = "_".join(f"{label}={value_name(v)}" for label, v in zip(labels, combo))
        builds.append((name, {key: v for (key, _), v in zip(ordered, combo)}))
    names = [name for name, _ in builds]
    if len(set(names)) != len(names):
        raise ConfigError("--vary: two values give the same folder name; give values that differ in letters or digits")
    return builds


def build_row(name: str, values: dict[str, Any], output: str, manifest: dict) -> dict:
    """One build's line of the sweep's comparison."""
    summary, stages = manifest["summary"], manifest["stages"]
    computed = stages.get("annotate", {}).get("computed", {})
    return {
        "build": name, "output": output, "values": values,
        "images_encoded": summary["images_encoded"], "images_reused": summary.get("images_reused", 0),
        "selected_pairs": summary["latents_selected"], "species_covered": summary["species_with_latents"],
        "candidates": summary["candidates"], "units": stages.get("annotate", {}).get("rows", 0),
        "answers_reused": summary.get("annotations_reused", 0),
        "llm_requests": computed.get("llm_requests", 0),
        "prompt_tokens": computed.get("prompt_tokens", 0), "completion_tokens": computed.get("completion_tokens", 0),
        "status": summary["annotations"],
        "wall_s": {stage: stages[stage].get("wall_s") for stage in STAGE_NAMES if stage in stages},
        "reused_whole": [stage for stage in STAGE_NAMES if stages.get(stage, {}).get("reused", {}).get("whole")],
    }


def sweep_markdown(rows: list[dict], command: str) -> str:
    keys = list(rows[0]["values"]) if rows else []
    head = [*keys, "images encoded / reused", "pairs", "species", "candidates", "units", "answers reused",
            "LLM requests", "tokens (prompt + completion)", "status", "wall s (encode / annotate / all)"]
    cells = []
    for r in rows:
        wall = r["wall_s"]
        cells.append([*(str(r["values"][k]) for k in keys), f"{r['images_encoded']} / {r['images_reused']}",
                      str(r["selected_pairs"]), str(r["species_covered"]), str(r["candidates"]), str(r["units"]),
                      str(r["answers_reused"]), str(r["llm_requests"]), f"{r['prompt_tokens']} + {r['completion_tokens']}",
                      ", ".join(f"{k} {v}" for k, v in r["status"].items()) or "none",
                      f"{wall.get('encode', 0):.1f} / {wall.get('annotate', 0):.1f} / "
                      f"{sum(v or 0 for v in wall.values()):.1f}"])
    lines = ["# Sweep", "", f"`{command}`", "", markdown_table(head, cells)]
    lines += ["", "Builds are in the order they ran; each reused the ones above it (images encoded and LLM "
              "requests are what it computed itself).", ""]
    return "\n".join(lines)


def run_sweep(config: str | None, varies: list[tuple[str, list[Any]]], out: str, overrides: list[str],
              verbose: bool = False, now: dict | None = None) -> dict:
    """Run (or resume) the sweep; ``now`` is told the config and Build running (what a failure names)."""
    now = {} if now is None else now
    builds = plan(varies)
    configs = []
    for name, values in builds:  # every build's config is checked before the first one starts
        output = storage.join(out, name)
        cfg = load_config(BuildConfig, config, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in values.items()),
                                                f"output={output}"])
        configs.append((name, values, cfg))
    say(f"{PREFIX} sweep: {len(configs)} builds in {out}: " + ", ".join(name for name, _, _ in configs))
    # Imported once every config is known to be valid: torch, transformers and Ray take seconds to load.
    from pipeline.graph import Build
    rows, done = [], []
    start = time.perf_counter()
    for i, (name, values, cfg) in enumerate(configs, 1):
        cfg.reuse = [*cfg.reuse, *(o for o in done if o not in cfg.reuse)]
        say(f"{PREFIX} sweep: build {i} of {len(configs)}: {name}")
        with OutputLease(cfg.output, cfg.storage_options, cfg.output_lease_s, "build") as lease:
            if lease.took_over:
                say(f"{PREFIX} output: taking over from {lease.took_over}")
            now["cfg"], now["build"] = cfg, Build(cfg, lease)
            manifest = now["build"].run(quiet_log=not verbose)
        done.append(cfg.output)
        rows.append(build_row(name, values, cfg.output, manifest))
    result = {"builds": rows, "wall_s": round(time.perf_counter() - start, 3),
              "totals": {k: sum(r[k] for r in rows) for k in ("images_encoded", "images_reused", "llm_requests",
                                                                "prompt_tokens", "completion_tokens")}}
    fs, root = storage.filesystem(out, configs[0][2].options_for(out))
    command = " ".join(["python -m pipeline.sweep", *(["--config", str(config)] if config else []),
                        *(f"--vary {k}={','.join(map(str, v))}" for k, v in varies),
                        *(f"--set {o}" for o in overrides), "--out", out])
    storage.write_json(fs, storage.join(root, "sweep.json"), {**result, "command": command})
    storage.publish(fs, storage.join(root, "sweep.md"), sweep_markdown(rows, command).encode())
    t = result["totals"]
    say(f"{PREFIX} sweep: {len(rows)} builds in {result['wall_s']:.1f} s; images encoded {t['images_encoded']} "
        f"(reused {t['images_reused']}), LLM requests {t['llm_requests']}; compared in {storage.join(out, 'sweep.md')}")
    return result


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, BuildConfig, "reuse.md")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and its values (repeatable: the sweep builds every combination)")
    parser.add_argument("--out", required=True, help="the sweep's folder (local or fsspec URL): a build per combination")
    parser.add_argument("--verbose", action="store_true", help="also show what Ray and the libraries print")
    args = parser.parse_args(argv)
    now: dict = {}
    try:
        if not args.vary:
            raise ConfigError("--vary: give at least one KEY=V1,V2")
        run_sweep(args.config, [parse_vary(v) for v in args.vary], args.out.rstrip("/"), args.overrides, args.verbose,
                  now)
    except Exception as exc:  # the build's own exit codes and lines; a rerun resumes the sweep
        return failure_exit(exc, now.get("cfg"), now.get("build"), args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
