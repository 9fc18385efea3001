"""Reuse across builds: a build takes from earlier finished builds (``reuse: [OUT, ...]``, and the
snapshot an ``--update`` makes of the build it updates) whatever they computed from the same inputs.

- **Whole stages.** Encode, count, select and candidates: an earlier build whose stage marker holds
  this build's fingerprint for the stage (:mod:`pipeline.fingerprint`) gives its whole output
  folder (hard links on one local disk, else a copy; a server-side copy within one store).
- **Per item, where the stage's fingerprint differs.** Encode: ``activations/`` rows (and
  ``errors/`` rows of images that did not decode) of images whose **encode key** matches: the
  image's index row and bytes identity with everything encode reads (preprocessing, backbone,
  SAE, their files' content digests). Annotate, always per item: ``traits/`` rows whose **request
  key** matches: the unit's annotation_id (prompt version, species, latent, image ids), the config
  of the request (model, sampling, rendering, vocabulary; not the units' grouping), and each
  image's identity with its boxes. A ``failed`` answer is never reused.

The reused rows are written into this build's output as if this run had computed them, then the
stage resumes (:meth:`pipeline.graph.Build.pending`): only what no earlier build holds is computed.
Each build keeps its items' keys under ``_build/items/`` (images.parquet, requests.parquet) for the
builds that later reuse it. An earlier build is only read, never modified."""

from __future__ import annotations

import os
import posixpath
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.annotation.units import unit_evidence
from pipeline.config import ConfigError
from pipeline.contract import CONTRACT_VERSION, ERRORS, STATE, TABLES, TRAITS_SCHEMA
from pipeline.finished import FinishedBuild, NotFinished

ITEMS = f"{STATE}/items"  # this build's per-item keys: images.parquet, requests.parquet
PREVIOUS = f"{STATE}/previous"  # an update's snapshot of the build it updates (removed once it has finished)
WHOLE = ("encode", "count", "select", "candidates")  # stages taken whole on a matching fingerprint
DECODE = "decode"  # errors/ rows of images that did not decode (reused with encode)


class EarlierBuild:
    """A finished build offered for reuse; refused (ConfigError naming the path) when it is not
    one, or was written under another data-contract version."""

    def __init__(self, url: str, storage_options: dict | None, own_output: str | None = None, label: str | None = None):
        self.url, self.label = url, label or url  # label: how messages and the manifest name it
        if own_output is not None and url.rstrip("/") == own_output.rstrip("/"):
            raise ConfigError(f"reuse: {url} is this build's own output (to add new images to it, use --update)")
        try:
            self.build = FinishedBuild.open(url, storage_options)
        except NotFinished as exc:
            raise ConfigError(f"reuse: {url} cannot be reused: {str(exc).removeprefix('build: ')}") from None
        self.fs = self.build.fs
        manifest = self.build.manifest
        contract = manifest.get("contract")
        if contract != CONTRACT_VERSION:
            raise ConfigError(f"reuse: {url} was written under data-contract version {contract or '0 (before fingerprints)'}"
                              f", this version writes {CONTRACT_VERSION}: its rows may mean something else; "
                              "leave it out of reuse")
        self.build_id = manifest.get("build_id")
        self._keys: dict[str, pa.Table | None] = {}
        self._checked: set[str] = set()

    @property
    def name(self) -> dict:
        return {"path": self.label, "build_id": self.build_id}

    def fingerprint(self, stage: str) -> str | None:
        marker = self.build.path(STATE, "stages", f"{stage}.json")
        return storage.read_json(self.fs, marker).get("fingerprint") if self.fs.exists(marker) else None

    def keys(self, name: str) -> pa.Table | None:
        """Its per-item keys (``images`` or ``requests``), or None when it has none."""
        if name not in self._keys:
            path = self.build.path(ITEMS, f"{name}.parquet")
            self._keys[name] = storage.read_table(self.fs, path) if self.fs.exists(path) else None
        return self._keys[name]

    def tables(self, folder: str):
        """Its table ``folder`` file by file, once its schema is checked against the contract's."""
        self.check_folder(folder)
        yield from self.build.tables(folder)

    def check_folder(self, folder: str) -> None:
        """The contract's schema in its table ``folder`` (the first file's footer: a build writes one schema)."""
        if folder in TABLES and folder not in self._checked and (files := self.build.files(folder)):
            with self.fs.open(files[0], "rb") as f:
                self.check_schema(folder, files[0], pq.ParquetFile(f).schema_arrow)

    def check_schema(self, folder: str, path: str, schema: pa.Schema) -> None:
        """Every column the contract names, of the contract's type (extra columns are allowed)."""
        wrong = [f"{field.name} ({'missing' if field.name not in schema.names else schema.field(field.name).type})"
                 for field in TABLES[folder] if field.name not in schema.names
                 or schema.field(field.name).type != field.type]
        if wrong:
            raise ConfigError(f"reuse: {self.url}: {folder}/{posixpath.basename(path)} does not have the schema "
                              f"this version writes ({', '.join(wrong[:4])}); leave it out of reuse")
        self._checked.add(folder)


