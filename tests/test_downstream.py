"""The paper's downstream check on the demo build, on the CPU: the caption shards read by open_clip's
own data pipeline, two 10-step fine-tunes with open_clip's own trainer (one killed after its first
epoch and resumed), and the zero-shot table. The starting model is a tiny random open_clip model
(a local-dir config; its weights drawn once, seeded); nothing is downloaded."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import open_clip  # the downstream extra, which the test install includes
import webdataset as wds
from open_clip_train.data import get_wds_dataset

from pipeline.captions import held_out_images
from pipeline.config import ConfigError
from pipeline.demo.tiny_models import make_tiny_open_clip
from pipeline.downstream import loader_workers, shard_pattern
from pipeline.export import main as export_main
from tests.tables import markdown_rows

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # both fine-tunes and the evaluation; they take ~1-2 min on 2 cores


@pytest.fixture(scope="module")
def clip_export(demo_build, tmp_path_factory):
    build, _ = demo_build
    out = tmp_path_factory.mktemp("clip") / "shards"
    assert export_main(["--build", str(build), "--format", "clip", "--out", str(out),
                        "--set", "clip.samples_per_shard=40"]) == 0
    return build, out, json.loads((out / "clip_export.json").read_text())


def samples(folder: Path, n: int) -> list[dict]:
    """Every sample of a shard set, read by webdataset (the library open_clip reads them with)."""
    return list(wds.WebDataset(shard_pattern(folder, n), shardshuffle=False).decode())


def test_caption_shards_are_read_by_open_clips_own_data_pipeline(clip_export):
    _, out, summary = clip_export
    n = summary["shards"]["traits"]
    sizes = json.loads((out / "traits" / "sizes.json").read_text())
    assert len(sizes) == n >= 2 and sum(sizes.values()) == summary["samples"] > 100
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{make_tiny_open_clip(out.parent / 'm')}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out.parent / 'm'}")
    args = SimpleNamespace(val_data=shard_pattern(out / "traits", n), val_num_samples=None, train_data=None,
                           dataset_resampled=False, workers=0, batch_size=16, world_size=1, seed=0)
    data = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    seen, texts = 0, []
    for images, tokens in data.dataloader:
        assert images.shape[1:] == (3, 32, 32) and tokens.shape[1] == 32
        seen += len(images)
        texts += [open_clip.decode(t) for t in tokens[:2]]
    assert seen == summary["samples"]  # every sample has an image and a caption the trainer keeps
    assert all(t.startswith("<start_of_text>a photo of ") and " with " in t for t in texts)


def test_one_sample_per_image_and_ok_annotation_with_the_papers_caption_and_a_control_of_the_same_images(
        clip_export):
    build, out, summary = clip_export
    traits = pq.read_table(build / "traits")
    ok = traits.filter(pc.equal(traits["status"], "ok")).to_pylist()
    held = {r["image_id"] for r in csv.DictReader(open(out / "held_out.csv"))}
    wanted = Counter((i, r["annotation_id"]) for r in ok for i in r["image_ids"] if i not in held)
    by_id = {r["annotation_id"]: r for r in ok}
    n = summary["shards"]["traits"]
    with_traits, control = samples(out / "traits", n), samples(out / "species_only", n)
    assert Counter((s["json"]["image_id"], s["json"]["annotation_id"]) for s in with_traits) == wanted
    for a, b in zip(with_traits, control, strict=True):  # the same images in the same order
        assert a["jpg"] == b["jpg"]
        row = by_id[a["json"]["annotation_id"]]
        assert a["txt"] == f"A photo of {row['species']} with {row['description']}"
        assert b["txt"] == f"A photo of {row['species']}"
        assert a["json"]["species"] == row["species"] and a["json"]["latent"] == row["latent"]


def test_held_out_images_are_stratified_by_species_and_in_no_training_shard(clip_export):
    build, out, summary = clip_export
    labelled = pq.read_table(build / "activations", columns=["image_id", "species"]).to_pylist()
    species_of = {r["image_id"]: r["species"] for r in labelled if r["species"]}
    held = samples(out / "held_out", summary["shards"]["held_out"])
    held_ids = {s["json"]["image_id"] for s in held}
    assert held_ids == {r["image_id"] for r in csv.DictReader(open(out / "held_out.csv"))}
    assert all(s["txt"] == species_of[s["json"]["image_id"]] for s in held)
    trained = {s["json"]["image_id"] for s in samples(out / "traits", summary["shards"]["traits"])}
    assert trained and held_ids and not trained & held_ids
    per_species = defaultdict(lambda: [0, 0])
    for image_id, species in species_of.items():
        per_species[species][image_id in held_ids] += 1
    for species, (kept, out_) in per_species.items():  # 20 % of each species' images, at least one
        assert out_ == min(kept + out_ - 1, max(1, round((kept + out_) * 0.2))), species
    assert summary["species"] == sorted(per_species)
    # seeded: the same split again, another with another seed
    assert held_out_images(species_of, 0.2, 0) == held_ids != held_out_images(species_of, 0.2, 1)


def test_loader_workers_never_leave_a_worker_without_a_full_batch():
    assert loader_workers([40, 40, 40, 40], 4, 1, 16) == 4
    assert loader_workers([40, 40, 40, 5], 4, 1, 16) == 2       # with 3, the 5-sample shard could be a worker's only one
    assert loader_workers([40, 40, 40, 40], 4, 2, 16) == 2      # per GPU process
    assert loader_workers([10, 10, 10], 8, 1, 16) == 1          # only all three together make a batch
    assert loader_workers([20], 4, 1, 16) == 1 and loader_workers([20], 0, 1, 16) == 0
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        loader_workers([10], 4, 1, 16)
    with pytest.raises(ConfigError, match="clip.samples_per_shard"):
        loader_workers([20, 20, 1], 4, 2, 16)                   # one GPU process could get only the 1


def test_downstream_fine_tunes_twice_resumes_a_killed_fine_tune_and_writes_the_table(clip_export, tmp_path):
    build, _, summary = clip_export
    out = tmp_path / "downstream"
    command = [sys.executable, "-m", "pipeline.downstream", "--build", str(build), "--out", str(out),
               "--set", f"model=local-dir:{make_tiny_open_clip(tmp_path / 'tiny')}",
               "--set", "clip.samples_per_shard=40", "--set", "finetune.epochs=2",
               "--set", "finetune.samples_per_epoch=80", "--set", "finetune.batch_size=16",
               "--set", "finetune.workers=1", "--set", "finetune.device=cpu", "--set", "finetune.lr=1e-3",
               "--set", "finetune.warmup=2", "--set", "zero_shot.templates=simple"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first_epoch = out / "runs" / "traits" / "checkpoints" / "epoch_latest.pt"  # after epoch 1 (of 2)
    start = time.monotonic()
    killed = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        while not first_epoch.exists():
            assert killed.poll() is None, killed.stdout.read().decode()
            assert time.monotonic() - start < TIMEOUT_S, "no first epoch"
            time.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the driver and open_clip's trainer under it
        killed.wait()
    assert not (out / "runs" / "traits" / "checkpoints" / "epoch_2.pt").exists()

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "runs" / "traits.log").read_text()
    assert "resuming checkpoint" in log and "epoch 1" in log  # continued from the first epoch, not restarted
    result = json.loads((out / "downstream.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["starting model", "fine-tuned on the trait captions",
                                                    "fine-tuned on species-only captions"]
    assert result["steps"] == 10 and result["classes"] == len(summary["species"]) >= 5
    for row in result["rows"]:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["images"] == result["held_out_images"] > 0
    start_model = f"local-dir:{(out / 'start_model').resolve()}"  # random weights, drawn once for all three
    for run in ("traits", "species_only"):
        assert (out / "runs" / run / "checkpoints" / "epoch_2.pt").exists()
        assert f"--model {start_model} " in next(r["command"] for r in result["rows"] if r.get("run") == run)
    table = markdown_rows((out / "downstream.md").read_text())
    assert table[0] == ["model", "top-1", "top-5", "held-out images"] and table[1][0] == "starting model", table
    assert "downstream.md" in done.stderr + done.stdout
    print(f"fine-tunes: {[r.get('seconds') for r in result['rows']]} s; {time.monotonic() - start:.0f} s in all")
    print((out / "downstream.md").read_text())


def test_a_run_folder_made_with_other_settings_is_refused_naming_the_flag(tmp_path):
    from pipeline.config import DownstreamConfig
    from pipeline.downstream import fine_tune

    cfg = DownstreamConfig(build="b", out=str(tmp_path))
    folder = tmp_path / "runs" / "traits"
    folder.mkdir(parents=True)
    (folder / "sae_traits_command.json").write_text(json.dumps({"command": ["-m", "open_clip_train.main",
                                                                            "--epochs", "2", "--lr", "1e-05"]}))
    with pytest.raises(ConfigError, match=r"other settings \(--epochs 2 → 3\); use another out"):
        fine_tune(cfg, "traits", [sys.executable, "-m", "open_clip_train.main", "--epochs", "3", "--lr", "1e-05"],
                  log=lambda _: None)
