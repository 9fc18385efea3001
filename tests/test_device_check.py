"""benchmarks/device_check.py, the one command for a lent GPU, in its CPU smoke mode: every part runs
and says PASS (or SKIP), with Ray and vLLM unimportable as on the GPU machine; and one part that
raises or overruns its limit is an ERROR line that hides none of the others. No Ray, nothing downloaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.py"
LINE = re.compile(r"^CHECK (\w+): (PASS|MISS|SKIP|ERROR)\b", re.M)

# The GPU machine has neither Ray nor vLLM: None in sys.modules makes any import of them fail.
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; sys.modules['vllm'] = None; "
RUN = WITHOUT_RAY + "import runpy; sys.argv = [{script!r}, *sys.argv[1:]]; runpy.run_path({script!r}, run_name='__main__')"
# Or with parts replaced: run_path without __main__ gives main, whose globals are the script's.
BROKEN = WITHOUT_RAY + """import runpy, time
script = runpy.run_path({script!r})["main"].__globals__
script["part_decode"] = lambda setup, figures: 1 / 0
script["part_train_sae"] = lambda setup, figures: time.sleep(30)
sys.exit(script["main"](sys.argv[1:]))"""

FIGURES = {
    "encode": ["encoder", "photo", "firings_per_image", "by_batch", "bf16_dtype", "bf16_images_per_s", "bf16_batch",
               "bf16_peak_gib", "bf16_jaccard_vs_cpu_fp32", "fp32_dtype", "fp32_images_per_s", "fp32_batch",
               "fp32_peak_gib", "fp32_jaccard_vs_cpu_fp32"],
    "decode": ["batch", "encoder_alone_images_per_s", "decoder_alone_images_per_s", "bytes_to_firings_images_per_s",
               "decode_fed_ratio", "pixels_max_abs_diff", "pixels_mean_abs_diff", "firings_jaccard_gpu_vs_cpu_decode",
               "boxes_equal", "boxes_compared"],
    "train_sae": ["d", "m", "batch", "steps", "dtype", "steps_per_s", "patches_per_s", "ms_per_step",
                  "minutes_per_100m_patches", "peak_gib", "loss_first", "loss_last", "nmse_first", "nmse_last",
                  "logged_steps"],
    "clip": ["model", "batch", "rejected", "steps", "steps_per_s", "images_per_s", "peak_gib", "loss_first", "loss_last"],
}


def run(code: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code.format(script=str(SCRIPT)), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


def open_clip_importable() -> bool:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def test_smoke_cpu_runs_every_part_without_ray(tmp_path):
    done, wall = run(RUN, "--smoke-cpu", "--json", str(tmp_path / "device.json"))
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert wall < 60, f"the smoke run took {wall:.0f} s"
    statuses = LINE.findall(out.split("=== summary")[0])  # each part's line, before the summary repeats them
    assert [name for name, _ in statuses] == list(FIGURES), out[-4000:]
    expected = {name: "PASS" for name in FIGURES} | ({} if open_clip_importable() else {"clip": "SKIP"})
    assert dict(statuses) == expected, out[-4000:]
    assert re.search(r"^CHECK summary: .*parts: encode PASS, decode PASS, train_sae PASS, clip (PASS|SKIP); "
                     r"targets: .*; 0 errored", out, re.M), out[-2000:]

    report = json.loads((tmp_path / "device.json").read_text())
    assert report["mode"] == "smoke-cpu" and report["errors"] == 0
    assert {"card", "torch", "cuda", "transformers", "python"} <= set(report["machine"])
    for name, keys in FIGURES.items():
        part = report["parts"][name]
        assert part["status"] == expected[name] and part["seconds"] >= 0
        if part["status"] == "PASS":
            assert set(keys) <= set(part["figures"]), (name, sorted(set(keys) - set(part["figures"])))
    figures = {name: report["parts"][name]["figures"] for name in FIGURES}
    assert figures["decode"]["boxes_equal"] == figures["decode"]["boxes_compared"] > 0
    assert figures["encode"]["fp32_jaccard_vs_cpu_fp32"] == 1.0  # the CPU against itself
    assert figures["train_sae"]["loss_last"] < figures["train_sae"]["loss_first"]
    assert set(report["targets"]) >= {"encode_bf16_images_per_s", "decode_fed_ratio", "encode_fp32_jaccard_vs_cpu"}
    assert report["targets"]["encode_bf16_images_per_s"]["met"] is None  # no speed is judged on a CPU


def test_a_part_that_raises_or_overruns_is_one_error_line_and_the_rest_still_run(tmp_path):
    done, _ = run(BROKEN, "--smoke-cpu", "--parts", "decode,train_sae,clip", "--part-limit-s", "10",
                  "--json", str(tmp_path / "device.json"))
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    lines = dict(re.findall(r"^CHECK (\w+): (.*)$", done.stdout.split("=== summary")[0], re.M))
    assert lines["decode"].startswith("ERROR  ZeroDivisionError: division by zero")
    assert lines["train_sae"].startswith("ERROR  PartTimeout: over its 10 s limit")
    assert lines["clip"].startswith("PASS" if open_clip_importable() else "SKIP")
    report = json.loads((tmp_path / "device.json").read_text())
    assert report["errors"] == 2 and report["parts"]["decode"]["status"] == "ERROR"


def test_without_a_gpu_it_says_so_and_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the command would run the real check")
    done, _ = run(RUN)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith("CHECK device: no CUDA device here"), done.stdout