# --------------------------------------------------------------------------- whole stages

def copy_folder(src_fs, src: str, dst_fs, dst: str) -> None:
    """Every file under ``src`` to the same place under ``dst``: hard links on one local disk,
    a server-side copy within one store, else through this process. Files already there (a copy
    cut short by a killed run) are kept."""
    local = storage.is_local(src_fs) and storage.is_local(dst_fs)
    same_store = not local and type(src_fs) is type(dst_fs) and src_fs.storage_options == dst_fs.storage_options
    for path in sorted(src_fs.find(src)):
        target = storage.join(dst, posixpath.relpath(path, src))
        if dst_fs.exists(target):
            continue
        if local:
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            try:
                os.link(path, target)
            except OSError:  # another disk, or a file system without hard links
                shutil.copyfile(path, f"{target}.partial")
                os.replace(f"{target}.partial", target)
        elif same_store:
            dst_fs.copy(path, target)
        else:
            storage.publish(dst_fs, target, src_fs.cat_file(path))


def whole_match(earlier: list[EarlierBuild], stage: str, fingerprint: str) -> EarlierBuild | None:
    """The first earlier build whose ``stage`` has this fingerprint."""
    if stage not in WHOLE:
        return None
    return next((b for b in earlier if b.fingerprint(stage) == fingerprint), None)


def decode_errors(build: EarlierBuild, image_ids: pa.Array | None = None) -> pa.Table | None:
    """Its errors/ rows of images that did not decode (of ``image_ids`` only, when given)."""
    if not build.build.has(ERRORS):
        return None
    rows = build.build.read(ERRORS, where=lambda t: pc.equal(t["stage"], DECODE) if image_ids is None else
                            pc.and_(pc.equal(t["stage"], DECODE), pc.is_in(t["image_id"], value_set=image_ids)))
    return rows if rows.num_rows else None


# --------------------------------------------------------------------------- per item

def matching(wanted: pa.Table, key: str, earlier: pa.Table | None) -> pa.Array:
    """Mask over ``wanted``: rows whose ``key`` the earlier build's key table holds."""
    if earlier is None or not earlier.num_rows or not wanted.num_rows:
        return pa.array([False] * wanted.num_rows)
    return pc.is_in(wanted[key], value_set=earlier[key].combine_chunks())


def reused_rows(build: EarlierBuild, folder: str, id_column: str, ids: pa.Array, keep=None):
    """The earlier build's ``folder`` rows whose ``id_column`` is among ``ids`` (and ``keep(t)``
    holds), file by file."""
    for table in build.tables(folder):
        mask = pc.is_in(table[id_column], value_set=ids)
        if keep is not None:
            mask = pc.and_(mask, keep(table))
        rows = table.filter(mask)
        if rows.num_rows:
            yield rows


def answered(table: pa.Table) -> pa.Array:
    """Rows of traits/ that may be reused: those holding an answer — every status but failed (a failed
    request is asked again), and never a unit that was not asked (no model: background or low
    confidence; a later build may send it)."""
    return pc.and_(pc.invert(pc.fill_null(pc.equal(table["status"], "failed"), False)), pc.is_valid(table["model"]))


def restamped(answers: pa.Table, units: pa.Table) -> pa.Table:
    """Reused traits/ rows with this build's evidence and confidence for their units: an answer is
    reused for the same request, but what the evidence says of it is this build's to measure."""
    picked = units.take(pc.index_in(answers["annotation_id"], units["annotation_id"]))
    evidence = pa.array([unit_evidence(m) for m in picked["members"].to_pylist()], TRAITS_SCHEMA.field("evidence").type)
    for name, column in (("evidence", evidence), ("confidence", picked["confidence"])):
        answers = answers.set_column(answers.schema.get_field_index(name), name, column)
    return answers


def reuse_counts(ours: pa.Table, key: str, present: pa.Array, earlier: list[EarlierBuild],
                 name: str) -> tuple[list[dict], pa.Array]:
    """For a stage's manifest entry: per earlier build, how many of the rows now in the output
    (``present``: their ids, ``ours``' first column) it gave (the first build that holds a key
    gets it), and the ids of all the rows earlier builds gave."""
    left = ours.filter(pc.is_in(ours.column(0), value_set=present)) if len(present) else ours.slice(0, 0)
    out, given = [], []
    for build in earlier:
        keys = build.keys(name)
        if name == "requests" and keys is not None and build.build.has("traits"):
            ok = build.build.read("traits", columns=["annotation_id", "status", "model"], where=answered)["annotation_id"]
            keys = keys.filter(pc.is_in(keys["annotation_id"], value_set=ok.combine_chunks()))
        hit = matching(left, key, keys)
        if n := pc.sum(hit.cast(pa.int64())).as_py() or 0:
            out.append({**build.name, "rows": n})
            given.append(left.column(0).filter(hit).combine_chunks())
        left = left.filter(pc.invert(hit))
    return out, (pa.concat_arrays(given) if given else pa.array([], pa.string()))
