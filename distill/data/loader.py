"""Streaming WebDataset loader with a fixed number of batches per epoch on every rank.

Readers: each rank has ``max(1, num_workers)`` readers (DataLoader workers); reader ``(rank, w)``
reads the shards ``split_by_worker(split_by_node(order, rank, world_size), w, W)`` where ``order`` is
the shard list shuffled with ``(seed, epoch)`` (identical on every rank, so splits are disjoint and
together complete). Samples pass a shuffle buffer seeded by ``(seed, epoch, rank, w)``, are encoded
(``encode.SampleEncoder``; unusable samples are counted in ``stats`` and skipped, never fatal) and
batched inside the reader.

Equal batch counts. Every rank yields exactly ``steps_per_epoch = samples_per_epoch // batch_size``
batches (``samples_per_epoch`` per rank defaults to manifest total // world_size). Reader ``w`` yields
``steps // W`` batches, plus one if ``w < steps % W``; the DataLoader takes them round robin, so
global batch ``i`` comes from reader ``i % W``. To fill its quota a reader cycles over its shards
(reshuffled each pass) in the default mode, or draws shards with replacement (``resampled``). So
ranks never disagree on batch counts, even when skips or uneven shards leave some readers short;
the price in the default mode is that a few samples repeat or are left out in an epoch when shards
do not divide evenly.

Resume. ``state_dict()`` is ``{"epoch", "batches", "reader_pos", ...}``: batches handed out in the
current epoch and, per reader, how many raw samples had left its shuffle buffer when its last
handed-out batch was formed. ``load_state_dict`` makes the next ``iter()`` re-create the same epoch
stream; each reader replays its shard reads and shuffle buffer (the buffer's choices depend on
sample counts only, not content) and drops its first ``reader_pos`` raw samples without decoding
them, so resuming costs tar reads, not image decoding, and continues exactly the uninterrupted
stream. (A state without ``reader_pos`` falls back to re-encoding and dropping whole batches.)
Finishing an epoch advances the state to ``{"epoch": e + 1, "batches": 0}``. Resuming needs the
same shards, seed, world size, batch size and ``num_workers``.
"""

from __future__ import annotations

import logging
import random
import tarfile
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import collate
from distill.config import DataConfig, DataConfigError
from .encode import SampleEncoder, SkipSample, TemplateError
from .shardlist import ShardInfo, resolve_shards, split_by_node, split_by_worker
from .stats import TRUNCATED, SkipStats

log = logging.getLogger(__name__)

SKIPS_KEY = "_data_skips"  # per-batch skip-count delta shipped from readers, removed before yield
POS_KEY = "_data_pos"  # (reader, raw samples emitted by its shuffle buffer), removed before yield
KEYS_KEY = "sample_keys"  # only with build_loader(..., with_keys=True)


def _quota(total: int, worker: int, workers: int) -> int:
    return total // workers + (1 if worker < total % workers else 0)


