"""Sources: turn a dataset layout into an *index* — one row per image, metadata only, no pixels.

Index columns: image_id, species, genus, family, split, path, source_file, source_row.
``path`` points at an image file; for a Parquet manifest that carries the bytes, ``source_file``
and ``source_row`` say where to find them (the file and row); for a WebDataset, the shard and the
byte offset of the image member's header. Paths are within the source's fsspec filesystem.
The index is small (≈100 bytes/row) and is built on the driver; pixels are only ever read by
the decode tasks (:func:`read_image_bytes`)."""

from __future__ import annotations

import functools
import json
import posixpath
import re
import tarfile
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.contract import INDEX_SCHEMA
from pipeline.errors import ImageRejected, Rejected, error_detail

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


# --------------------------------------------------------------------------- WebDataset tar shards

SAMPLE_NAME = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # WebDataset's rule: key = up to the basename's first dot
MAX_TAXONOMY_MEMBER_BYTES = 1 << 20


def webdataset_shards(cfg: SourceConfig, fs, root: str) -> list[str]:
    """The shards a root names: a glob, a folder (every .tar under it) or one shard; listed, never opened."""
    if any(c in root for c in "*?["):
        shards = sorted(fs.glob(root))
    elif fs.isdir(root):
        shards = sorted(p for p in fs.find(root) if not posixpath.basename(p).startswith("."))
    else:
        shards = [root] if fs.exists(root) else []
    if not shards:
        raise ConfigError(f"source.root: no WebDataset shards at {cfg.root}")
    compressed = [p for p in shards if not p.endswith(".tar")]
    if compressed:
        raise ConfigError(f"source.root: {compressed[0]} is not a plain .tar shard (compressed shards cannot be "
                          "read member by member: decompress them, or name only the .tar files)")
    return shards


def sample_members(cfg: SourceConfig) -> tuple[tuple[str, ...], dict[str, str]]:
    """(image member extensions, taxonomy member extension → what it holds: "json" or a rank)."""
    taxonomy = {ext.lower(): rank for rank, ext in cfg.taxonomy_text_members.items()}
    if cfg.taxonomy_member:
        taxonomy[cfg.taxonomy_member.lower()] = "json"
    return tuple(e.lower() for e in cfg.image_members), taxonomy


def index_tar_shard(shard: str, cfg: SourceConfig) -> tuple[pa.Table, list[Rejected]]:
    """One shard's index rows (``source_file`` = the shard, ``source_row`` = the byte offset of the
    image member's header), read header by header: image bytes are skipped, only the small taxonomy
    members are read. Bad samples and a shard cut off mid-member are :class:`Rejected` (stage source)."""
    fs, _ = storage.filesystem(cfg.root, cfg.fsspec_options)
    image_exts, taxonomy_exts = sample_members(cfg)
    samples: dict[str, dict] = {}
    rejected: list[Rejected] = []
    reading = None
    size = fs.size(shard)
    with fs.open(shard, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for member in tar:
                match = SAMPLE_NAME.match(member.name)
                if not member.isfile() or not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                reading = key
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} needs bytes up to {member.offset_data + member.size}")
                sample = samples.setdefault(key, {})
                if ext in image_exts:
                    rank = image_exts.index(ext)
                    if rank < sample.get("image_rank", len(image_exts)):
                        sample["image_rank"], sample["offset"] = rank, member.offset
                elif ext in taxonomy_exts and member.size <= MAX_TAXONOMY_MEMBER_BYTES:
                    sample[taxonomy_exts[ext]] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            cut = reading or next(reversed(samples), None)  # the sample being read when the shard ended
            samples.pop(cut, None)
            rejected.append(Rejected(stage="source", reason="truncated_shard", image_id=cut or shard,
                                     detail=f"{shard} ({size} bytes) is cut off: {error_detail(exc)}; "
                                            f"{'sample ' + cut if cut else 'nothing'} read from it is lost there"))
    rows = []
    for key, sample in samples.items():
        try:
            rows.append({"image_id": key, **sample_taxonomy(key, sample, cfg), "source_file": shard,
                         "source_row": sample["offset"]})
        except ImageRejected as exc:
            rejected.append(Rejected(stage="source", reason=exc.reason, image_id=key, detail=f"{shard}: {exc.detail}"))
    table = pa.Table.from_pylist(rows, schema=pa.schema([f for f in INDEX_SCHEMA if f.name in (
        "image_id", "species", "genus", "family", "source_file", "source_row")]))
    return _conform({name: table[name] for name in table.column_names}, table.num_rows), rejected


