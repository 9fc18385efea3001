"""``sae-traits review score``: the paper's Table 1 for a user's own builds.

Every reviewer's current rating of every item (:mod:`pipeline.review.folder`; an item only flagged
has no rating and counts for the flags alone), joined to the key, gives per build:

- the raw mean: the mean of its items' ratings, over every reviewer;
- the annotator-normalised mean, as the paper reports it: each rating divided by that reviewer's
  mean over all the items they rated (every build's), times the grand mean (the mean of all
  ratings), so a harsh and a lenient reviewer weigh alike;
- percentile bootstrap intervals of both (``level``): the build's items are resampled with
  replacement, each with all its ratings (the items, not the ratings, are the sample); the
  reviewers' means are those of the whole review;
- Krippendorff's alpha, ordinal, over the 1-5 scale (the ``krippendorff`` package), of the build's
  items and of the whole review: agreement between reviewers, 1 perfect, 0 chance;
- how many (reviewer, item) judgements carry each flag;
- per confidence band of the items (:data:`pipeline.evidence.CONFIDENCE_BANDS`, from the key): the
  items, their mean rating, the share of ratings of 4 or 5 and the background and hallucination
  flags — how well the build's confidence is calibrated (``review sample --by-confidence`` draws
  every band).

Written to REVIEW/scores/ as scores.md (the table, the reviewers, the plot), scores.json and
scores.svg (the means with their intervals), and printed. Unless ``link_builds`` is false, each
build sampled gets a pointer (:mod:`pipeline.review.pointers`) that its report shows."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import krippendorff
import numpy as np

from pipeline import storage
from pipeline.config import fsspec_options
from pipeline.evidence import CONFIDENCE_BANDS, confidence_band
from pipeline.console import PREFIX, markdown_table
from pipeline.finished import FinishedBuild
from pipeline.review.config import FLAG_LABELS, FLAGS, RATINGS, ReviewScoreConfig
from pipeline.review.folder import SCORES_DIR, Rating, ReviewFolder
from pipeline.review.pointers import write_pointer

BOOTSTRAP_CHUNK = 1000  # resamples drawn at once (bounds memory for large review sets)


def reviewer_means(ratings: dict[str, dict[str, Rating]]) -> dict[str, float]:
    """Each reviewer's mean rating over every item they rated."""
    means = {}
    for reviewer, by_item in ratings.items():
        values = [r.rating for r in by_item.values() if r.rating is not None]
        if values:
            means[reviewer] = float(np.mean(values))
    return means


def normalised_ratings(ratings: dict[str, dict[str, Rating]]) -> dict[tuple[str, str], tuple[int, float]]:
    """(reviewer, item) → (rating, rating / the reviewer's mean × the grand mean), rated items only."""
    means = reviewer_means(ratings)
    values = [r.rating for by_item in ratings.values() for r in by_item.values() if r.rating is not None]
    grand = float(np.mean(values)) if values else float("nan")
    return {(reviewer, item): (r.rating, r.rating / means[reviewer] * grand)
            for reviewer, by_item in ratings.items() for item, r in by_item.items() if r.rating is not None}


