"""The build report: a static HTML site under OUT/report/ for browsing what a build found.

    python -m pipeline.report --build OUT [--max-species-per-page N] [--max-images N] [--max-gallery N]

- ``index.html`` (+ ``index-2.html``, ...): the species, paginated, with images, selected latents
  and annotations by status, totals on every page;
- ``latents.html`` (+ ``latents-2.html``, ...): the selected latents, paginated, where each was
  selected, its firings and annotations;
- a page per species: its selected latents that went forward (f_species, f_genus, their evidence),
  example images with the activation zones outlined in :data:`OUTLINE_RGB`, each region's
  measurements, the trait text and the consensus groups, annotations most trusted first and
  coloured by confidence band (:data:`pipeline.evidence.CONFIDENCE_BANDS`) with their evidence;
- a page per selected latent: its strongest-firing image regions across species (crops around the
  firing patches), where it was selected, and its firing counts by genus;
- ``summary.html``: the manifest's figures, plots as inline SVG, and the errors.

Plain HTML and one CSS file, no JavaScript. Thumbnails are small JPEGs made here under
``report/thumbs/`` and referenced by relative paths, so the folder can be copied, served by any
static server or opened from S3. Every path goes through fsspec (``OUT`` may be ``s3://...``);
the images are read from the build's source with the resolved config in ``manifest.json``; what is
read of the build, and how it is kept bounded, is :mod:`pipeline.report_data`."""

from __future__ import annotations

import argparse
import html
import io
import json
import re
import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.annotation.renderings import crop_box, union_box
from pipeline.boxes import zones_to_boxes
from pipeline.config import BuildConfig
from pipeline.console import PREFIX, exit_code
from pipeline.evidence import CONFIDENCE_BANDS, TRUSTED, confidence_band
from pipeline.finished import FinishedBuild
from pipeline.preprocessing import Geometry, decode_image
from pipeline.report_data import BuildData, RowsBy
from pipeline.sources import ImageReader

# Chartreuse: far from every colour a specimen photo (and the demo's planted parts: red, orange,
# yellow, green, cyan, blue, violet, magenta) is likely to have, so an outline is never mistaken.
OUTLINE_RGB = (128, 255, 0)
OUTLINE_HEX = "#{:02x}{:02x}{:02x}".format(*OUTLINE_RGB)
OUTLINE_PX = 3
THUMB_PX = 256        # longest side of an example image on a species page
CROP_PX = 160         # longest side of a gallery crop on a latent page
STATUSES = ("ok", "background", "low_confidence", "unparsed", "failed")
BAND_COLOURS = {"high": "#cdeccd", "medium": "#fbe7b5", "low": "#f6c6c6"}

CSS = f"""body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 40px; color: #222; }}
nav {{ padding: 10px 0; border-bottom: 1px solid #ddd; margin-bottom: 8px; }}
nav a {{ margin-right: 12px; }}
h1 {{ font-size: 22px; margin: 12px 0 4px; }} h2 {{ font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #eee; }}
h3 {{ font-size: 15px; margin: 4px 0; }}
table {{ border-collapse: collapse; margin: 6px 0 12px; }}
th, td {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }}
th {{ background: #f5f5f5; }} td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.muted {{ color: #777; }} .small {{ font-size: 12px; }}
.swatch {{ display: inline-block; width: 11px; height: 11px; border: 1px solid #999; vertical-align: middle; margin-right: 3px; }}
.status {{ display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 12px; background: #ddd; }}
.status-ok {{ background: #cdeccd; }} .status-background {{ background: #e6e6e6; }}
.status-unparsed {{ background: #fbe7b5; }} .status-failed {{ background: #f6c6c6; }}
.status-low_confidence {{ background: #e6e6e6; }}
{"".join(f".conf-{band} {{ background: {colour}; }} " for band, colour in BAND_COLOURS.items())}
.card {{ border: 1px solid #ddd; border-radius: 4px; padding: 8px; margin: 10px 0; }}
.images {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; }} figure img {{ display: block; max-width: 100%; }}
figcaption {{ font-size: 12px; color: #555; max-width: {THUMB_PX}px; overflow-wrap: anywhere; }}
.gallery figcaption {{ max-width: {CROP_PX}px; }}
.missing {{ width: 120px; height: 80px; background: #eee; color: #777; display: flex; align-items: center; justify-content: center; }}
.bar {{ display: inline-block; height: 10px; background: #6a8fd0; }}
.pager a, .pager b {{ margin-right: 8px; }}
svg.chart {{ font: 11px system-ui, sans-serif; }} svg.chart rect {{ fill: #6a8fd0; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 24px; }}
pre {{ background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }}
"""


