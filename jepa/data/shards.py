"""Finding and indexing stored samples: WebDataset tar shards and plain folders.

A DATA spec is a shard path, a brace pattern (``train-{000000..000009}.tar``), several of those joined
with ``::``, a folder holding ``.tar`` files, or a folder of images (class sub-folders, or flat and
unlabelled). Local shards are indexed once (tar headers only), so any sample can be read by offset:
that makes epochs exact seeded permutations and resuming exact.

Samples are grouped as WebDataset groups tar members: ``dir/key.ext`` -> key ``dir/key``, extension
``ext`` (everything after the first dot of the file name).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from ..errors import JepaError

#: file extensions a folder dataset treats as samples (sources decide which they can decode)
FOLDER_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif",
                     "wav", "flac", "ogg", "mp3", "npy"}


@dataclass(frozen=True)
class Member:
    path: str  # shard or file path
    offset: int  # byte offset of the data inside ``path`` (0 for plain files)
    size: int


@dataclass
class Record:
    key: str
    members: dict[str, Member]
    label: int = -1  # folder datasets know the label from the folder name


@dataclass
class Index:
    """Every sample of a DATA spec, in a stable order, plus what went wrong while indexing."""

    records: list[Record]
    classes: list[str] = field(default_factory=list)  # folder datasets: class names by label
    bad_shards: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def spread(self, n: int) -> Index:
        """At most ``n`` records, evenly spread over the index (deterministic)."""
        if len(self.records) <= n:
            return self
        step = len(self.records) / n
        return Index([self.records[int(i * step)] for i in range(n)], self.classes, self.bad_shards)


def split_key(name: str) -> tuple[str, str]:
    """``a/b/000012.seg.png`` -> (``a/b/000012``, ``seg.png``), WebDataset's grouping rule."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext if dot else "")


def expand_spec(spec: str) -> list[str]:
    """Expand a DATA spec into shard paths, or one folder path for an image folder."""
    from ..config.load import unexpanded_var

    out: list[str] = []
    for part in spec.split("::"):
        var = unexpanded_var(part)
        if var:
            raise JepaError(f"data: environment variable {var} is not set (in '{part}')")
        for item in braceexpand.braceexpand(part):
            if item.startswith("pipe:") or "://" in item:
                raise JepaError(f"data: streamed shards ('{item}') are read by `jepa pretrain` only; this command "
                                "needs local shards (random access): copy them locally")
            p = Path(item)
            if p.is_dir():
                tars = sorted(str(t) for t in p.iterdir() if t.name.endswith(".tar"))
                out.extend(tars if tars else [str(p)])
            elif p.is_file():
                out.append(str(p))
            else:
                raise JepaError(f"data: no such file or directory: {item}")
    return out


def index_shard(path: str) -> tuple[list[Record], str | None]:
    """The samples of one shard, and what was wrong with it (None when nothing).

    A shard cut short (a copy interrupted, a full disk) keeps the samples whose bytes are all there;
    one that cannot be opened at all raises.
    """
    records: dict[str, Record] = {}
    problem = None
    with tarfile.open(path, "r:") as tf:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if not ext or os.path.basename(key).startswith("."):
                    continue
                rec = records.get(key)
                if rec is None:
                    rec = records[key] = Record(key, {})
                rec.members[ext] = Member(path, info.offset_data, info.size)
        except (tarfile.TarError, OSError) as e:
            problem = f"damaged after {len(records)} samples ({e})"
        end = tf.offset  # where the next header would start: a whole tar has two zero blocks there
    size = os.path.getsize(path)
    if problem is None and size - end < 2 * tarfile.BLOCKSIZE:
        # tarfile reads a file cut inside a header or right after a member as a clean end of archive.
        problem = "truncated: no end-of-archive marker"
    whole = [r for r in records.values() if all(m.offset + m.size <= size for m in r.members.values())]
    if problem is not None and whole and whole[-1] is list(records.values())[-1]:
        # The members of a sample are contiguous: the last one read may have lost its later members
        # (its label, say) to the cut even though the ones it kept are whole.
        whole.pop()
    if len(whole) < len(records):
        problem = problem or f"truncated: {len(records) - len(whole)} samples cut off"
    return whole, problem


def index_folder(root: Path) -> Index:
    """Class-per-folder dataset (labels = sorted folder names) or a flat unlabelled folder."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups = [(i, d) for i, d in enumerate(subdirs)] if subdirs else [(-1, root)]
    records: list[Record] = []
    for label, folder in groups:
        by_key: dict[str, Record] = {}
        for f in sorted(folder.rglob("*")):
            if not f.is_file():
                continue
            key, ext = split_key(str(f.relative_to(root)))
            if ext.lower() not in FOLDER_EXTENSIONS:
                continue
            rec = by_key.setdefault(key, Record(key, {}, label))
            rec.members[ext.lower()] = Member(str(f), 0, f.stat().st_size)
        records.extend(by_key.values())
    return Index(records, [d.name for d in subdirs])


def build_index(spec: str) -> Index:
    """Index a DATA spec. Shards that cannot be opened are skipped and reported; none at all is an error."""
    paths = expand_spec(spec)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        index = index_folder(Path(paths[0]))
    else:
        index = Index([])
        for p in paths:
            try:
                records, problem = index_shard(p)
            except (tarfile.TarError, OSError) as e:
                index.bad_shards.append(f"{p}: cannot be opened ({e}); skipped")
                continue
            index.records.extend(records)
            if problem:
                index.bad_shards.append(f"{p}: {problem}; kept {len(records)} complete samples")
    if not index.records:
        why = f" ({'; '.join(index.bad_shards)})" if index.bad_shards else ""
        raise JepaError(f"data: no samples found in '{spec}'{why}")
    return index


def check_decodable(index: Index, extensions: tuple[str, ...], spec: str) -> None:
    """An error, before any training, when no sample has a member the source can decode."""
    if not extensions:
        return  # the source does not declare what it reads
    wanted = {e.lower() for e in extensions}
    if any(wanted & {ext.lower() for ext in r.members} for r in index.records):
        return
    found = sorted({ext for r in index.records[:1000] for ext in r.members})
    raise JepaError(f"data: none of the {len(index)} samples in '{spec}' has a member this source decodes "
                    f"({', '.join(sorted(wanted))}); found: {', '.join(found) or 'nothing'}")


class Reader:
    """Reads member bytes by offset. File handles are opened lazily, per process (safe across fork)."""

    def __init__(self):
        self._pid = -1
        self._files: dict[str, object] = {}

    def read(self, member: Member) -> bytes:
        if self._pid != os.getpid():
            self._pid, self._files = os.getpid(), {}
        f = self._files.get(member.path)
        if f is None:
            if len(self._files) > 64:
                for old in self._files.values():
                    old.close()
                self._files.clear()
            f = self._files[member.path] = open(member.path, "rb")  # noqa: SIM115
        f.seek(member.offset)
        return f.read(member.size)

    def sample(self, record: Record) -> dict[str, bytes]:
        return {ext: self.read(m) for ext, m in record.members.items()}


def parse_label(sample: dict[str, bytes], record: Record) -> int:
    raw = sample.get("cls")
    if raw is None:
        return record.label
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return -1
