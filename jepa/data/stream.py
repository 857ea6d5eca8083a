"""Streaming WebDataset shards: ``pipe:`` commands and URLs (S3, GCS, HTTP), read front to back.

Local shards are indexed and read by offset (:mod:`jepa.data.shards`), which makes epochs exact
permutations. A shard behind a pipe or a URL can only be read in order, so a streaming DATA spec is
read the WebDataset way, deterministically:

* **Split without duplication.** In epoch ``e`` the shard list is permuted by ``(seed, e)``; with ``R``
  ranks and ``W`` DataLoader workers per rank, stream ``s = rank * W + worker`` reads shards
  ``s, s + R*W, s + 2*R*W, ...`` of that order. Every shard is read by exactly one worker per epoch,
  and a worker that finishes its shards starts its share of the next epoch.
* **Shuffling buffer.** Each stream keeps ``data.shuffle_buffer`` raw samples and emits a seeded
  random one of them as each new sample arrives (0: no shuffling beyond the shard order). Samples are
  decoded only when emitted.
* **Resumable position.** With ``W`` workers a DataLoader takes micro-batch ``k`` from worker
  ``k mod W``, so the number of samples each stream has emitted by step ``s`` is known. On resume every
  stream replays its (seeded) sequence and drops that many samples before decoding anything (and the
  workers' roles rotate so that the next micro-batch comes from the stream whose turn it is): it
  continues exactly where it stopped, re-seeing and skipping nothing, provided world size and
  ``num_workers`` are unchanged (the shard split depends on them). The replay reads the skipped bytes
  again; it decodes none of them.

``data.num_samples`` (the dataset size) is required: a stream cannot be counted without reading it.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Iterator

import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..components import Masker, Source
from ..errors import JepaError, SampleError
from .pipeline import Collate, _worker_init, derive_seed
from .shards import Record, parse_label, split_key
from .skips import Skipped

#: what WebDataset's ``gopen`` reads (plus s3://, recognised only to say how to read it)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "hf://", "ais://", "sftp://", "s3://")


def is_streaming(spec: str) -> bool:
    """Whether a DATA spec names shards that can only be streamed (a ``pipe:`` command or a URL)."""
    return any(part.strip().startswith(REMOTE_PREFIXES) for part in spec.split("::"))


def expand_urls(spec: str) -> list[str]:
    """Brace-expand every ``::``-joined part of a streaming spec (``pipe:`` commands included)."""
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise JepaError(f"data: '{spec}' names no shards")
    for url in urls:
        if url.startswith("s3://"):
            raise JepaError(f"data.train: s3:// shards are streamed through a command: use "
                            f"'pipe:aws s3 cp {url} -' (brace patterns work there too)")
    return urls


def _open(url: str):
    from webdataset.gopen import gopen  # handles pipe:, http(s) (curl), gs, local files

    return gopen(url, "rb")


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` samples of one shard, read in order (WebDataset's grouping rule)."""
    stream = _open(url)
    try:
        key, sample = None, {}
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if not ext or k.rsplit("/", 1)[-1].startswith("."):
                    continue
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tf.extractfile(info).read()
        if sample:
            yield key, sample
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - a pipe closed early reports SIGPIPE; read errors surfaced above
            pass


def check_split(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every stream (rank x worker) needs at least one shard per epoch: else a one-line error."""
    workers = max(1, num_workers)
    if num_shards < world_size * workers:
        raise JepaError(f"data.train: {num_shards} streamed shard(s) cannot feed {world_size} rank(s) x "
                        f"{workers} worker(s) without duplication; use more shards or fewer data.num_workers")


class StreamingPretrainDataset(IterableDataset):
    """Decoded, masked samples from streamed shards, split across ranks and workers (module docstring)."""

    def __init__(self, urls: list[str], source: Source, grid: tuple[int, ...], masker: Masker, seed: int,
                 rank: int, world_size: int, num_workers: int, micro_batch: int, start_micro: int,
                 shuffle_buffer: int):
        self.urls, self.source, self.grid, self.masker, self.seed = urls, source, tuple(grid), masker, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.micro, self.start_micro, self.buffer = micro_batch, start_micro, shuffle_buffer
        check_split(len(urls), world_size, num_workers)

    def stream_index(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def emitted_before_start(self, worker: int) -> int:
        """Samples this worker's stream emitted before the resumed step (micro-batch k came from worker k mod W)."""
        k = self.start_micro
        return (k // self.workers + (1 if worker < k % self.workers else 0)) * self.micro

    def raw_stream(self, worker: int) -> Iterator[tuple[str, str, dict[str, bytes] | str]]:
        """``(shard, key, sample)`` of one stream, endless, shuffled through the buffer (not decoded).

        A shard that cannot be read (a failed command, a truncated download) yields one
        ``(shard, shard, "error text")`` item, which becomes a skipped sample; a pass over all of this
        stream's shards that yields no sample at all is an error (it would otherwise spin forever)."""
        s, total = self.stream_index(worker), self.world_size * self.workers
        rng = random.Random(derive_seed(self.seed, "stream-shuffle", s))
        buf: list = []
        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(derive_seed(self.seed, "stream-shards", epoch)).shuffle(order)
            read, last_error = 0, ""
            for url in order[s::total]:
                try:
                    for key, sample in iter_shard(url):
                        read += 1
                        item = (url, key, sample)
                        if self.buffer <= 1:
                            yield item
                            continue
                        if len(buf) < self.buffer:
                            buf.append(item)
                            continue
                        j = rng.randrange(len(buf))
                        buf[j], item = item, buf[j]
                        yield item
                except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                    last_error = f"{type(e).__name__}: {e}"
                    yield url, url, last_error
            if read == 0:
                raise JepaError(f"data.train: no sample could be read from the {len(order[s::total])} streamed "
                                f"shard(s) of stream {s} (last error: {last_error or 'no samples'})")
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader takes its j-th batch from its worker j mod W. Resumed at micro-batch k, that batch
        # is the job's micro-batch k + j, which stream (k + j) mod W produced: rotate the roles to match.
        worker = ((info.id if info is not None else 0) + self.start_micro) % self.workers
        s, total = self.stream_index(worker), self.world_size * self.workers
        skip = self.emitted_before_start(worker)
        for n, (url, key, raw) in enumerate(self.raw_stream(worker)):
            if n < skip:
                continue  # emitted before the checkpoint: replayed, never decoded
            position = n * total + s  # unique across the job
            if isinstance(raw, str):  # a shard that could not be read
                yield Skipped("unreadable_shard", key, url, raw)
                continue
            try:
                x = self.source.decode(raw, random.Random(derive_seed(self.seed, "stream-view", s, n)), train=True)
            except SampleError as e:
                yield Skipped(e.reason, key, url, e.detail)
                continue
            except Exception as e:  # noqa: BLE001 - one odd sample must not end the run
                yield Skipped("decode_error", key, url, f"{type(e).__name__}: {e}")
                continue
            mask = self.masker(self.grid, random.Random(derive_seed(self.seed, "stream-mask", s, n)))
            yield x, mask, parse_label(raw, Record(key, {})), position


def build_stream_loader(dataset: StreamingPretrainDataset, num_workers: int, mode: str,
                        pin_memory: bool = False) -> DataLoader:
    """Micro-batches of ``dataset.micro`` samples; a batch's skipped samples count toward it, as with
    local shards (the step sees a smaller batch rather than waiting for replacements)."""
    return DataLoader(dataset, batch_size=dataset.micro, num_workers=num_workers, collate_fn=Collate(mode),
                      pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