# --------------------------------------------------------------------------- small HTML helpers

def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def num(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def table(header: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already; columns in ``numeric`` are right-aligned; no header row for None."""
    def cells(tag, row):
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{c}</{tag}>' for i, c in enumerate(row))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    head = f"<thead><tr>{cells('th', header)}</tr></thead>" if header else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)} · sae-traits report</title><link rel="stylesheet" href="style.css"></head>\n'
            f'<body><nav><a href="index.html">Species</a><a href="latents.html">Latents</a>'
            f'<a href="summary.html">Build summary</a></nav>\n'
            f"<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def swatch(rgb) -> str:
    return f'<span class="swatch" style="background: rgb({int(rgb[0])}, {int(rgb[1])}, {int(rgb[2])})"></span>'


def status_badge(status: str | None) -> str:
    return f'<span class="status status-{esc(status)}">{esc(status)}</span>'


def confidence_badge(confidence: float | None) -> str:
    """The confidence, coloured by its band; nothing for a row without one."""
    band = confidence_band(confidence)
    return "" if band is None else f'<span class="status conf-{band}">confidence {confidence:.2f} ({band})</span>'


def evidence_text(t: dict) -> str:
    """One line of what the confidence rests on: the pair's evidence and the unit's zones on the specimen."""
    ev = t.get("evidence")
    if not ev:
        return ""
    p = ev["pair"]
    zones = ", ".join(f"{z['on_specimen']:.0%}" for z in ev["zones"])
    return (f"<p class='small muted'>evidence: zones on the specimen {zones} · latent grounded in {p['grounded']:.0%} of "
            f"its images, consistency {p['consistency']:.2f}, compactness {p['compactness']:.2f}, partness "
            f"{p['partness']:.2f}, support {p['support']:.0%}, specificity {p['specificity']:.2f}, contrast "
            f"{p['contrast']:.2f}</p>")


def by_status(counts: Counter) -> str:
    return ", ".join(f"{esc(s)} {counts[s]:,}" for s in ordered_statuses(counts)) or "none"


def ordered_statuses(counts) -> list[str]:
    return [s for s in STATUSES if counts.get(s)] + sorted(s for s in counts if s not in STATUSES and counts[s])


def svg_bars(title: str, rows: list[tuple[str, float]], unit: str = "") -> str:
    """A horizontal bar chart as inline SVG: one labelled bar per (label, value)."""
    if not rows or max(v for _, v in rows) <= 0:
        return f'<figure><figcaption>{esc(title)}</figcaption><p class="muted">no data</p></figure>'
    label_w, bar_w, row_h = 150, 300, 20
    top = max(v for _, v in rows)
    parts = []
    for i, (label, value) in enumerate(rows):
        y, w = 4 + i * row_h, bar_w * value / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}"><title>{esc(label)}: '
                     f'{num(value)}{esc(unit)}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 13}">{num(value)}{esc(unit)}</text>')
    height = 8 + len(rows) * row_h
    return (f'<figure><figcaption><b>{esc(title)}</b></figcaption><svg class="chart" role="img" '
            f'width="{label_w + bar_w + 70}" height="{height}" viewBox="0 0 {label_w + bar_w + 70} {height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg></figure>')


def nth(values, k: int):
    return values[k] if values is not None and k < len(values) else None


def region_row(image_id: str, k: int, b: dict, m: dict) -> list[str]:
    """One region's row: its box and measurements (empty cells where there are none)."""
    def get(key, fmt="{}"):
        return fmt.format(m[key]) if m.get(key) is not None else ""
    colour = swatch((m["colour_r"], m["colour_g"], m["colour_b"])) + esc(m.get("colour_name")) if get("colour_r") else ""
    return [esc(image_id), num(k + 1), f"{b['x0']},{b['y0']}–{b['x1']},{b['y1']}", get("area_px", "{:,}"),
            get("area_frac_specimen", "{:.1%}"), f"{m['box_w_px']}×{m['box_h_px']}" if m else "", get("elongation", "{:.2f}"),
            get("orientation_deg", "{:.0f}"), get("axial_pos", "{:.2f}"), get("lateral_pos", "{:.2f}"), colour]


def thumb_name(image_id: str, latent: int) -> str:
    return f"{storage.stable_digest([image_id, str(latent)], 12)}.jpg"


def species_file(species: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", species).strip("-")[:60]
    return f"species-{slug}-{storage.stable_digest([species], 6)}.html"


def latent_file(latent: int) -> str:
    return f"latent-{int(latent)}.html"


def index_file(i: int, stem: str = "index") -> str:
    """Page i (from 0) of a paginated list: index.html, index-2.html, ... (latents.html, ...)."""
    return f"{stem}.html" if i == 0 else f"{stem}-{i + 1}.html"


def pager(stem: str, i: int, n_pages: int) -> str:
    return " ".join(f"<b>{j + 1}</b>" if j == i else f'<a href="{index_file(j, stem)}">{j + 1}</a>' for j in range(n_pages))


# --------------------------------------------------------------------------- thumbnails

class Thumbnails:
    """JPEG thumbnails under report/thumbs/, made once each on demand, in threads (reading the
    source images dominates, and on S3 it is waiting)."""

    def __init__(self, fs, folder: str, cfg: BuildConfig, log, threads: int = 8):
        self.fs, self.folder, self.cfg, self.log = fs, folder, cfg, log
        self.pool = ThreadPoolExecutor(threads)
        self.local = threading.local()
        self.made: dict[str, bool] = {}
        fs.makedirs(folder, exist_ok=True)

    def ensure(self, shots: dict[str, tuple]) -> dict[str, bool]:
        """shots: file name → (image row, boxes, crop?, side). Returns file name → made."""
        todo = [name for name in shots if name not in self.made]
        for name, ok in zip(todo, self.pool.map(lambda n: self.make(n, *shots[n]), todo)):
            self.made[name] = ok
        return {name: self.made[name] for name in shots}

    def make(self, name: str, row: dict, boxes: list[dict], crop: bool, side: int) -> bool:
        if not hasattr(self.local, "reader"):
            self.local.reader = ImageReader(self.cfg.source)
        try:
            img = decode_image(self.local.reader.read(row.get("path"), row.get("source_file"), row.get("source_row")),
                               self.cfg.preprocess)
        except Exception as exc:  # moved, deleted or unreadable since the build: the page says so
            self.log(f"{PREFIX} report: no thumbnail for {row['image_id']}: {type(exc).__name__}: {exc}")
            return False
        data = thumbnail(img, boxes, side, crop)
        with self.fs.open(storage.join(self.folder, name), "wb") as f:
            f.write(data)
        return True


def thumbnail(img: Image.Image, boxes: list[dict], side: int, crop: bool = False) -> bytes:
    """JPEG of the image (or, with ``crop``, of a window around the boxes) scaled to ``side`` px
    on its longest side, the boxes (original pixels, exclusive ends) outlined in OUTLINE_RGB."""
    x0 = y0 = 0
    if crop and boxes:
        c = crop_box(union_box(boxes), (img.height, img.width), margin_frac=0.35, min_side_px=48)
        x0, y0 = c["x0"], c["y0"]
        img = img.crop((c["x0"], c["y0"], c["x1"], c["y1"]))
    k = side / max(img.width, img.height)
    w, h = max(1, round(img.width * k)), max(1, round(img.height * k))
    kx, ky = w / img.width, h / img.height
    img = img.resize((w, h), Image.LANCZOS)
    draw = ImageDraw.Draw(img)
    for b in boxes:
        draw.rectangle([round((b["x0"] - x0) * kx), round((b["y0"] - y0) * ky),
                        round((b["x1"] - x0) * kx) - 1, round((b["y1"] - y0) * ky) - 1],
                       outline=OUTLINE_RGB, width=OUTLINE_PX)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88, subsampling=0)  # 4:4:4: a thin coloured line stays its colour
    return buf.getvalue()


# --------------------------------------------------------------------------- the report

class Report:
    def __init__(self, output: str, storage_options: dict | None, log, max_species_per_page: int,
                 max_images: int, max_gallery: int, max_rows: int):
        build = FinishedBuild.open(output, storage_options)  # the manifest is written before the report
        self.fs, self.folder = build.fs, build.path("report")
        self.log, self.max_species_per_page, self.max_images, self.max_rows = log, max_species_per_page, max_images, max_rows
        self.data = BuildData(build, max_gallery)
        if self.fs.exists(self.folder):
            self.fs.rm(self.folder, recursive=True)
        self.thumbs = Thumbnails(self.fs, storage.join(self.folder, "thumbs"), self.data.cfg, log)

        traits = self.data.trait_keys
        self.statuses = defaultdict(Counter)
        for r in traits.group_by(["species", "status"]).aggregate([("status", "count")]).to_pylist():
            self.statuses[r["species"]][r["status"]] = r["status_count"]
        self.all_statuses = sum(self.statuses.values(), Counter())
        confident = traits.filter(pc.greater_equal(pc.fill_null(traits["confidence"], -1.0), TRUSTED))
        self.trusted = Counter(confident["species"].to_pylist())
        self.bands = Counter(confidence_band(c) for c in traits["confidence"].to_pylist() if c is not None)
        annotated = traits.group_by("latent").aggregate([("latent", "count")])
        self.annotated = Counter(dict(zip(annotated["latent"].to_pylist(), annotated["latent_count"].to_pylist())))

    def write(self, name: str, text: str) -> None:
        with self.fs.open(storage.join(self.folder, name), "w", encoding="utf-8") as f:
            f.write(text)

    def run(self) -> str:
        self.write("style.css", CSS)
        for i in range(max(1, -(-len(self.data.species) // self.max_species_per_page))):
            self.write(index_file(i), self.index_page(i))
        for species in self.data.species_passes():
            rows = self.data.rows_for(species)
            for s in species:
                self.write(species_file(s), self.species_page(s, rows))
        for i in range(max(1, -(-len(self.data.latents) // self.max_species_per_page))):
            self.write(index_file(i, "latents"), self.latents_page(i))
        for z in self.data.latents:
            self.write(latent_file(z), self.latent_page(z))
        self.write("summary.html", self.summary_page())
        self.thumbs.pool.shutdown()
        self.log(f"{PREFIX} report: {len(self.data.species)} species and {len(self.data.latents)} latent pages, "
                 f"{sum(self.thumbs.made.values())} thumbnails → {storage.join(self.folder, 'index.html')}")
        return storage.join(self.folder, "index.html")

    # ----------------------------------------------------------------- index

    def totals(self) -> str:
        d = self.data
        unlabelled = d.images.get(None, 0)
        return (f"<p>{len(d.species):,} species · {sum(d.images.values()):,} images"
                f"{f' ({unlabelled:,} unlabelled)' if unlabelled else ''} · {len(d.selected_of):,} selected "
                f"(species, latent) pairs over {len(d.latents):,} latents"
                + (f" (the best {d.cfg.contrast.max_latents_per_species} per species of {d.n_selected:,} selected)"
                   if d.n_selected > len(d.selected_of) else "")
                + f" · {d.trait_keys.num_rows:,} annotations: "
                f"{by_status(self.all_statuses)} · {d.errors.num_rows:,} errors</p>")

    def index_page(self, i: int) -> str:
        species, per = self.data.species, self.max_species_per_page
        n_pages = max(1, -(-len(species) // per))
        shown = species[i * per:(i + 1) * per]
        statuses = ordered_statuses(self.all_statuses) or list(STATUSES[:1])
        rows = [[f'<a href="{species_file(s)}"><i>{esc(s)}</i></a>', esc(self.data.taxon[s][0]),
                 num(self.data.images.get(s, 0)), num(self.data.selected_of.count(s)), num(sum(self.statuses[s].values())),
                 *(num(self.statuses[s][st]) for st in statuses), num(self.trusted[s])] for s in shown]
        first = i * per + 1 if shown else 0
        body = (self.totals() + f'<p class="pager">Species {first:,}–{i * per + len(shown):,} of {len(species):,} · '
                f"page {i + 1} of {n_pages}: {pager('index', i, n_pages)}</p>"
                + table(["Species", "Genus", "Images", "Selected latents", "Annotations", *map(esc, statuses),
                         f"Confidence ≥ {TRUSTED}"], rows, numeric=set(range(2, 6 + len(statuses)))))
        return page("Species" + (f" (page {i + 1})" if i else ""), body)

    def latents_page(self, i: int) -> str:
        """The selected latents, paginated: where each was selected, its firings, its annotations."""
        d, per = self.data, self.max_species_per_page
        latents, n_pages = d.latents, max(1, -(-len(d.latents) // per))
        shown = latents[i * per:(i + 1) * per]
        where = {z: d.selected_for.slice(z)["species"].to_pylist() for z in shown}
        firings = {z: d.genus_counts.total(z) for z in shown}
        annotated = self.annotated
        rows = [[f'<a href="{latent_file(z)}">{z}</a>', num(len(where[z])),
                 ", ".join(f'<a href="{species_file(s)}"><i>{esc(s)}</i></a>' for s in sorted(where[z])[:5])
                 + (f" and {len(where[z]) - 5} more" if len(where[z]) > 5 else ""),
                 num(firings[z]), num(annotated[z])] for z in shown]
        first = i * per + 1 if shown else 0
        body = (self.totals() + f'<p class="pager">Latents {first:,}–{i * per + len(shown):,} of {len(latents):,} · '
                f"page {i + 1} of {n_pages}: {pager('latents', i, n_pages)}</p>"
                + table(["Latent", "Selected for", "Species", "Firings (all genera)", "Annotations"], rows,
                        numeric={0, 1, 3, 4}))
        return page("Selected latents" + (f" (page {i + 1})" if i else ""), body)

    # ----------------------------------------------------------------- species

    def species_page(self, s: str, rows: tuple[RowsBy, RowsBy]) -> str:
        """Species s's page; ``rows``: the candidates and traits of its pass (BuildData.rows_for)."""
        genus, family = self.data.taxon[s]
        selected = self.data.selected_of.rows(s)
        candidates_of, traits_of = self.rows_of(s, rows)
        head = (f"<p>Genus <i>{esc(genus)}</i>{f' · family {esc(family)}' if family else ''} · "
                f"{num(self.data.images.get(s, 0))} images · {len(selected)} selected latents · annotations: "
                f"{by_status(self.statuses[s])}</p><p class=small>Activation zones are outlined in "
                f"{swatch(OUTLINE_RGB)}{OUTLINE_HEX}; boxes and measurements are in original-image pixels.</p>")
        if not selected:
            return page(s, head + "<p class=muted>No latent was selected for this species (a species alone in its "
                        "genus, for one, has f_species = f_genus: nothing passes the contrast).</p>")
        rows = [[num(r.get("latent_rank")), (f'<a href="#z{r["latent"]}">{r["latent"]}</a> '
                                              f'<a class=small href="{latent_file(r["latent"])}">(latent page)</a>'), num(r["f_species"]),
                 num(r["f_genus"]), num(r.get("score")), num(r.get("evidence_score")), num(r.get("evidence_grounded")),
                 num(r.get("evidence_consistency")), num(r.get("evidence_specificity")), esc(r.get("contrast_rank")),
                 num(len(candidates_of[r["latent"]])), num(len(traits_of[r["latent"]]))] for r in selected]
        body = head + (f"<p class=small>Ranked by {esc(self.data.cfg.contrast.score)} (contrast.score); the best "
                       f"{self.data.cfg.contrast.max_latents_per_species} went forward to be annotated.</p>"
                       + table(["Rank", "Latent", "f_species", "f_genus", "Ratio", "Evidence", "Grounded", "Consistency",
                                "Specificity", "Contrast", "Candidate images", "Annotations"], rows,
                               numeric={0, 2, 3, 4, 5, 6, 7, 8, 10, 11}))
        sections = [(sel, self.examples(candidates_of[sel["latent"]], traits_of[sel["latent"]])) for sel in selected]
        made = self.thumbs.ensure({thumb_name(c["image_id"], sel["latent"]): (c, boxes, False, THUMB_PX)
                                   for sel, units in sections for members, _ in units for c, boxes, _ in members})
        return page(s, body + "".join(self.latent_section(sel, len(candidates_of[sel["latent"]]),
                                                          len(traits_of[sel["latent"]]), units, made)
                                      for sel, units in sections))

    @staticmethod
    def rows_of(s: str, rows: tuple[RowsBy, RowsBy]) -> tuple[defaultdict, defaultdict]:
        """Species s's candidates (strongest image first) and traits rows, each by latent, from the
        pass of species being written: the only Python rows of either table the report makes at a time."""
        candidates, traits = rows
        candidates_of, traits_of = defaultdict(list), defaultdict(list)
        for r in sorted(candidates.rows(s), key=lambda r: (r.get("image_rank") or 0, r["image_id"])):
            candidates_of[r["latent"]].append(r)
        for r in traits.rows(s):
            traits_of[r["latent"]].append(r)
        return candidates_of, traits_of

    def examples(self, candidate_rows: list[dict], trait_rows: list[dict]) -> list[tuple[list, dict | None]]:
        """The cards of one (species, latent), strongest image first, at most max_images images in all:
        each a traits row (one image, or a consensus group) or an unannotated candidate, with its images
        as (candidate row, boxes, measurements)."""
        candidates = {r["image_id"]: r for r in candidate_rows}
        units, covered = [], set()
        for t in trait_rows:
            members = [(candidates[i], nth(t["boxes"], k) or candidates[i]["boxes"], nth(t["measurements"], k) or [])
                       for k, i in enumerate(t["image_ids"]) if i in candidates]
            covered.update(t["image_ids"])
            units.append((members, t))
        units += [([(c, c["boxes"], [])], None) for i, c in candidates.items() if i not in covered]
        # The most trusted annotations first, then the rest by their images' rank.
        units.sort(key=lambda u: (-(u[1] or {}).get("confidence", -1.0) if u[1] and u[1].get("confidence") is not None
                                  else 1.0, min((c.get("image_rank") or 0 for c, _, _ in u[0]), default=1 << 30)))
        shown, capped = 0, []
        for members, t in units:
            if shown < self.max_images and members:
                capped.append((members[:self.max_images - shown], t))
                shown += len(capped[-1][0])
        return capped

    def latent_section(self, sel: dict, n: int, n_traits: int, units: list, made: dict[str, bool]) -> str:
        z = sel["latent"]
        shown = sum(len(members) for members, _ in units)
        cards = "".join(self.card(z, members, t, made) for members, t in units) or "<p class=muted>No images.</p>"
        return (f'<section id="z{z}"><h2>Latent <a href="{latent_file(z)}">{z}</a></h2><p>f_species {num(sel["f_species"])} · '
                f'f_genus {num(sel["f_genus"])} · {n} candidate images · {n_traits} annotations'
                f'{f" · showing {shown} of {n} images" if shown < n else ""}</p>{cards}</section>')

    def card(self, z: int, members: list, t: dict | None, made: dict[str, bool]) -> str:
        figures, regions = [], []
        for c, boxes, measured in members:
            name = thumb_name(c["image_id"], z)
            img = f'<img src="thumbs/{name}" alt="{esc(c["image_id"])}, latent {z}">' if made[name] else \
                '<div class="missing">image unavailable</div>'
            figures.append(f"<figure>{img}<figcaption>{esc(c['image_id'])} · rank {num(c.get('image_rank'))} · "
                           f"activation {num(c.get('activation_sum'))}</figcaption></figure>")
            regions += [region_row(c["image_id"], k, b, nth(measured, k) or {}) for k, b in enumerate(boxes)]
        title = f"Consensus group of {len(members)} images" if t and len(t["image_ids"]) > 1 else \
            ("Annotation" if t else "Candidate (not annotated)")
        return (f'<div class="card"><h3>{title}</h3><div class="images">{"".join(figures)}</div>'
                f'{self.annotation_text(t) if t else ""}'
                + table(["Image", "Region", "Box x0,y0–x1,y1", "Area px", "Of specimen", "W×H px", "Elongation",
                         "Orientation °", "Axial", "Lateral", "Colour"], regions, numeric={1, 3, 4, 6, 7, 8, 9})
                + "</div>")

    @staticmethod
    def annotation_text(t: dict) -> str:
        part = esc(t.get("body_part")) + (" <span class=muted>(not in the vocabulary)</span>"
                                          if t.get("body_part") and t.get("body_part_known") is False else "")
        out = [f"<p>{status_badge(t['status'])} {confidence_badge(t.get('confidence'))} "
               f"{f'<b>{part}</b> · ' if part else ''}{esc(t.get('description'))}</p>", evidence_text(t)]
        if t.get("traits"):
            out.append("<ul>" + "".join(f"<li>{esc(tr['attribute'])}: {esc(tr['value'])}</li>" for tr in t["traits"]) + "</ul>")
        if t.get("common_traits"):
            out.append("<p>Common traits: " + "; ".join(map(esc, t["common_traits"])) + "</p>")
        if t.get("error"):
            out.append(f"<p class=small>Error: {esc(t['error'])}</p>")
        out.append(f"<p class='small muted'>model {esc(t.get('model'))} · prompt {esc(t.get('prompt_version'))} · "
                   f"annotation {esc(t.get('annotation_id'))}</p>")
        return "".join(out)

    # ----------------------------------------------------------------- latent

    def latent_page(self, z: int) -> str:
        d = self.data
        where = d.selected_for.rows(z)  # by species
        rows = [[f'<a href="{species_file(r["species"])}#z{z}"><i>{esc(r["species"])}</i></a>', esc(r["genus"]),
                 num(r["f_species"]), num(r["f_genus"]), num(r.get("score")), num(r.get("rank_in_species"))] for r in where]
        body = ("<h2>Selected for</h2>" + table(["Species", "Genus", "f_species", "f_genus", "Score", "Rank in species"],
                                                rows, numeric={2, 3, 4, 5}))
        gallery = d.gallery.rows(z)
        shots = {f"z{z}-{storage.stable_digest([r['image_id']], 12)}.jpg":
                 (r, zones_to_boxes(r["patches"], Geometry.from_row(r)), True, CROP_PX) for r in gallery}
        figures = []
        for (name, ok), r in zip(self.thumbs.ensure(shots).items(), gallery):
            img = f'<img src="thumbs/{name}" alt="{esc(r["image_id"])}, latent {z}">' if ok else \
                '<div class="missing">image unavailable</div>'
            species = (f'<a href="{species_file(r["species"])}"><i>{esc(r["species"])}</i></a>' if r["species"] in d.taxon
                       else "<span class=muted>unlabelled</span>")
            figures.append(f"<figure>{img}<figcaption>{species}<br>{esc(r['image_id'])} · sum {num(r['value_sum'])} · "
                           f"{len(r['patches'])} patches</figcaption></figure>")
        among = "" if d.gallery_scanned else (" among the candidate images of the species it was selected for (this "
                                              "build is too large to scan every image's firings for a report)")
        body += (f"<h2>Strongest-firing images</h2><p class=small>The {len(gallery)} images with the highest summed "
                 f"activation of this latent{among}, cropped around its firing patches (outlined).</p>"
                 f'<div class="images gallery">{"".join(figures) or "<p class=muted>none</p>"}</div>')
        counts, n_genera = d.genus_counts.strongest(z, self.max_rows)
        top = counts[0]["count"] if counts else 1
        rows = [[esc(r["taxon"]), num(r["count"]), f'<span class="bar" style="width: {150 * r["count"] / top:.0f}px"></span>']
                for r in counts]
        more = f" (the top {self.max_rows} of {n_genera} genera)" if n_genera > self.max_rows else ""
        body += (f"<h2>Firings by genus</h2><p class=small>counts/ (unit: {esc(d.cfg.counting.unit)}){more}</p>"
                 + table(["Genus", "Count", ""], rows, numeric={1}))
        return page(f"Latent {z}", body)

    # ----------------------------------------------------------------- summary

    def summary_page(self) -> str:
        d, m = self.data, self.data.manifest
        stages = m.get("stages", {})
        rows = [[esc(n), num(s.get("rows")), num(s.get("wall_s")), num(s.get("rejected"))] for n, s in stages.items()]
        final = (m.get("sae") or {}).get("metadata", {}).get("final") or {}
        cfg = d.cfg
        facts = [("status", m.get("status")), ("started", m.get("started")), ("finished", m.get("finished")),
                 ("wall time", f"{m.get('wall_s')} s"), ("source", f"{cfg.source.format}: {cfg.source.root}"),
                 ("backbone", f"{cfg.backbone.model} (layer {cfg.backbone.layer})"),
                 ("SAE", f"{cfg.sae.checkpoint} (τ = {cfg.sae.threshold})"), ("t_freq", cfg.contrast.t_freq),
                 ("describer", f"{cfg.annotate.llm.kind} {cfg.annotate.llm.model or ''}")]
        body = self.totals() + table(None, [[esc(k), esc(v)] for k, v in facts])
        body += "<h2>Stages</h2>" + table(["Stage", "Rows", "Wall s", "Rejected"], rows, numeric={1, 2, 3})
        if final:
            body += "<h2>SAE training (final)</h2>" + table(None, [[esc(k), num(v)] for k, v in final.items()])

        plots = []
        if len(d.firings):
            edges = np.unique(np.linspace(d.firings.min(), d.firings.max() + 1, 13).astype(int))
            hist, _ = np.histogram(d.firings, edges)
            plots.append(svg_bars("Firings per image", [(f"{a}–{b - 1}" if b - 1 > a else f"{a}", int(h))
                                                        for a, b, h in zip(edges[:-1], edges[1:], hist)]))
        else:
            plots.append(svg_bars("Firings per image", []))
        per_species = Counter(d.selected_of.count(s) for s in d.species)
        plots.append(svg_bars("Species by number of selected latents",
                              [(f"{k} latents", v) for k, v in sorted(per_species.items())]))
        plots.append(svg_bars("Annotations by status", [(s, self.all_statuses[s]) for s in ordered_statuses(self.all_statuses)]))
        plots.append(svg_bars("Annotations by confidence", [(f"{band} (from {start})", self.bands[band])
                                                            for band, start in CONFIDENCE_BANDS]))
        plots.append(svg_bars("Stage wall time", [(n, s["wall_s"]) for n, s in stages.items() if "wall_s" in s], " s"))
        body += '<h2>Plots</h2><div class="charts">' + "".join(plots) + "</div>"

        reasons = Counter({(r["stage"], r["reason"]): r["stage_count"] for r in
                           d.errors.group_by(["stage", "reason"]).aggregate([("stage", "count")]).to_pylist()})
        body += f"<h2>Errors ({d.errors.num_rows:,})</h2>" + table(
            ["Stage", "Reason", "Rows"], [[esc(st), esc(r), num(n)] for (st, r), n in reasons.most_common()], numeric={2})
        if d.errors.num_rows:
            shown = d.errors.slice(0, self.max_rows).to_pylist()
            body += (f"<p class=small>The first {len(shown)} of {d.errors.num_rows:,}:</p>" + table(
                ["Stage", "Reason", "Image", "Annotation", "Detail"],
                [[esc(e.get("stage")), esc(e.get("reason")), esc(e.get("image_id")), esc(e.get("annotation_id")),
                  esc((e.get("detail") or "")[:300])] for e in shown]))
        body += self.reviews_section()
        body += "<h2>Versions</h2>" + table(None, [[esc(k), esc(v)] for k, v in (m.get("versions") or {}).items()])
        body += f"<details><summary>Resolved config</summary><pre>{esc(json.dumps(m.get('config'), indent=2))}</pre></details>"
        return page("Build summary", body)

    def reviews_section(self) -> str:
        """The expert reviews that sampled this build: each one's scores, this build's row in bold."""
        if not self.data.reviews:
            return ""
        body = "<h2 id=reviews>Expert reviews</h2>"
        for rv in self.data.reviews:
            where = (f'<a href="{esc(Path(rv["scores"]).as_uri())}">{esc(rv["scores"])}</a>'
                     if rv["scores"].startswith("/") else esc(rv["scores"]))
            rows = [[(f"<b>{esc(b['label'])}</b> (this build)" if k == rv["this_build"] else esc(b["label"])),
                     f"{b['items_rated']}/{b['items']}", num(b["raw_mean"]), num(b["normalised_mean"]),
                     "–" if b["raw_ci"][0] is None else f"{b['raw_ci'][0]:.2f}–{b['raw_ci'][1]:.2f}", num(b["alpha"])]
                    for k, b in enumerate(rv["builds"])]
            body += (f"<p class=small>{rv['reviewers']} reviewers, scored {esc(rv['scored_at'])}; α (ordinal) over the "
                     f"review {num(rv['alpha'])}. Scores: {where}</p>"
                     + table(["Build", "Items rated", "Mean (raw)", "Mean (normalised)",
                              f"{rv['level']:.0%} interval (raw)", "α"], rows, numeric={1, 2, 3, 5}))
        return body


def write_report(output: str, storage_options: dict | None = None, log=print, *, max_species_per_page: int = 100,
                 max_images: int = 9, max_gallery: int = 12, max_rows: int = 50) -> str:
    """Write the report of the build in ``output`` to ``output``/report/ (replacing an old one);
    returns the index page's path. ``max_images``: example images per latent on a species page;
    ``max_gallery``: images per latent page; ``max_rows``: genera per latent page and errors listed."""
    path = Report(output, storage_options, log, max_species_per_page, max_images, max_gallery, max_rows).run()
    return output.rstrip("/") + "/report/index.html" if "://" in output else path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", required=True, help="the build's output folder (local path or fsspec URL)")
    parser.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options for it, as JSON")
    parser.add_argument("--max-species-per-page", type=int, default=100)
    parser.add_argument("--max-images", type=int, default=9, help="example images per latent on a species page")
    parser.add_argument("--max-gallery", type=int, default=12, help="strongest images on a latent page")
    parser.add_argument("--max-rows", type=int, default=50, help="genera on a latent page, errors on the summary")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.build, args.storage_options, max_species_per_page=args.max_species_per_page,
                           max_images=args.max_images, max_gallery=args.max_gallery, max_rows=args.max_rows))
    except Exception as exc:  # ConfigError: not a finished build (pipeline.finished), or its config unreadable
        return exit_code(exc, args.build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