def _read_shards(shards: list[ShardInfo], stats: SkipStats) -> Iterator[dict]:
    """Raw WebDataset samples from tar files, in order; read errors are counted, not raised.

    A shard that yields fewer samples than its manifest says (e.g. cut at a tar block boundary,
    which the tar reader takes for a clean end) is counted as ``shard_short``."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        stats.add("shard_read_error", f"{type(exn).__name__}: {exn}")
        return True  # continue with the next sample / shard

    for shard in shards:
        n = 0
        for raw in wds.tarfile_to_samples(handler=handler)(iter([{"url": shard.path}])):
            n += 1
            yield raw
        if shard.num_samples is not None and n < shard.num_samples:
            stats.add("shard_short", f"{shard.path}: read {n} of {shard.num_samples} samples (manifest)",
                      n=shard.num_samples - n)


def probe_shard(path: str) -> str | None:
    """Why the shard at ``path`` cannot be read (cheap: open + first tar header), or None if it can."""
    try:
        with open(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
    except OSError as e:
        return f"cannot open ({type(e).__name__}: {e.strerror or e})"
    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        return None if block else "empty file"
    if len(block) < tarfile.BLOCKSIZE:
        return f"{len(block)} bytes: shorter than one tar block" if block else "empty file"
    if block == bytes(tarfile.BLOCKSIZE):
        return "no tar member (the file starts with an end-of-archive block)"
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"not a tar file ({e})"
    return None


def check_max_length(encoder: SampleEncoder, max_length: int) -> None:
    """Raise ``DataConfigError`` when ``data.max_length`` cannot hold one image sample (the processor's
    image tokens plus the chat template and one answer token), which would otherwise skip every
    image sample as ``image_truncated`` only after the models have loaded."""
    try:
        n_image, need, (w, h) = encoder.image_length_floor()
    except TemplateError:
        raise
    except Exception as e:  # the probe is best effort: a processor that cannot take it is checked per sample
        log.debug("data: max_length probe skipped (%s: %s)", type(e).__name__, e)
        return
    if max_length < need:
        raise DataConfigError(
            f"data.max_length={max_length} cannot hold one image sample: the processor turns a {w}x{h} image into "
            f"{n_image} image tokens, and with the chat template and one answer token the shortest image sample is "
            f"{need} tokens, so every image sample would be skipped (image_truncated). Set data.max_length to at "
            f"least {need}, better {need} plus the longest question and answer you train on (e.g. {need + 512})."
        )


def _shuffle(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: keep ``size`` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class _Counted:
    """Iterator wrapper counting the items it passed on."""

    def __init__(self, it: Iterator) -> None:
        self.it, self.n = it, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item


class EpochStream(IterableDataset):
    """One epoch of batches for one rank (the dataset the DataLoader workers iterate)."""

    def __init__(self, shards: list[ShardInfo], encoder: SampleEncoder, cfg: DataConfig, *, rank: int,
                 world_size: int, seed: int, epoch: int, steps: int, skip_batches: int = 0,
                 reader_pos: list[int] | None = None, with_keys: bool = False) -> None:
        super().__init__()
        self.shards, self.encoder, self.cfg = shards, encoder, cfg
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.steps, self.skip_batches, self.with_keys = steps, skip_batches, with_keys
        self.reader_pos = reader_pos

    def reader_shards(self, worker: int, workers: int) -> list[ShardInfo]:
        """The shards of reader ``(rank, worker)`` this epoch (non-resampled mode)."""
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        return split_by_worker(split_by_node(order, self.rank, self.world_size), worker, workers)

    def _passes(self, worker: int, workers: int, stats: SkipStats) -> Iterator[Iterator[dict]]:
        """Raw-sample iterators, one per pass over this reader's shards (resampled: one endless pass).

        The shuffle buffer is flushed at the end of each pass, so within an epoch a reader emits each
        sample of its shards once before any repeats."""
        tag = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        if self.cfg.resampled:
            yield self._resampled(random.Random(f"{tag}/resample"), stats)
            return
        mine = self.reader_shards(worker, workers)
        rng = random.Random(f"{tag}/cycle")
        cycle = 0
        while True:
            if cycle:
                rng.shuffle(mine)
            counted = _Counted(_read_shards(mine, stats))
            yield counted
            if counted.n == 0:
                raise RuntimeError(
                    f"data: reader (rank {self.rank}, worker {worker}) read no sample from its shards {[s.path for s in mine]}"
                )
            cycle += 1

    def _resampled(self, rng: random.Random, stats: SkipStats) -> Iterator[dict]:
        paths = list(self.shards)
        empty_draws = 0
        while True:
            n = 0
            for raw in _read_shards([rng.choice(paths)], stats):
                n += 1
                yield raw
            empty_draws = 0 if n else empty_draws + 1
            if empty_draws > 10 * len(paths) + 10:
                raise RuntimeError(f"data: {empty_draws} consecutive shard draws gave no sample; shards: {[s.path for s in paths[:3]]}...")

    def _samples(self, worker: int, workers: int, stats: SkipStats, pos: dict, skip_raw: int = 0):
        """Encoded samples of one reader; ``pos["emitted"]`` counts raw samples taken from the shuffle
        buffer so far (the first ``skip_raw`` are dropped undecoded: resume)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/shuffle")
        limit = 10_000
        streak = 0
        for raw_pass in self._passes(worker, workers, stats):
            for raw in _shuffle(raw_pass, self.cfg.shuffle_buffer, rng):
                pos["emitted"] += 1
                if pos["emitted"] <= skip_raw:
                    continue
                try:
                    sample = self.encoder.encode(raw)
                except SkipSample as e:
                    stats.add(e.reason, e.detail)
                    streak += 1
                    if streak >= limit:
                        raise RuntimeError(f"data: {limit} consecutive samples were unusable; skip counts {stats.as_dict()}") from e
                    continue
                streak = 0
                if sample.truncated:
                    stats.add(TRUNCATED, f"{sample.key}: text cut at max_length {self.cfg.max_length}")
                yield sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = _quota(self.steps, worker, workers)
        done = _quota(self.skip_batches, worker, workers)  # batches of this reader already consumed
        fast = self.reader_pos is not None
        stats = SkipStats()
        pos = {"emitted": 0}
        samples = self._samples(worker, workers, stats, pos, self.reader_pos[worker] if fast else 0)
        bs = self.cfg.batch_size
        enc = self.encoder
        for b in range(quota):
            if fast and b < done:
                continue
            batch = [next(samples) for _ in range(bs)]
            if b < done:
                continue
            out = collate(batch, enc.pad_token_id, enc.image_token_id, enc.family)
            out[SKIPS_KEY] = stats.drain()
            out[POS_KEY] = (worker, pos["emitted"])
            if self.with_keys:
                out[KEYS_KEY] = [s.key for s in batch]
            yield out