def sample_taxonomy(key: str, sample: dict, cfg: SourceConfig) -> dict[str, str | None]:
    """A sample's species, genus and family from its members (ImageRejected when it cannot have any)."""
    if "offset" not in sample:
        raise ImageRejected("missing_image_member", f"sample {key} has no {'/'.join(cfg.image_members)} member")
    ranks: dict[str, str | None] = {}
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except ValueError as exc:
            raise ImageRejected("bad_taxonomy_member", f"sample {key}.{cfg.taxonomy_member}: {error_detail(exc)}") from None
        if not isinstance(record, dict):
            raise ImageRejected("bad_taxonomy_member", f"sample {key}.{cfg.taxonomy_member} is not a JSON object")
        keys = {"species": cfg.species_column, "genus": cfg.genus_column, "family": cfg.family_column}
        ranks = {rank: None if record.get(k) is None else str(record[k]) for rank, k in keys.items()}
    for rank in TAXA:
        if rank in sample and ranks.get(rank) is None:
            ranks[rank] = sample[rank].decode("utf-8", "replace").strip()
    wanted = ([cfg.taxonomy_member] if cfg.taxonomy_member else []) + list(cfg.taxonomy_text_members.values())
    if not ranks and wanted:
        raise ImageRejected("missing_taxonomy_member", f"sample {key} has none of its taxonomy members {wanted}")
    species = ranks.get("species")
    if not ranks.get("genus") and species and len(species.split()) >= 2:
        ranks["genus"] = species.split()[0]  # a binomial names its genus
    return {rank: ranks.get(rank) for rank in TAXA}


def index_webdataset(cfg: SourceConfig, fs, root: str, map_shards=map) -> tuple[pa.Table, list[Rejected]]:
    """Every shard indexed by ``index_tar_shard``, one call per shard through ``map_shards`` (the
    build passes Ray tasks): the driver lists shards, never members."""
    parts = list(map_shards(functools.partial(index_tar_shard, cfg=cfg), webdataset_shards(cfg, fs, root)))
    return pa.concat_tables([t for t, _ in parts]), [r for _, rejected in parts for r in rejected]


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


def build_index(cfg: SourceConfig, map_shards=map) -> tuple[pa.Table, list[Rejected]]:
    """The de-duplicated index of a source, and the rows rejected on the way. ``map_shards(fn, shards)``
    runs a per-shard indexer (WebDataset) over the shards: the builtin map here, Ray tasks in a build."""
    fs, root = storage.filesystem(cfg.root, cfg.fsspec_options)
    if cfg.format == "webdataset":
        index, rejected = index_webdataset(cfg, fs, root, map_shards)
    else:
        index, rejected = INDEXERS[cfg.format](cfg, fs, root), []
    index, duplicates = drop_duplicates(index)
    rejected += duplicates
    if cfg.limit is not None:
        index = index.slice(0, cfg.limit)
    if index.num_rows == 0:
        raise ConfigError(f"source.root: no images found in {cfg.root} ({cfg.format})")
    return index, rejected


class ImageReader:
    """Reads the encoded bytes of index rows: from files, from rows of a Parquet manifest, or from
    members of a tar shard. Made inside each task (holds an open filesystem, the last shard opened
    and a small row-group cache)."""

    def __init__(self, cfg: SourceConfig):
        self.fs, _ = storage.filesystem(cfg.root, cfg.fsspec_options)
        self.format = cfg.format
        self.bytes_column = cfg.bytes_column
        self._files: dict[str, pq.ParquetFile] = {}
        self._groups: dict[tuple[str, int], pa.ChunkedArray] = {}
        self._tars = threading.local()  # .last: (shard, its open TarFile)

    def read(self, path: str | None, source_file: str | None = None, source_row: int | None = None) -> bytes:
        if path is not None:
            with self.fs.open(path, "rb") as f:
                return f.read()
        if self.format == "webdataset":
            return self.read_member(source_file, int(source_row))
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
                if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
                    if value.get("bytes") is None and value.get("path"):
                        return self.read(storage.join(posixpath.dirname(source_file), value["path"]))
                    value = value.get("bytes")
                if value is None:
                    raise FileNotFoundError(f"{source_file} row {source_row}: no image bytes")
                return value
            row -= n
        raise FileNotFoundError(f"{source_file} has no row {source_row}")

    def read_member(self, shard: str, offset: int) -> bytes:
        """The data of the tar member whose header starts at ``offset``. Batches walk a shard in
        order, so each thread keeps its last shard open (the annotate stage reads from threads)."""
        opened = getattr(self._tars, "last", None)
        if opened is None or opened[0] != shard:
            if opened is not None:
                opened[1].fileobj.close()
            opened = self._tars.last = (shard, tarfile.open(fileobj=self.fs.open(shard, "rb"), mode="r:"))
        tar = opened[1]
        tar.fileobj.seek(offset)
        tar.offset = offset
        member = tarfile.TarInfo.fromtarfile(tar)  # (pax and GNU long-name headers included)
        return tar.extractfile(member).read()
