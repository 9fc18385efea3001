"""The expert-review tool: a blinded, seeded, stratified sample of two builds (the demo build and a
copy of it with another model's descriptions and no saved renderings); the rating page driven in
headless Chromium by mouse clicks, reloaded mid-way, its saved ratings equal to the clicks; scores
equal to the formulas computed here (raw and normalised means, bootstrap coverage on a known
distribution, Krippendorff's 2011 example alpha); the scores shown in the build's report."""

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report import write_report
from pipeline.review.__main__ import main
from pipeline.review.config import FLAGS, ReviewServeConfig
from pipeline.review.folder import Rating, RatingsFile, ReviewFolder
from pipeline.review.score import bootstrap_interval
from pipeline.review.server import ReviewServer
from tests.browser import Browser

LABELS = ("LBL-baseline-x1", "LBL-boxed-x2")
SECRET_MODEL, SECRET_PROMPT = "qwen-secret-72b", "pv-secret-b2"
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# values 1-5, '.' missing; ordinal alpha 0.815 (nominal 0.743, interval 0.849).
KRIPPENDORFF_2011 = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3", ". 3 3 3 2 3 4 2 2 5 1 .",
                     "1 2 3 3 2 4 4 1 2 5 1 ."]


def run(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def refused(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def builds(demo_build, tmp_path_factory):
    """Two finished builds: the demo build (renderings saved) and a copy whose traits/ say another
    model and prompt answered, in other words, without saved renderings (they are made again)."""
    out, _ = demo_build
    root = tmp_path_factory.mktemp("review-builds")
    first, second = root / "build-alpha-7f3", root / "build-beta-9c1"
    shutil.copytree(out, first, ignore=shutil.ignore_patterns("report", "_build"))
    shutil.copytree(out, second, ignore=shutil.ignore_patterns("report", "_build", "traits"))
    traits = pq.read_table(first / "traits").drop_columns(["renderings"])
    n = traits.num_rows
    for name, values in (("model", [SECRET_MODEL] * n), ("prompt_version", [SECRET_PROMPT] * n),
                         ("description", [f"In short: {d}" for d in traits["description"].to_pylist()])):
        traits = traits.set_column(traits.schema.get_field_index(name), name, pa.array(values, pa.string()))
    (second / "traits").mkdir()
    pq.write_table(traits, second / "traits" / "part-0.parquet")
    return first, second


def sample(capsys, builds, out: Path, seed: int, per_build: int = 10) -> Path:
    run(capsys, "sample", "--build", builds[0], "--build", builds[1], "--label", LABELS[0], "--label", LABELS[1],
        "--per-build", per_build, "--seed", seed, "--out", out)
    return out


@pytest.fixture(scope="module")
def review(builds, tmp_path_factory):
    out = tmp_path_factory.mktemp("review") / "review"
    assert main(["sample", "--build", str(builds[0]), "--build", str(builds[1]), "--label", LABELS[0],
                 "--label", LABELS[1], "--per-build", "10", "--seed", "5", "--out", str(out)]) == 0
    return out


@contextmanager
def serving(folder: Path):
    """The review's page served by the same server as ``python -m pipeline.review serve``, on a free port."""
    server = ReviewServer(ReviewServeConfig(review=str(folder), port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def traits_by_id(build: Path) -> dict[str, dict]:
    return {r["annotation_id"]: r for r in pq.read_table(build / "traits").to_pylist()}


# --------------------------------------------------------------------------- sample

def test_sample_is_seeded_stratified_and_blinded(builds, review, tmp_path, capsys):
    key, items = json.loads((review / "key.json").read_text()), json.loads((review / "items/items.json").read_text())
    assert [it["item"] for it in items["items"]] == list(key["items"]) == [f"{n:03d}" for n in range(1, 21)]
    saved = traits_by_id(builds[0])
    described = [saved, traits_by_id(builds[1])]
    species = {r["species"] for r in saved.values()}
    for b in range(2):  # 10 per build, every species before any gives a second one
        drawn = Counter(k["species"] for k in key["items"].values() if k["build"] == b)
        assert sum(drawn.values()) == 10 and set(drawn) == species and max(drawn.values()) - min(drawn.values()) <= 1
    assert Counter(k["build"] for k in list(key["items"].values())[:10]) != Counter({0: 10})  # shuffled together
    for it in items["items"]:  # what the model saw and said: saved renderings, or the same ones made again
        k = key["items"][it["item"]]
        assert it["description"] == described[k["build"]][k["annotation_id"]]["description"]
        assert [(review / "items" / name).read_bytes() for name in it["images"]] == saved[k["annotation_id"]]["renderings"]

    # seeded: the same seed gives the same set, another seed another
    again = sample(capsys, builds, tmp_path / "again", seed=5)
    assert (again / "items/items.json").read_bytes() == (review / "items/items.json").read_bytes()
    assert json.loads((again / "key.json").read_text())["items"] == key["items"]
    other = json.loads((sample(capsys, builds, tmp_path / "other", seed=6) / "key.json").read_text())
    def drawn_ids(k):
        return {(v["build"], v["annotation_id"]) for v in k["items"].values()}
    assert drawn_ids(other) != drawn_ids(key)

    # blinded: nothing a reviewer's page serves, nor any file under items/, names a build
    secrets = [str(builds[0]), str(builds[1]), builds[0].name, builds[1].name, *LABELS, SECRET_MODEL, SECRET_PROMPT,
               "template-v1", *(v["annotation_id"] for v in key["items"].values())]
    visible = {str(p): p.read_bytes() for p in (review / "items").rglob("*") if p.is_file()}
    rated = shutil.copytree(review, tmp_path / "rated")
    RatingsFile(rated / "ratings/someone.jsonl").append(Rating("003", 4, ("hallucinated",)), reviewer="someone")
    with serving(rated) as url:
        for path in ("", "api/review", "api/ratings/someone", *(f"items/{n}" for it in items["items"] for n in it["images"])):
            status, body = get(url + path)
            assert status == 200, path
            visible[path] = body
        assert get(url + "key.json")[0] == get(url + "ratings/someone.jsonl")[0] == get(url + "items/../key.json")[0] == 404
    assert b"hallucinated" in visible["api/ratings/someone"]
    leaks = [(where, s) for where, data in visible.items() for s in secrets if s.encode() in data]
    assert not leaks


# --------------------------------------------------------------------------- the page

def test_rating_page_in_chromium_survives_a_reload(review, tmp_path):
    folder = tmp_path / "review"
    shutil.copytree(review, folder)
    expected, clicks = {}, 0

    def rate_shown(browser, value: int, flag: str | None = None) -> None:
        nonlocal clicks
        item = browser.eval("document.getElementById('item-id').textContent")
        flags = expected.get(item, (None, ()))[1]
        if flag:
            browser.click(f'button[data-flag="{flag}"]')
            flags = tuple(f for f in FLAGS if f in set(flags) ^ {flag})
            clicks += 1
        browser.wait_for("Array.from(document.images).every(i => i.complete)")
        browser.click(f'button[data-rating="{value}"]')
        expected[item] = (value, flags)
        clicks += 1
        browser.wait_for(f"document.getElementById('item-id').textContent !== {json.dumps(item)} || "
                         f"document.getElementById('progress').textContent === '20 / 20'")

    def settled(browser) -> None:
        browser.wait_for("document.body.dataset.pending === '0' && document.getElementById('status').textContent === 'Saved.'")

    browser = Browser(tmp_path / "profile")
    try:
        with serving(folder) as url:
            browser.goto(url)
            browser.wait_for("document.body.dataset.ready === '1'")
            browser.type_text("#reviewer-name", "rev-a")
            browser.click("#start")
            browser.wait_for("document.getElementById('item-id').textContent === '001'")
            for k in range(7):
                rate_shown(browser, k % 5 + 1, FLAGS[k % 3] if k in (1, 3, 4) else None)
            settled(browser)

            browser.goto(url)  # mid-way: the same reviewer, back where they stopped
            browser.wait_for("document.body.dataset.ready === '1'")
            assert browser.eval("document.getElementById('progress').textContent") == "7 / 20"
            assert browser.eval("document.getElementById('item-id').textContent") == "008"
            assert browser.eval("document.querySelector('button[data-rating=\"2\"]') !== null")
            for k in range(7, 20):
                rate_shown(browser, 5 - k % 5, "background" if k == 12 else None)
            settled(browser)
            assert browser.eval("document.getElementById('progress').textContent") == "20 / 20"
            assert not browser.eval("document.getElementById('done').classList.contains('hidden')")
            browser.click("#prev")  # re-rate item 019 and flag it: the later judgement replaces the earlier
            browser.wait_for("document.getElementById('item-id').textContent === '019'")
            browser.click('button[data-flag="wrong_body_part"]')
            browser.click('button[data-rating="1"]')
            expected["019"] = (1, ("wrong_body_part",))
            clicks += 2
            settled(browser)

            browser.click("#switch")  # a second reviewer in the same browser: their own file
            browser.wait_for("document.body && document.body.dataset.ready === '1' && "
                             "!document.getElementById('login').classList.contains('hidden')")
            browser.type_text("#reviewer-name", "rev-b")
            browser.click("#start")
            browser.wait_for("document.getElementById('progress').textContent === '0 / 20'")
            browser.click('button[data-rating="3"]')
            settled(browser)
    finally:
        browser.close()

    ratings = ReviewFolder(folder).all_ratings()
    assert {i: (r.rating, r.flags) for i, r in ratings["rev-a"].items()} == expected
    assert {i: (r.rating, r.flags) for i, r in ratings["rev-b"].items()} == {"001": (3, ())}
    lines = (folder / "ratings/rev-a.jsonl").read_text().splitlines()
    assert len(lines) == clicks  # one fsynced line per click: none lost, none twice
    assert {json.loads(line)["reviewer"] for line in lines} == {"rev-a"}


def test_a_torn_last_line_is_ignored_and_a_rerating_replaces(tmp_path):
    ratings = RatingsFile(tmp_path / "r.jsonl")
    ratings.append(Rating("001", 4))
    ratings.append(Rating("002", 2, ("hallucinated",)))
    with open(tmp_path / "r.jsonl", "ab") as f:  # a crash mid-write
        f.write(b'{"item": "001", "rat')
    assert ratings.read() == {"001": Rating("001", 4), "002": Rating("002", 2, ("hallucinated",))}
    ratings.append(Rating("001", 5, ("background",)))  # after the crash: a line of its own
    assert ratings.read() == {"001": Rating("001", 5, ("background",)), "002": Rating("002", 2, ("hallucinated",))}
    assert ratings.read({"002"}) == {"002": Rating("002", 2, ("hallucinated",))}
    with pytest.raises(ValueError, match="rating: 6"):
        Rating.parse({"item": "001", "rating": 6})
    with pytest.raises(ValueError, match="flags"):
        Rating.parse({"item": "001", "rating": 3, "flags": ["typo"]})


# --------------------------------------------------------------------------- scores

def review_folder(root: Path, builds: list[list[str]], confidence: dict[str, float] | None = None) -> ReviewFolder:
    """A review folder as sample writes one: items/items.json and key.json (build k holds builds[k];
    each item's confidence from ``confidence``)."""
    (root / "items").mkdir(parents=True)
    items = [i for b in builds for i in b]
    (root / "items/items.json").write_text(json.dumps({"items": [{"item": i, "images": [], "description": "d"}
                                                                 for i in items]}))
    (root / "key.json").write_text(json.dumps({
        "builds": [{"label": f"build{k}", "build": str(root / f"b{k}")} for k in range(len(builds))],
        "items": {i: {"build": k, "confidence": (confidence or {}).get(i)} for k, b in enumerate(builds) for i in b}}))
    return ReviewFolder(root)


def test_scores_equal_the_formulas(tmp_path, capsys):
    builds = [[f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]]
    folder = review_folder(tmp_path / "review", builds)
    rng = np.random.default_rng(0)
    given = {}  # reviewer → item → rating; lenient, harsh and middling reviewers, not every item rated
    for reviewer, bias in (("lenient", 1), ("harsh", -1), ("middle", 0)):
        for k, items in enumerate(builds):
            for item in items:
                if reviewer == "middle" and item in ("a5", "b0"):
                    continue
                given.setdefault(reviewer, {})[item] = int(np.clip(3 + k + bias + rng.integers(-1, 2), 1, 5))
    flagged = {("harsh", "a1"): ("hallucinated",), ("lenient", "b2"): ("wrong_body_part", "background"),
               ("middle", "b3"): ("background",)}
    for reviewer, ratings in given.items():
        for item, value in ratings.items():
            folder.ratings_file(reviewer).append(Rating(item, value, flagged.get((reviewer, item), ())))
    folder.ratings_file("middle").append(Rating("a5", None, ("hallucinated",)))  # flagged, never rated

    printed = run(capsys, "score", folder.root, "--set", "link_builds=false", "--set", "bootstrap=2000")
    scores = json.loads((folder.scores_dir / "scores.json").read_text())
    means = {r: np.mean(list(v.values())) for r, v in given.items()}
    grand = np.mean([x for v in given.values() for x in v.values()])
    for k, (items, row) in enumerate(zip(builds, scores["builds"])):
        raw = [given[r][i] for r in given for i in items if i in given[r]]
        normalised = [given[r][i] / means[r] * grand for r in given for i in items if i in given[r]]
        assert row["ratings"] == len(raw) and row["items_rated"] == 6
        assert row["raw_mean"] == pytest.approx(np.mean(raw)) and row["normalised_mean"] == pytest.approx(np.mean(normalised))
        assert row["raw_ci"][0] <= row["raw_mean"] <= row["raw_ci"][1]
        assert row["normalised_ci"][0] <= row["normalised_mean"] <= row["normalised_ci"][1]
        assert f"| build{k} " in printed and f" {np.mean(raw):.2f} " in printed
    assert scores["builds"][0]["flags"] == {"wrong_body_part": 0, "hallucinated": 2, "background": 0}
    assert scores["builds"][1]["flags"] == {"wrong_body_part": 1, "hallucinated": 0, "background": 2}
    assert scores["grand_mean"] == pytest.approx(grand)
    assert {r["reviewer"]: r["mean"] for r in scores["reviewers"]} == pytest.approx(means)
    assert "![Mean ratings](scores.svg)" in (folder.scores_dir / "scores.md").read_text()
    assert (folder.scores_dir / "scores.svg").read_text().count("<circle") == 2
    # seeded: scoring again gives the same intervals
    run(capsys, "score", folder.root, "--set", "link_builds=false", "--set", "bootstrap=2000")
    assert json.loads((folder.scores_dir / "scores.json").read_text())["builds"] == scores["builds"]


def test_accuracy_per_confidence_band(tmp_path, capsys):
    items = [f"a{i}" for i in range(6)]
    confidence = dict(zip(items, (0.9, 0.7, 0.66, 0.55, 0.2, None)))  # high ×3, medium, low, none
    folder = review_folder(tmp_path / "review", [items], confidence)
    given = {"one": dict(zip(items, (5, 4, 2, 3, 1, 4))), "two": dict(zip(items, (5, 5, 4, 2, 2, 1)))}
    for reviewer, ratings in given.items():
        for item, value in ratings.items():
            folder.ratings_file(reviewer).append(Rating(item, value, ("background",) if value == 1 else ()))
    run(capsys, "score", folder.root, "--set", "link_builds=false", "--set", "bootstrap=200")
    bands = {r["band"]: r for r in json.loads((folder.scores_dir / "scores.json").read_text())["bands"]}
    assert list(bands) == ["high", "medium", "low"]  # most trusted first; an item without one in none
    high = [v for r in given.values() for i, v in r.items() if i in ("a0", "a1", "a2")]
    assert bands["high"]["items"] == 3 and bands["high"]["mean"] == pytest.approx(np.mean(high))
    assert bands["high"]["rated_4_or_5"] == pytest.approx(np.mean([v >= 4 for v in high]))
    assert bands["low"]["mean"] == 1.5 and bands["low"]["flags"]["background"] == 1
    assert "## By confidence" in (folder.scores_dir / "scores.md").read_text()


def test_sample_by_confidence_draws_every_band(builds, tmp_path, capsys):
    from pipeline.evidence import confidence_band

    out = tmp_path / "banded"
    run(capsys, "sample", "--build", builds[0], "--per-build", 3, "--seed", 1, "--out", out, "--by-confidence")
    drawn = [confidence_band(k["confidence"]) for k in json.loads((out / "key.json").read_text())["items"].values()]
    rows = pq.read_table(builds[0] / "traits", columns=["status", "confidence"]).to_pylist()
    available = {confidence_band(r["confidence"]) for r in rows if r["status"] == "ok"}
    turns = [b for b in ("high", "medium", "low", None) if b in available]  # the bands take turns in this order
    assert len(drawn) == 3 and set(drawn) == set(turns[:3]) and len(turns) >= 2  # the demo's confidence spreads


def test_bootstrap_interval_covers_the_true_mean():
    """A known case: items of 1-3 ratings drawn from a fixed distribution over 1-5; the 95% interval
    of 30 items holds the true mean about 95% of the time, and is about ±1.96 σ/√n wide."""
    p = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    true_mean = float(p @ np.arange(1, 6))
    sd = float(np.sqrt(p @ (np.arange(1, 6) - true_mean) ** 2))
    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for _ in range(400):
        per_item = [list(rng.choice(np.arange(1, 6), size=3, p=p)) for _ in range(30)]
        lo, hi = bootstrap_interval(per_item, 1000, 0.95, rng)
        covered += lo <= true_mean <= hi
        widths.append(hi - lo)
    assert 0.91 <= covered / 400 <= 0.98
    assert np.mean(widths) == pytest.approx(2 * 1.96 * sd / np.sqrt(90), rel=0.1)
    assert bootstrap_interval([[4, 4], [4]], 500, 0.95, rng) == (4.0, 4.0)
    assert bootstrap_interval([[], []], 500, 0.95, rng) == (None, None)


def test_alpha_of_krippendorffs_example(tmp_path, capsys):
    units = [f"u{k:02d}" for k in range(1, 13)]
    folder = review_folder(tmp_path / "review", [units[:6], units[6:]])
    for observer, row in zip("ABCD", KRIPPENDORFF_2011):
        for unit, value in zip(units, row.split()):
            if value != ".":
                folder.ratings_file(observer).append(Rating(unit, int(value)))
    run(capsys, "score", folder.root, "--set", "link_builds=false")
    assert round(json.loads((folder.scores_dir / "scores.json").read_text())["alpha"], 3) == 0.815


def test_scores_are_linked_from_the_build_report(builds, review, tmp_path, capsys):
    folder = tmp_path / "review"
    shutil.copytree(review, folder)
    key = json.loads((folder / "key.json").read_text())
    for reviewer, shift in (("r1", 0), ("r2", 1)):
        for item, k in key["items"].items():
            ReviewFolder(folder).ratings_file(reviewer).append(Rating(item, 2 + k["build"] + shift))
    run(capsys, "score", folder)
    scores = json.loads((folder / "scores/scores.json").read_text())
    assert [b["raw_mean"] for b in scores["builds"]] == [2.5, 3.5]
    # the paper's cost columns: the demo's 3 images per prompt; templated descriptions have no tokens
    assert [(b["images_per_prompt"], b["tokens_per_annotation"]) for b in scores["builds"]] == [(3, None)] * 2
    assert "| Build " in (folder / "scores/scores.md").read_text() and " Images/prompt " in (folder / "scores/scores.md").read_text()
    for b, build in enumerate(builds):
        pointer = json.loads(next((build / "reviews").glob("*.json")).read_text())
        assert pointer["this_build"] == b and pointer["scores"] == str((folder / "scores/scores.md").resolve())
    index = write_report(str(builds[1]), log=lambda *_: None, max_images=1, max_gallery=1)
    summary = Path(index).with_name("summary.html").read_text()
    assert "Expert reviews" in summary and f"<b>{LABELS[1]}</b> (this build)" in summary
    assert "<td class=num>3.5</td>" in summary and (folder / "scores/scores.md").resolve().as_uri() in summary


def test_tokens_per_annotation_average_the_answers_that_did_not_fail(builds, tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.review.score import build_costs

    build = tmp_path / "build"
    shutil.copytree(builds[1], build)
    traits = pq.read_table(build / "traits")
    n = traits.num_rows
    status = ["failed"] + traits["status"].to_pylist()[1:]
    for name, values, kind in (("prompt_tokens", [10_000] + [300 + k for k in range(1, n)], pa.int64()),
                               ("completion_tokens", [0] + [50] * (n - 1), pa.int64()), ("status", status, pa.string())):
        traits = traits.set_column(traits.schema.get_field_index(name), name, pa.array(values, kind))
    for f in (build / "traits").glob("*.parquet"):
        f.unlink()
    pq.write_table(traits, build / "traits" / "part-0.parquet")
    costs = build_costs(str(build), StorageConfig())
    assert costs == {"images_per_prompt": 3, "tokens_per_annotation": pytest.approx(np.mean([350 + k for k in range(1, n)]))}
    assert build_costs(str(tmp_path / "moved"), StorageConfig()) == {"images_per_prompt": None, "tokens_per_annotation": None}


def test_bad_invocations_are_refused_naming_the_key(builds, review, tmp_path, capsys):
    assert "builds" in refused(capsys, "sample", "--out", tmp_path / "r")
    assert "per_build" in refused(capsys, "sample", "--build", builds[0], "--per-build", 0, "--out", tmp_path / "r")
    assert "labels" in refused(capsys, "sample", "--build", builds[0], "--label", "a", "--label", "b", "--out",
                               tmp_path / "r")
    assert f"out: {review} already exists" in refused(capsys, "sample", "--build", builds[0], "--out", review)
    assert "is not a finished sae-traits build" in refused(capsys, "sample", "--build", tmp_path, "--out", tmp_path / "r")
    assert "out: " in refused(capsys, "sample", "--build", builds[0], "--out", "s3://bucket/review")
    assert f"review: {tmp_path} is not a review folder" in refused(capsys, "score", tmp_path)
    assert "bootstrap" in refused(capsys, "score", review, "--set", "bootstrap=3")