class StreamingLoader:
    """Iterable of batches for one rank; ``len()`` = batches per epoch (same on every rank).

    ``stats`` (``SkipStats``) accumulates skip counts from all readers; ``state_dict`` /
    ``load_state_dict`` / ``set_epoch`` give a resumable data position (module docstring).
    """

    def __init__(self, cfg: DataConfig, processor: Any, *, rank: int, world_size: int, seed: int, epoch: int = 0,
                 with_keys: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataConfigError(f"build_loader: rank {rank} / world_size {world_size} invalid")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.shards = resolve_shards(cfg.shards)
        self.encoder = SampleEncoder(processor, cfg.max_length, cfg.drop_text_only)
        check_max_length(self.encoder, cfg.max_length)
        self.stats = SkipStats()
        self.with_keys = with_keys
        readers = self.readers = max(1, cfg.num_workers)
        self.epoch, self.batches, self.reader_pos = epoch, 0, [0] * readers
        self._resume_pos: list[int] | None = None
        if cfg.samples_per_epoch is not None:
            per_rank = cfg.samples_per_epoch
        elif cfg.resampled or any(s.num_samples is None for s in self.shards):
            raise DataConfigError(
                "data.samples_per_epoch is required "
                + ("in resampled mode" if cfg.resampled else "when shard sample counts are unknown (no manifest.json next to the shards)")
                + " (samples per epoch per rank)"
            )
        else:
            per_rank = sum(s.num_samples for s in self.shards) // world_size
        self.steps_per_epoch = per_rank // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise DataConfigError(
                f"data: {per_rank} samples per rank is less than one batch of {cfg.batch_size}; "
                "lower data.batch_size or add data"
            )
        if not cfg.resampled and len(self.shards) < world_size * readers:
            raise DataConfigError(
                f"data: {len(self.shards)} shard(s) cannot feed {world_size} rank(s) x {readers} reader(s) without "
                f"overlap; reshard with a smaller --shard-size, lower data.num_workers, or set data.resampled=true"
            )
        self._check_shards_readable()

    def _check_shards_readable(self) -> None:
        """Raise ``DataConfigError`` when no shard this rank reads in the current epoch can be opened (all
        of them in resampled mode), naming them and why; a few unreadable ones are only logged (the
        readers count them as ``shard_read_error``)."""
        if self.cfg.resampled:
            mine = list(self.shards)
        else:
            order = list(self.shards)
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)  # as EpochStream.reader_shards
            mine = split_by_node(order, self.rank, self.world_size)
        bad = [(s.path, why) for s in mine for why in [probe_shard(s.path)] if why is not None]
        if not bad:
            return
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        if len(bad) == len(mine):
            raise DataConfigError(
                f"data: rank {self.rank} cannot read any of its {len(mine)} shard(s) ({shown}); check the paths and "
                "permissions in data.shards, or rebuild the shards with `python -m data_prep` and check them with "
                "`python -m data_prep verify DIR`"
            )
        log.warning("data: rank %d: %d of its %d shard(s) are unreadable and will be counted as shard_read_error: %s",
                    self.rank, len(bad), len(mine), shown)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next ``iter()``."""
        self.epoch, self.batches, self.reader_pos = epoch, 0, [0] * self.readers
        self._resume_pos = None

    def state_dict(self) -> dict:
        """JSON-serialisable data position (module docstring)."""
        return {"epoch": self.epoch, "batches": self.batches, "reader_pos": list(self.reader_pos),
                "readers": self.readers, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for k in ("steps_per_epoch", "world_size", "seed", "readers"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"data resume: saved {k}={state[k]} but this run has {k}={getattr(self, k)}; the data position "
                    "cannot be restored exactly (use the same data config, seed and world size, or start the epoch fresh "
                    "with loader.set_epoch(epoch))"
                )
        if not 0 <= state["batches"] <= self.steps_per_epoch:
            raise ValueError(f"data resume: batches={state['batches']} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        pos = state.get("reader_pos")
        if pos is not None and len(pos) != self.readers:
            raise ValueError(f"data resume: reader_pos has {len(pos)} entries, expected {self.readers}")
        self.reader_pos = [int(p) for p in pos] if pos is not None else [0] * self.readers
        self._resume_pos = list(self.reader_pos) if pos is not None and self.batches else None

    def __iter__(self) -> Iterator[dict]:
        if self.batches >= self.steps_per_epoch:
            self.set_epoch(self.epoch + 1)
        if self.batches and self._resume_pos is None and any(self.reader_pos):
            self._resume_pos = list(self.reader_pos)  # re-iterating a partly consumed epoch: continue it
        stream = EpochStream(self.shards, self.encoder, self.cfg, rank=self.rank, world_size=self.world_size,
                             seed=self.seed, epoch=self.epoch, steps=self.steps_per_epoch,
                             skip_batches=self.batches, reader_pos=self._resume_pos if self.batches else None,
                             with_keys=self.with_keys)
        kw: dict = {}
        if self.cfg.num_workers > 0:
            kw = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False}
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, **kw)
        for batch in loader:
            self.stats.update(batch.pop(SKIPS_KEY))
            worker, emitted = batch.pop(POS_KEY)
            self.reader_pos[worker] = int(emitted)
            self.stats.yielded += int(batch["input_ids"].shape[0])
            self.batches += 1
            yield batch
        self.set_epoch(self.epoch + 1)


def build_loader(data_cfg: Any, processor: Any, *, rank: int, world_size: int, seed: int | None = None,
                 epoch: int = 0, with_keys: bool = False) -> StreamingLoader:
    """Streaming loader for one rank (docs/INTERFACES.md "Data").

    ``data_cfg``: ``DataConfig`` (or dict / object with its fields). ``seed`` overrides
    ``data_cfg.seed`` when given. ``with_keys`` adds ``batch["sample_keys"]`` (list of WebDataset keys;
    tests/debugging). Returns a ``StreamingLoader``: iterate for batches, ``.stats`` for skip counts.
    """
    cfg = DataConfig.coerce(data_cfg)
    return StreamingLoader(cfg, processor, rank=rank, world_size=world_size,
                           seed=cfg.seed if seed is None else seed, epoch=epoch, with_keys=with_keys)