def bootstrap_interval(per_item: list[list[float]], n_boot: int, level: float,
                       rng: np.random.Generator) -> tuple[float, float] | tuple[None, None]:
    """Percentile interval of the mean rating when the items (each with all its ratings) are
    resampled with replacement ``n_boot`` times."""
    per_item = [v for v in per_item if len(v)]
    if not per_item:
        return None, None
    sums = np.array([sum(v) for v in per_item], float)
    counts = np.array([len(v) for v in per_item], float)
    means = []
    for start in range(0, n_boot, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, len(per_item), size=(min(BOOTSTRAP_CHUNK, n_boot - start), len(per_item)))
        means.append(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ordinal_alpha(ratings: dict[str, dict[str, Rating]], items: list[str]) -> float | None:
    """Krippendorff's alpha (ordinal, scale 1-5) of the reviewers over ``items``; None when no item
    has two ratings, or when the ratings do not vary at all (alpha is undefined)."""
    reviewers = sorted(ratings)
    data = np.array([[ratings[r][i].rating if i in ratings[r] and ratings[r][i].rating is not None else np.nan
                      for i in items] for r in reviewers], float).reshape(len(reviewers), len(items))
    if not len(items) or not ((~np.isnan(data)).sum(axis=0) >= 2).any():
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal", value_domain=list(RATINGS))
    return float(alpha) if np.isfinite(alpha) else None


def score_review(ratings: dict[str, dict[str, Rating]], key: dict, n_boot: int, level: float, seed: int) -> dict:
    """The scores of a review: per build (in the key's order) and overall."""
    normalised = normalised_ratings(ratings)
    items_of = [[i for i, k in key["items"].items() if k["build"] == b] for b in range(len(key["builds"]))]
    rows = []
    for b, (build, items) in enumerate(zip(key["builds"], items_of)):
        raw = [[normalised[r, i][0] for r in ratings if (r, i) in normalised] for i in items]
        norm = [[normalised[r, i][1] for r in ratings if (r, i) in normalised] for i in items]
        values = [v for vs in raw for v in vs]
        # the same resamples for both (one seed per build): the two intervals differ by the normalisation only
        raw_ci = bootstrap_interval(raw, n_boot, level, np.random.default_rng([seed, b]))
        norm_ci = bootstrap_interval(norm, n_boot, level, np.random.default_rng([seed, b]))
        rows.append({
            "label": build["label"], "build": build["build"], "items": len(items),
            "items_rated": sum(bool(vs) for vs in raw), "ratings": len(values),
            "raw_mean": float(np.mean(values)) if values else None, "raw_ci": list(raw_ci),
            "normalised_mean": float(np.mean([v for vs in norm for v in vs])) if values else None,
            "normalised_ci": list(norm_ci), "alpha": ordinal_alpha(ratings, items),
            "flags": {f: sum(f in ratings[r][i].flags for r in ratings for i in items if i in ratings[r]) for f in FLAGS},
        })
    means = reviewer_means(ratings)
    all_values = [v for v, _ in normalised.values()]
    return {"builds": rows, "bands": band_rows(ratings, key), "level": level, "bootstrap": n_boot, "seed": seed,
            "grand_mean": float(np.mean(all_values)) if all_values else None,
            "alpha": ordinal_alpha(ratings, list(key["items"])),
            "reviewers": [{"reviewer": r, "items_rated": sum(x.rating is not None for x in ratings[r].values()),
                           "items_flagged": sum(bool(x.flags) for x in ratings[r].values()), "mean": means.get(r)}
                          for r in sorted(ratings)],
            "items": len(key["items"])}


def band_rows(ratings: dict[str, dict[str, Rating]], key: dict) -> list[dict]:
    """Per build and confidence band (items with a confidence in the key only): items rated, mean
    rating, share of ratings 4-5, and the judgements flagged background or hallucinated."""
    out = []
    for b, build in enumerate(key["builds"]):
        for band, _ in reversed(CONFIDENCE_BANDS):
            items = [i for i, k in key["items"].items() if k["build"] == b and confidence_band(k.get("confidence")) == band]
            if not items:
                continue
            judged = [ratings[r][i] for r in ratings for i in items if i in ratings[r]]
            values = [j.rating for j in judged if j.rating is not None]
            out.append({"label": build["label"], "band": band, "items": len(items),
                        "items_rated": sum(any(i in ratings[r] and ratings[r][i].rating is not None for r in ratings)
                                           for i in items),
                        "mean": float(np.mean(values)) if values else None,
                        "rated_4_or_5": float(np.mean([v >= 4 for v in values])) if values else None,
                        "flags": {f: sum(f in j.flags for j in judged) for f in FLAGS}})
    return out


# --------------------------------------------------------------------------- writing it out

def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def interval(ci) -> str:
    return "–" if ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table_rows(scores: dict) -> tuple[list[str], list[list[str]]]:
    pct = f"{scores['level']:.0%} CI"
    header = ["Build", "Images/prompt", "Tokens/annotation", "Items", "Ratings", "Mean (raw)", pct, "Mean (normalised)",
              pct, "α (ordinal)", *(FLAG_LABELS[f].capitalize() for f in FLAGS)]
    rows = [[r["label"], str(r.get("images_per_prompt") or "–"), fmt(r.get("tokens_per_annotation"), 1),
             f"{r['items_rated']}/{r['items']}", str(r["ratings"]), fmt(r["raw_mean"]), interval(r["raw_ci"]),
             fmt(r["normalised_mean"]), interval(r["normalised_ci"]), fmt(r["alpha"], 3),
             *(str(r["flags"][f]) for f in FLAGS)] for r in scores["builds"]]
    return header, rows


def scores_markdown(scores: dict, review: str) -> str:
    header, rows = table_rows(scores)
    reviewers = markdown_table(["Reviewer", "Items rated", "Items flagged", "Mean rating"],
                               [[r["reviewer"], str(r["items_rated"]), str(r["items_flagged"]), fmt(r["mean"])]
                                for r in scores["reviewers"]])
    return (f"# Expert review: {review}\n\n"
            f"{len(scores['reviewers'])} reviewers, {scores['items']} items; ratings 1 (wrong) to 5 (accurate and "
            f"specific). Normalised: each rating divided by its reviewer's mean over every item they rated, times "
            f"the grand mean ({fmt(scores['grand_mean'])}). Images/prompt: the build's annotate.images_per_prompt; "
            f"tokens/annotation: its mean prompt + completion tokens over the answers that did not fail. Intervals: percentile bootstrap over the build's items "
            f"({scores['bootstrap']} resamples, seed {scores['seed']}). α: Krippendorff's alpha, ordinal "
            f"(whole review: {fmt(scores['alpha'], 3)}). Flags: (reviewer, item) judgements with the flag.\n\n"
            f"{markdown_table(header, rows)}\n\n{bands_markdown(scores)}## Reviewers\n\n{reviewers}\n\n"
            f"![Mean ratings](scores.svg)\n")


def bands_markdown(scores: dict) -> str:
    """The accuracy by confidence band, when the items had confidences (else nothing)."""
    if not scores.get("bands"):
        return ""
    bands = ", ".join(f"{name} from {start}" for name, start in CONFIDENCE_BANDS)
    rows = [[r["label"], r["band"], f"{r['items_rated']}/{r['items']}", fmt(r["mean"]),
             "–" if r["rated_4_or_5"] is None else f"{r['rated_4_or_5']:.0%}",
             *(str(r["flags"][f]) for f in FLAGS)] for r in scores["bands"]]
    return ("## By confidence\n\nThe builds' own confidence of each item (bands: " + bands + "): a calibrated "
            "confidence rates higher and is flagged less in higher bands.\n\n"
            + markdown_table(["Build", "Band", "Items rated", "Mean (raw)", "Rated 4-5",
                              *(FLAG_LABELS[f].capitalize() for f in FLAGS)], rows) + "\n\n")


def scores_svg(scores: dict) -> str:
    """Each build's raw and normalised mean with its interval, on the 1-5 scale."""
    label_w, plot_w, row_h, top = 180, 420, 34, 30
    rows = scores["builds"]
    height = top + row_h * len(rows) + 30

    def x(v):
        return label_w + (v - 1) / 4 * plot_w
    parts = [f'<text x="{label_w}" y="14" fill="#2f6fb3">● raw</text>',
             f'<text x="{label_w + 70}" y="14" fill="#d0702a">◆ normalised</text>']
    for v in RATINGS:
        parts.append(f'<line x1="{x(v):.1f}" y1="{top - 6}" x2="{x(v):.1f}" y2="{height - 26}" stroke="#ddd"/>'
                     f'<text x="{x(v):.1f}" y="{height - 10}" text-anchor="middle">{v}</text>')
    for k, r in enumerate(rows):
        y = top + k * row_h + row_h / 2
        parts.append(f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end">{html.escape(r["label"])}</text>')
        for mean, ci, dy, colour, mark in ((r["raw_mean"], r["raw_ci"], -5, "#2f6fb3", "circle"),
                                           (r["normalised_mean"], r["normalised_ci"], 5, "#d0702a", "diamond")):
            if mean is None:
                continue
            yy = y + dy
            if ci[0] is not None:
                parts.append(f'<line x1="{x(ci[0]):.1f}" y1="{yy:.1f}" x2="{x(ci[1]):.1f}" y2="{yy:.1f}" '
                             f'stroke="{colour}" stroke-width="2"/>')
            cx = x(mean)
            parts.append(f'<circle cx="{cx:.1f}" cy="{yy:.1f}" r="4" fill="{colour}"/>' if mark == "circle" else
                         f'<path d="M{cx:.1f} {yy - 5:.1f}l5 5-5 5-5-5z" fill="{colour}"/>')
    width = label_w + plot_w + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="system-ui, sans-serif" font-size="12">{"".join(parts)}</svg>\n')


def link_builds(cfg: ReviewScoreConfig, folder: ReviewFolder, key: dict, scores: dict, log) -> list[str]:
    """Write each sampled build's pointer to these scores; a build that cannot be reached is said, not fatal."""
    root = folder.root.resolve()
    review, review_id = str(root), storage.stable_digest([str(root)], 12)
    written = []
    for k, build in enumerate(key["builds"]):
        record = {"review": review, "scores": str(root / SCORES_DIR / "scores.md"), "review_id": review_id,
                  "scored_at": scores["scored_at"], "this_build": k, "reviewers": len(scores["reviewers"]),
                  "items": scores["items"], "level": scores["level"], "alpha": scores["alpha"],
                  "builds": scores["builds"]}
        try:
            fs, build_root = storage.filesystem(build["build"], fsspec_options(cfg.storage, build["build"]))
            written.append(write_pointer(fs, build_root, review_id, record))
        except Exception as exc:  # the build moved or is read-only: the scores stand without the link
            log(f"{PREFIX} review: could not link the scores into {build['build']}: {type(exc).__name__}: {exc}")
    return written


def build_costs(path: str, storage_section) -> dict:
    """The paper's cost columns of a build: its images per prompt and its mean tokens per annotation
    (prompt + completion, over the answers it holds that did not fail); None where the build cannot
    be read or recorded no tokens (templated descriptions)."""
    try:
        build = FinishedBuild.open(path, fsspec_options(storage_section, path))
        traits = build.read("traits", columns=["status", "prompt_tokens", "completion_tokens"])
        per_prompt = build.resolved.get("annotate", {}).get("images_per_prompt")
    except Exception:  # a build that moved: its ratings still score
        return {"images_per_prompt": None, "tokens_per_annotation": None}
    answered = [(p or 0) + (c or 0) for s, p, c in zip(*(traits[k].to_pylist() for k in
                                                          ("status", "prompt_tokens", "completion_tokens")))
                if s != "failed"]
    tokens = float(np.mean(answered)) if answered and any(answered) else None
    return {"images_per_prompt": per_prompt, "tokens_per_annotation": tokens}


def score(cfg: ReviewScoreConfig, log=print) -> dict:
    """Score the review ``cfg`` names, write scores/ (and the builds' pointers); returns the scores."""
    folder = ReviewFolder(cfg.review)
    key = folder.key()
    scores = score_review(folder.all_ratings(), key, cfg.bootstrap, cfg.level, cfg.seed)
    for row in scores["builds"]:
        row.update(build_costs(row["build"], cfg.storage))
    scores["scored_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(folder.scores_dir)
    out.mkdir(exist_ok=True)
    (out / "scores.json").write_text(json.dumps(scores, indent=1, ensure_ascii=False))
    (out / "scores.md").write_text(scores_markdown(scores, cfg.review))
    (out / "scores.svg").write_text(scores_svg(scores))
    log(f"{PREFIX} review: {len(scores['reviewers'])} reviewers, α (ordinal) {fmt(scores['alpha'], 3)} → "
        f"{out / 'scores.md'}")
    if cfg.link_builds:
        scores["linked"] = link_builds(cfg, folder, key, scores, log)
    return scores
