"""The build report, opened in headless Chromium through the DevTools protocol: every page of the
demo build's report (copied elsewhere, so it must be self-contained) loads, every <img> loads,
every local link and #fragment resolves; a species page's screenshot shows the planted part's
zone outlined; builds without annotations, without selected latents, with failed requests, with
moved source images, with small page caps and on S3 still give a complete report.

Chromium is required (scripts/setup.sh installs Debian's package): without it these tests fail."""

import csv
import json
import shutil
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo.quality import best_latents, planted_parts
from pipeline.errors import Rejected, write_errors
from pipeline.finished import FinishedBuild
from pipeline.report import OUTLINE_PX, OUTLINE_RGB, STATUSES, main, species_file, write_report
from pipeline.report_data import GenusCounts, RowsBy
from tests.browser import Browser

PAGE_INFO = """(() => ({
  images: Array.from(document.images, i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
  links: Array.from(document.querySelectorAll('a[href], link[href]'), a => a.href),
  ids: Array.from(document.querySelectorAll('[id]'), e => e.id),
  styled: Array.from(document.querySelectorAll('link[rel=stylesheet]'), l => l.sheet !== null),
  scripts: document.scripts.length,
  text: document.body.innerText,
}))()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def demo_report(demo_build):
    out, _ = demo_build
    return out, Path(write_report(str(out), log=lambda *_: None))


class Attributes(HTMLParser):
    """Every src / href attribute value of a page."""

    def __init__(self):
        super().__init__()
        self.values = []

    def handle_starttag(self, tag, attrs):
        self.values += [v for k, v in attrs if k in ("src", "href")]


def crawl(browser: Browser, report: Path) -> dict[str, dict]:
    """Open index.html and every page linked from a page, in Chromium; check each page as it is
    loaded (images, links, no script). Returns {page file name: PAGE_INFO + html}."""
    pages, todo = {}, ["index.html"]
    while todo:
        name = todo.pop()
        if name in pages:
            continue
        assert browser.goto((report / name).as_uri()) is None, name
        info = pages[name] = browser.eval(PAGE_INFO)
        assert info["scripts"] == 0, name                                     # plain HTML, no JavaScript
        assert info["styled"] == [True], name                                 # the one CSS file loaded
        assert all(ok for _, ok in info["images"]), (name, [s for s, ok in info["images"] if not ok])
        parser = Attributes()
        parser.feed((report / name).read_text())
        # Relative references only: the folder can be copied, served, or opened from S3.
        assert all("://" not in v and not v.startswith("/") for v in parser.values), (name, parser.values)
        for href in info["links"]:
            url = urlparse(href)
            target = Path(unquote(url.path))
            assert url.scheme == "file" and target.is_file() and report in target.parents, (name, href)
            if target.suffix == ".html":
                todo.append(target.name)
    for name, info in pages.items():  # every #fragment names an element of its page
        for href in info["links"]:
            url = urlparse(href)
            if url.fragment:
                assert url.fragment in pages[Path(unquote(url.path)).name]["ids"], (name, href)
    assert set(pages) == {p.name for p in report.glob("*.html")}              # no page unreachable
    return pages


def copy_build(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("report", "_build"))
    return dest


def rewrite(folder: Path, table: pa.Table) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")


# --------------------------------------------------------------------------- the demo build

def test_demo_report_renders_in_chromium(demo_report, browser, tmp_path):
    out, index = demo_report
    assert index == out / "report" / "index.html"
    copy = tmp_path / "elsewhere"
    shutil.copytree(index.parent, copy)  # the report alone, away from the build and its images
    started = time.perf_counter()
    pages = crawl(browser, copy)
    print(f"\n{len(pages)} pages, {sum(len(p['images']) for p in pages.values())} images checked in Chromium "
          f"in {time.perf_counter() - started:.1f} s")

    # The report shows the selected latents that went forward (candidates/ ranks every selected pair).
    candidates = pq.read_table(out / "candidates", columns=["species", "latent", "forward"]).to_pylist()
    selected = [dict(t) for t in {(("species", r["species"]), ("latent", r["latent"])) for r in candidates if r["forward"]}]
    species = {r["species"] for r in pq.read_table(out / "activations", columns=["species"]).to_pylist() if r["species"]}
    assert {species_file(s) for s in species} <= set(pages)
    assert {f"latent-{r['latent']}.html" for r in selected} <= set(pages)
    traits = pq.read_table(out / "traits", columns=["status", "image_ids", "confidence"]).to_pylist()
    index_text = pages["index.html"]["text"]
    statuses = Counter(r["status"] for r in traits)
    by_status = ", ".join(f"{st} {statuses[st]}" for st in STATUSES if statuses[st])
    assert f"{len(species)} species" in index_text and f"{len(traits)} annotations: {by_status}" in index_text
    # every annotation that was asked shows its confidence, coloured by band; the index counts the trusted ones
    shown = "".join(p["text"] for p in pages.values())
    asked = [r for r in traits if r["confidence"] is not None and r["status"] == "ok"]
    assert asked and shown.count("confidence ") >= len(asked) and "Confidence ≥ 0.65" in index_text
    for s in species:  # the species' row: genus, images, latents, annotations
        assert s in index_text
    assert "Consensus group of 3 images" in "".join(p["text"] for p in pages.values())
    summary = (copy / "summary.html").read_text()
    assert summary.count("<svg") == 5 and "Firings per image" in summary and "Stage wall time" in summary
    assert "Annotations by confidence" in summary
    for r in selected:  # each latent page says where it was selected and shows its strongest images
        info = pages[f"latent-{r['latent']}.html"]
        assert r["species"] in info["text"] and "Firings by genus" in info["text"] and info["images"]


def test_species_page_outlines_the_planted_part(demo_report, demo_dir, browser, tmp_path):
    """Screenshot of each species page's first image of its best latent: outline-coloured pixels
    lie on the ground-truth box of the planted part (where that image's zone box crosses it), and
    nowhere away from the drawn boxes."""
    out, index = demo_report
    with open(demo_dir / "data" / "ground_truth.csv", newline="") as f:
        parts = {r["processid"]: [int(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in csv.DictReader(f)}
    candidates = {(r["image_id"], r["latent"]): r for r in pq.read_table(out / "candidates").to_pylist()}
    best = best_latents(out, planted_parts(demo_dir / "data" / "ground_truth.csv"))
    checked = []
    for species, st in sorted(best.items()):
        assert browser.goto((index.parent / species_file(species)).as_uri()) is None
        img = browser.eval(f"""(() => {{ const i = document.querySelector('#z{st["latent"]} img');
            const r = i.getBoundingClientRect();
            return {{alt: i.alt, x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height}}; }})()""")
        image_id = img["alt"].split(",")[0]
        c = candidates[image_id, st["latent"]]
        shot = browser.screenshot(img["x"], img["y"], img["w"], img["h"]).astype(int)
        Image.fromarray(shot.astype(np.uint8)).save(tmp_path / f"{image_id}.png")
        scale = (shot.shape[1] / c["orig_w"], shot.shape[0] / c["orig_h"])

        def rect(b, grow=0, shape=shot.shape[:2], scale=scale):  # bool [h, w]: a box of original pixels on the screenshot
            (kx, ky), m = scale, np.zeros(shape, bool)
            m[max(0, round(b[1] * ky) - grow):round(b[3] * ky) + grow, max(0, round(b[0] * kx) - grow):round(b[2] * kx) + grow] = True
            return m
        outline = (np.abs(shot - OUTLINE_RGB) <= 60).all(axis=-1)
        bands = [rect([b["x0"], b["y0"], b["x1"], b["y1"]], 2) & ~rect([b["x0"], b["y0"], b["x1"], b["y1"]], -OUTLINE_PX - 2)
                 for b in c["boxes"]]
        # Nothing of the photo itself has the outline colour: every such pixel is on a drawn box.
        assert outline.sum() > 0 and (outline & ~np.any(bands, axis=0)).sum() <= 10, (species, image_id)
        part = rect(parts[image_id], 1)
        expected = max((band & part).sum() for band in bands)
        if expected >= 3 * OUTLINE_PX:  # some box's outline crosses the part (not one box around it all)
            assert (outline & part).sum() >= 0.3 * expected, (species, image_id, (outline & part).sum(), expected)
            checked.append(species)
    print(f"\nplanted part outlined on the species page of {len(checked)} of {len(best)} species: {checked}")
    assert len(checked) >= len(best) - 1 and len(checked) >= 3, checked


# --------------------------------------------------------------------------- other builds

def test_report_without_annotations(demo_build, browser, tmp_path):
    from pipeline.contract import TRAITS_SCHEMA

    out = copy_build(demo_build[0], tmp_path / "build")
    rewrite(out / "traits", TRAITS_SCHEMA.empty_table())
    pages = crawl(browser, Path(write_report(str(out), log=lambda *_: None)).parent)
    assert "0 annotations: none" in pages["index.html"]["text"]
    texts = "".join(p["text"] for p in pages.values())
    assert "Candidate (not annotated)" in texts and "Consensus group" not in texts
    assert sum(len(p["images"]) for p in pages.values()) > 0


def test_report_when_nothing_was_selected(demo_build, browser, tmp_path):
    from pipeline.contract import TRAITS_SCHEMA

    out = copy_build(demo_build[0], tmp_path / "build")
    rewrite(out / "selected", pq.read_table(out / "selected").schema.empty_table())
    shutil.rmtree(out / "candidates")
    rewrite(out / "traits", TRAITS_SCHEMA.empty_table())
    pages = crawl(browser, Path(write_report(str(out), log=lambda *_: None)).parent)
    assert not [p for p in pages if p.startswith("latent-")]
    species_pages = [p for name, p in pages.items() if name.startswith("species-")]
    assert species_pages and all("No latent was selected" in p["text"] for p in species_pages)


def test_report_with_failed_requests(demo_build, browser, tmp_path):
    out = copy_build(demo_build[0], tmp_path / "build")
    traits = pq.read_table(out / "traits")
    rows = traits.to_pylist()
    for r in rows:
        r.update(status="failed", description=None, traits=[], common_traits=[], body_part=None,
                 error="timeout: no answer after 6 attempts")
    rewrite(out / "traits", pa.Table.from_pylist(rows, schema=traits.schema))
    write_errors(str(out), {}, [Rejected(stage="annotate", reason="llm_timeout", detail=r["error"],
                                         image_id=r["image_ids"][0], annotation_id=r["annotation_id"]) for r in rows])
    pages = crawl(browser, Path(write_report(str(out), log=lambda *_: None)).parent)
    assert f"{len(rows)} annotations: failed {len(rows)} · {len(rows)} errors" in pages["index.html"]["text"]
    assert "llm_timeout" in pages["summary.html"]["text"]
    species = next(n for n in pages if n.startswith("species-") and "Latent" in pages[n]["text"])
    assert "Error: timeout: no answer after 6 attempts" in pages[species]["text"]


def test_report_when_the_source_images_moved(demo_build, browser, tmp_path):
    out = copy_build(demo_build[0], tmp_path / "build")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["source"]["root"] = str(tmp_path / "gone")
    for folder in ("activations", "candidates"):  # the images' paths, as a moved source would leave them
        t = pq.read_table(out / folder)
        rewrite(out / folder, t.set_column(t.schema.get_field_index("path"), "path",
                                           pa.array([str(tmp_path / "gone" / "x.jpg")] * t.num_rows)))
    (out / "manifest.json").write_text(json.dumps(manifest))
    pages = crawl(browser, Path(write_report(str(out), log=lambda *_: None)).parent)
    assert not any(p["images"] for p in pages.values())
    assert "image unavailable" in "".join(p["text"] for p in pages.values())


def test_cli_caps_pages(demo_build, browser, tmp_path, capsys):
    out = copy_build(demo_build[0], tmp_path / "build")
    assert main(["--build", str(out), "--max-species-per-page", "3", "--max-images", "2", "--max-gallery", "2"]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    pages = crawl(browser, index.parent)
    n_species = len([p for p in pages if p.startswith("species-")])
    assert {"index.html", "index-2.html", "index-3.html"} <= set(pages)
    assert f"Species 4–6 of {n_species}" in pages["index-2.html"]["text"]
    # The latents list is paginated the same way, and between its pages links every latent page once.
    latent_pages = {p for p in pages if p.startswith("latent-")}
    listed = [n for n in pages if n.startswith("latents")]
    assert len(listed) == -(-len(latent_pages) // 3) and f"of {len(latent_pages)}" in pages["latents-2.html"]["text"]
    linked = []
    for n in listed:
        links = Attributes()
        links.feed((index.parent / n).read_text())
        linked += [h for h in links.values if h.startswith("latent-")]
    assert sorted(linked) == sorted(latent_pages)
    for name, p in pages.items():
        if name.startswith("latent-"):
            assert len(p["images"]) <= 2
        if name.startswith("species-") and " 0 selected latents" not in p["text"]:
            assert "showing 2 of 9 images" in p["text"]


def test_report_on_s3(demo_build, s3_server, browser, tmp_path):
    """OUT on S3 (moto): tables and manifest read from there, pages and thumbnails written there."""
    import s3fs

    from tests.s3_server import FAKE_KEY, FAKE_SECRET

    options = {"endpoint_url": s3_server, "key": FAKE_KEY, "secret": FAKE_SECRET}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("reports")
    local = copy_build(demo_build[0], tmp_path / "build")
    traits = pq.read_table(local / "traits")
    rewrite(local / "traits", traits.select([c for c in traits.column_names if c != "renderings"]))  # 20 MB less to upload
    for p in sorted(q for q in local.rglob("*") if q.is_file()):
        fs.put_file(str(p), f"reports/run1/{p.relative_to(local).as_posix()}")
    index = write_report("s3://reports/run1", options, log=lambda *_: None)
    assert index == "s3://reports/run1/report/index.html"
    fs.get("reports/run1/report", str(tmp_path / "fetched"), recursive=True)
    pages = crawl(browser, tmp_path / "fetched")
    assert sum(len(p["images"]) for p in pages.values()) > 0


def test_latent_galleries_of_a_large_build_come_from_candidates(demo_build):
    """Beyond max_scan_images the report does not read every firing (10^10 for BIOSCAN-5M): a
    latent's gallery is then its strongest candidates; below it, the scan sees every image."""
    from pipeline.report_data import BuildData

    out, _ = demo_build
    build = FinishedBuild.open(str(out))
    scanned, bounded = BuildData(build, 4), BuildData(build, 4, max_scan_images=0)
    assert scanned.gallery_scanned and not bounded.gallery_scanned
    candidates = {(r["image_id"], r["latent"]): r["activation_sum"] for r in pq.read_table(out / "candidates").to_pylist()
                  if r["forward"]}  # the pairs the report pages (candidates/ measures every selected pair)
    assert set(bounded.gallery.keys) == set(scanned.gallery.keys) == set(bounded.latents)
    for z in bounded.gallery.keys:
        rows = bounded.gallery.rows(z)
        sums = [r["value_sum"] for r in rows]
        assert sums == sorted(sums, reverse=True) and all(candidates[r["image_id"], z] == r["value_sum"] for r in rows)
        best = max(v for (_, latent), v in candidates.items() if latent == z)
        assert sums[0] == best and scanned.gallery.rows(z)[0]["value_sum"] >= best * (1 - 1e-5)


def test_genus_counts_per_latent_equal_a_direct_sort():
    """The latent pages' "firings by genus": each latent's strongest genera and total, from the
    Arrow slices, equal sorting and summing the rows directly; split across files like counts/."""
    rng = np.random.default_rng(0)
    rows = [{"rank": "genus", "taxon": f"G{g}", "latent": int(z), "count": int(rng.integers(1, 50))}
            for g in range(30) for z in rng.choice(12, 6, replace=False)]
    counts = GenusCounts([pa.Table.from_pylist(rows[:70]), pa.Table.from_pylist(rows[70:])])
    for z in range(13):
        mine = sorted((r for r in rows if r["latent"] == z), key=lambda r: (-r["count"], r["taxon"]))
        top, n = counts.strongest(z, 5)
        assert top == [{k: r[k] for k in ("taxon", "latent", "count")} for r in mine[:5]] and n == len(mine)
        assert counts.total(z) == sum(r["count"] for r in mine)
    assert GenusCounts([]).strongest(3, 5) == ([], 0) and GenusCounts([]).total(3) == 0


def test_rows_by_key_equal_a_direct_grouping():
    """The report's per-species (and per-latent) rows, sliced from one sorted Arrow table, equal
    grouping and sorting the Python rows directly — a null key included, keys in sorted order."""
    rng = np.random.default_rng(1)
    rows = [{"species": None if k % 17 == 0 else f"S{int(rng.integers(0, 9))}", "latent": int(rng.integers(0, 5)),
             "image_id": f"i{k:03d}"} for k in range(200)]
    by = RowsBy(pa.Table.from_pylist(rows), "species", [("latent", "descending"), ("image_id", "ascending")])
    names = sorted({r["species"] for r in rows if r["species"] is not None})
    assert by.keys == [*names, None] and len(by) == len(rows)
    for key in by.keys:
        mine = sorted((r for r in rows if r["species"] == key), key=lambda r: (-r["latent"], r["image_id"]))
        assert by.rows(key) == mine and by.count(key) == len(mine) and by.rows(key, 3) == mine[:3]
    assert by.rows("absent") == [] and by.count("absent") == 0
    assert RowsBy(pa.Table.from_pylist(rows).slice(0, 0), "species").keys == []


def test_species_pages_written_in_passes_equal_one_pass(demo_build, tmp_path, monkeypatch):
    """The species pages come from candidates/ and traits/ read a pass of species at a time (so a
    build's annotations never sit whole in the driver); with passes of a few rows the report's
    files are byte for byte those of one pass."""
    import pipeline.report_data as report_data

    out, _ = demo_build
    sites = {}
    for name, pass_rows in (("one", 1 << 30), ("many", 7)):
        build = tmp_path / name
        shutil.copytree(out, build, ignore=shutil.ignore_patterns("report"))
        monkeypatch.setattr(report_data, "PASS_ROWS", pass_rows)
        data = report_data.BuildData(FinishedBuild.open(str(build)), 4)
        sites[name] = (len(list(data.species_passes())), write_report(str(build), log=lambda *_: None))
    assert sites["one"][0] == 1 and sites["many"][0] > 5
    one, many = (Path(sites[k][1]).parent for k in ("one", "many"))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(many) for p in many.rglob("*") if p.is_file()) and len(files) > 20
    assert all((one / f).read_bytes() == (many / f).read_bytes() for f in files)

