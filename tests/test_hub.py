"""SAEs and backbones from the Hugging Face hub, offline: the tests lay files out in the hub's own
cache (conftest points HF_HUB_CACHE at this run's folder; HF_HUB_OFFLINE=1) exactly as a download
leaves them, and every load goes through huggingface_hub / transformers as it does online."""

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import storage
from pipeline.encoding import PatchFeatures, backbone_config
from pipeline.sae import SAESpec, SparseAutoencoder, load_sae, save_sae, save_saev

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def publish(repo: str, files: dict[str, Path], commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """What a download of ``repo`` at ``commit`` leaves in the hub cache: the snapshot and its refs."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"
    for name, source in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, dirs_exist_ok=True) if source.is_dir() else shutil.copyfile(source, target)
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def random_sae(seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(SAESpec(d=64, m=256))


def test_the_tests_run_offline_on_their_own_cache():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and "sae-traits-test-cache" in os.environ["HF_HUB_CACHE"]


def test_an_sae_file_and_an_sae_folder_from_the_hub(tmp_path):
    old, new = random_sae(0), random_sae(1)
    publish("lab/sae-file", {"sae.pt": save_saev(old, tmp_path / "old.pt")}, COMMIT_A, refs=("v1",))
    publish("lab/sae-file", {"sae.pt": save_saev(new, tmp_path / "new.pt")}, COMMIT_B)  # main moved on
    publish("lab/sae-folder", {f.name: f for f in save_sae(new, tmp_path / "proj").iterdir()}, COMMIT_B)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(load_sae("hf://lab/sae-file/sae.pt").encode(x), new.encode(x))
        assert torch.equal(load_sae("hf://lab/sae-file/sae.pt", revision="v1").encode(x), old.encode(x))
        assert torch.equal(load_sae("hf://lab/sae-file/sae.pt", revision=COMMIT_A).encode(x), old.encode(x))
        assert torch.equal(load_sae("lab/sae-folder").encode(x), new.encode(x))  # a repo id: the whole folder
    assert storage.hub_commit("hf://lab/sae-file/sae.pt") == COMMIT_B
    assert storage.hub_commit("hf://lab/sae-file/sae.pt", "v1") == COMMIT_A


def test_a_missing_file_names_the_repo_and_the_file(tmp_path):
    publish("lab/sae-named", {"sae.pt": save_saev(random_sae(0), tmp_path / "s.pt")}, COMMIT_A)
    with pytest.raises(FileNotFoundError, match=r"file 'sae-v2.pt' of hub repo 'lab/sae-named' at revision main "
                                                r"is not in the local hub cache \(HF_HUB_OFFLINE is set\)"):
        load_sae("hf://lab/sae-named/sae-v2.pt")
    with pytest.raises(FileNotFoundError, match=r"hub repo 'lab/nothing-here' at revision v3"):
        load_sae("hf://lab/nothing-here/sae.pt", revision="v3")


def test_a_backbone_from_the_hub_reads_as_the_same_folder_does(tiny_dinov2):
    publish("lab/dinov2-tiny", {f.name: f for f in Path(tiny_dinov2).iterdir()}, COMMIT_A)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    local = PatchFeatures(str(tiny_dinov2), 1)(pixels)
    for ref in ("lab/dinov2-tiny", "hf://lab/dinov2-tiny"):
        assert torch.equal(PatchFeatures(ref, 1)(pixels), local)
        assert backbone_config(ref)["patch_size"] == 14
    assert storage.hub_commit("lab/dinov2-tiny") == COMMIT_A


def test_a_build_from_hub_models_records_the_commits(demo_dir, tmp_path):
    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    models = Path(demo_dir) / "models"
    publish("lab/demo-dinov2", {f.name: f for f in (models / "dinov2-tiny").iterdir()}, COMMIT_A)
    publish("lab/demo-sae", {"saev-0.1.pt": models / "sae" / "saev-0.1.pt"}, COMMIT_B, refs=("main", "paper"))
    out = tmp_path / "build"
    manifest = Build(demo_build_config(demo_dir, [
        f"output={out}", "backbone.model=hf://lab/demo-dinov2", "sae.checkpoint=hf://lab/demo-sae/saev-0.1.pt",
        "sae.revision=paper", "encoder.num_gpus=1", "report=false"])).run()
    assert manifest["hub"] == {
        "backbone.model": {"reference": "hf://lab/demo-dinov2", "revision": "main", "commit": COMMIT_A},
        "sae.checkpoint": {"reference": "hf://lab/demo-sae/saev-0.1.pt", "revision": "paper", "commit": COMMIT_B}}
    assert manifest["summary"]["images_encoded"] == pq.read_table(out / "activations").num_rows > 0
