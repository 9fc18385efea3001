"""Sources: turn a dataset layout into an *index* — one row per image, metadata only, no pixels.

Index columns: image_id, species, genus, family, split, path, source_file, source_row.
``path`` points at an image file; for a Parquet manifest that carries the bytes, ``source_file``
and ``source_row`` say where to find them. Paths are within the source's fsspec filesystem.
The index is small (≈100 bytes/row) and is built on the driver; pixels are only ever read by
the decode tasks (:func:`read_image_bytes`)."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.contract import INDEX_SCHEMA
from pipeline.errors import Rejected

TAXA = ("species", "genus", "family")

BIOSCAN_METADATA = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"
BIOSCAN_IMAGES = "bioscan5m/images/cropped_256"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def _conform(columns: dict[str, pa.Array], n: int) -> pa.Table:
    """Fill absent index columns with nulls, turn empty strings into nulls, fix types."""
    arrays = []
    for field in INDEX_SCHEMA:
        col = columns.get(field.name)
        if col is None:
            col = pa.nulls(n, field.type)
        col = pc.cast(col, field.type)
        if field.type == pa.string():
            col = pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), pa.scalar(None, pa.string()), col)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=INDEX_SCHEMA)


def index_bioscan(cfg: SourceConfig, fs, root: str) -> pa.Table:
    meta = storage.join(root, BIOSCAN_METADATA)
    if not fs.exists(meta):
        raise ConfigError(f"source.root: no BIOSCAN-5M metadata at {meta}")
    with fs.open(meta, "rb") as f:
        table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in ("processid", "species", "genus", "family", "split", "chunk")},
            include_columns=["processid", "species", "genus", "family", "split", "chunk"],
            strings_can_be_null=False))
    if cfg.splits is not None:
        table = table.filter(pc.is_in(table["split"], pa.array(cfg.splits)))
    split, chunk, pid = (table[c].fill_null("") for c in ("split", "chunk", "processid"))
    folder = pc.binary_join_element_wise(storage.join(root, BIOSCAN_IMAGES), split, "/")
    # Chunk folders exist only for some splits: an empty chunk cell means no sub-folder.
    folder = pc.if_else(pc.equal(chunk, ""), folder,
                        pc.binary_join_element_wise(folder, chunk, "/"))
    path = pc.binary_join_element_wise(folder, pc.binary_join_element_wise(pid, ".jpg", ""), "/")
    return _conform({"image_id": pid, "species": table["species"], "genus": table["genus"],
                     "family": table["family"], "split": split, "path": path}, table.num_rows)


def index_imagefolder(cfg: SourceConfig, fs, root: str) -> pa.Table:
    if not fs.isdir(root):
        raise ConfigError(f"source.root: {root} is not a folder")
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    ids, species, genus, paths = [], [], [], []
    for p in files:
        rel = posixpath.relpath(p, root)
        if "/" not in rel:
            continue  # a file beside the class folders has no label folder: not part of the set
        label = rel.split("/", 1)[0]
        name = label.replace("_", " ").strip()
        ids.append(rel)
        paths.append(p)
        species.append(name if " " in name else None)  # a genus-only folder carries no species
        genus.append(name.split(" ", 1)[0] or None)
    return _conform({"image_id": pa.array(ids, pa.string()), "species": pa.array(species, pa.string()),
                     "genus": pa.array(genus, pa.string()), "path": pa.array(paths, pa.string())}, len(ids))


def index_parquet(cfg: SourceConfig, fs, root: str) -> pa.Table:
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else [root]
    if not files or not fs.exists(files[0]):
        raise ConfigError(f"source.root: no Parquet manifest at {root}")
    base = root if fs.isdir(root) else posixpath.dirname(root)
    parts = []
    for file in files:
        pf = pq.ParquetFile(fs.open(file, "rb"))
        names = set(pf.schema_arrow.names)
        for key in ("id_column", "bytes_column", "path_column"):
            col = getattr(cfg, key)
            if col is not None and col not in names and not (key == "path_column" and cfg.bytes_column):
                raise ConfigError(f"source.{key}: column {col!r} not in {file} (has {sorted(names)})")
        wanted = {"image_id": cfg.id_column, "species": cfg.species_column, "genus": cfg.genus_column,
                  "family": cfg.family_column}
        cols = {k: v for k, v in wanted.items() if v in names}
        if cfg.bytes_column is None:
            cols["path"] = cfg.path_column
        table = pf.read(columns=sorted(set(cols.values())))
        n = table.num_rows
        data = {k: table[v] for k, v in cols.items()}
        if "path" in data:
            rel = pc.cast(data["path"], pa.string())
            absolute = pc.starts_with(rel, "/")
            data["path"] = pc.if_else(absolute, rel, pc.binary_join_element_wise(base, rel, "/"))
        else:
            data["source_file"] = pa.array([file] * n, pa.string())
            data["source_row"] = pa.array(range(n), pa.int64())
        parts.append(_conform(data, n))
    return pa.concat_tables(parts)


INDEXERS = {"bioscan": index_bioscan, "imagefolder": index_imagefolder, "parquet": index_parquet}


def drop_duplicates(index: pa.Table) -> tuple[pa.Table, list[Rejected]]:
    """Keep the first row of every image_id; the others become errors (stage ``source``)."""
    n = index.num_rows
    firsts = (index.append_column("_row", pa.array(range(n), pa.int64()))
              .group_by("image_id", use_threads=False).aggregate([("_row", "min")])["_row_min"])
    keep = pc.is_in(pa.array(range(n), pa.int64()), firsts)
    dupes = index.filter(pc.invert(keep))
    rejected = [Rejected(stage="source", reason="duplicate_image_id", image_id=i,
                         detail="image_id already seen earlier in the source; this row was skipped")
                for i in dupes["image_id"].to_pylist()]
    missing_id = index.filter(pc.is_null(index["image_id"]))
    if missing_id.num_rows:
        raise ConfigError(f"source: {missing_id.num_rows} rows have no image_id")
    return index.filter(keep), rejected


def build_index(cfg: SourceConfig) -> tuple[pa.Table, list[Rejected]]:
    """The de-duplicated index of a source, and the rows rejected on the way."""
    fs, root = storage.filesystem(cfg.root, cfg.fsspec_options)
    index, rejected = drop_duplicates(INDEXERS[cfg.format](cfg, fs, root))
    if cfg.limit is not None:
        index = index.slice(0, cfg.limit)
    if index.num_rows == 0:
        raise ConfigError(f"source.root: no images found in {cfg.root} ({cfg.format})")
    return index, rejected


class ImageReader:
    """Reads the encoded bytes of index rows, from files or from rows of a Parquet manifest.
    Made inside each task (holds an open filesystem and a small row-group cache)."""

    def __init__(self, cfg: SourceConfig):
        self.fs, _ = storage.filesystem(cfg.root, cfg.fsspec_options)
        self.bytes_column = cfg.bytes_column
        self._files: dict[str, pq.ParquetFile] = {}
        self._groups: dict[tuple[str, int], pa.ChunkedArray] = {}

    def read(self, path: str | None, source_file: str | None = None, source_row: int | None = None) -> bytes:
        if path is not None:
            with self.fs.open(path, "rb") as f:
                return f.read()
        if source_file not in self._files:
            self._files[source_file] = pq.ParquetFile(self.fs.open(source_file, "rb"))
        pf = self._files[source_file]
        row = int(source_row)
        # Find the row group holding this row and read only that group's bytes column.
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row < n:
                if (source_file, rg) not in self._groups:
                    self._groups.clear()  # batches walk the manifest in order: keep one group
                    self._groups[(source_file, rg)] = pf.read_row_group(rg, columns=[self.bytes_column]).column(0)
                value = self._groups[(source_file, rg)][row].as_py()
                if value is None:
                    raise FileNotFoundError(f"{source_file} row {source_row}: no image bytes")
                return value
            row -= n
        raise FileNotFoundError(f"{source_file} has no row {source_row}")
