"""Latents and text conditioning, encoded once and reused: memory and disk caches and the image prefetch pool.

With a latent cache every image goes through the VAE once; without one, the next batch's images are decoded
in threads while the current step trains. Text is cached per caption when the text encoders are frozen and
captions are fixed. On N processes each encodes its share of the images and captions and they swap the
results, so nothing is encoded N times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.data import dataset as data
from lora_train.engine.data.prompt_chunks import max_chunks
from lora_train.engine.files import atomic_write
from lora_train.engine.model import Conditioning, ModelBundle
from lora_train.engine.train.distributed import SOLO, Team
from lora_train.engine.train.progress import NonFiniteError

Batches = Iterator[tuple[int, list[int]]]


class LatentCache:
    """Latents per dataset item, plus SDXL's size conditioning; ``close()`` stops the prefetch threads."""

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, dataset: data.Dataset, work_dir: Path):
        self.cfg, self.bundle, self.dataset, self.work_dir = cfg, bundle, dataset, work_dir
        self.device = bundle.device
        self.memory: dict[int, torch.Tensor] = {}
        self.size_id_cache: dict[int, torch.Tensor] = {}
        self.caching = cfg.cache_latents or cfg.cache_latents_to_disk
        self.loader = None if self.caching else ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-images")
        self.pending: dict[int, Future] = {}

    def prefetched(self, batches: Batches, mine: Callable[[list[int]], list[int]] = list) -> Batches:
        """Without a latent cache, decode the next batch's images in a thread while this step trains; only
        ``mine(batch)``, the images this process trains of it."""
        upcoming = next(batches)
        while True:
            current, upcoming = upcoming, next(batches)
            if self.loader is not None:
                for index in mine(upcoming[1]):
                    if index not in self.pending:
                        self.pending[index] = self.loader.submit(data.load_pixels, self.dataset.items[index])
            yield current

    def close(self) -> None:
        if self.loader is not None:
            self.loader.shutdown(wait=False, cancel_futures=True)

    @torch.no_grad()
    def encode(self, indices: list[int]) -> torch.Tensor:
        """Latents for a batch, from the memory or disk cache when enabled."""
        latents = []
        for index in indices:
            latent = self.memory.get(index)
            if latent is None:
                latent = self._from_disk(index) if self.cfg.cache_latents_to_disk else None
                if latent is None:
                    item = self.dataset.items[index]
                    pending = self.pending.pop(index, None)
                    pixels, item.crop = pending.result() if pending else data.load_pixels(item)
                    latent = self.bundle.encode_images(pixels[None].to(self.device))[0].float()
                    if self.caching:  # once per image: worth a sync
                        self._check(index, latent)
                    if self.cfg.cache_latents_to_disk:
                        self._to_disk(index, latent.cpu())
                latent = latent.to(self.device)  # cached on the device: no host-to-device copy per step
                if self.cfg.cache_latents:
                    self.memory[index] = latent
            latents.append(latent)
        return torch.stack(latents)

    def cache_all(self, should_stop: Callable[[], bool], log: Callable[[str], None], team: Team = SOLO) -> bool:
        """Encode every image up front when caching; False when a stop was asked for in between.

        Each process of a ``team`` encodes its share; the shares then reach every process through memory
        (``cache_latents``) or through the disk cache, written before the barrier.
        """
        if not self.caching:
            return True
        log(f"caching latents of {len(self.dataset.items)} image(s)")
        mine = team.part(range(len(self.dataset.items)))
        stopped = False
        for index in mine:
            if should_stop():
                stopped = True
                break
            self.encode([index])
        if team.any(stopped):
            return False
        if team.world == 1:
            return True
        if not self.cfg.cache_latents:
            team.barrier()  # every share is on disk now
            return True
        shared = team.gather({i: (self.memory[i].cpu(), self.dataset.items[i].crop) for i in mine})
        for index, (latent, crop) in shared.items():
            self.memory[index] = latent.to(self.device)
            self.dataset.items[index].crop = crop
        return True

    def size_ids(self, indices: list[int]) -> torch.Tensor:
        """SDXL's per-sample size conditioning, built on the device once per item."""
        for index in indices:
            if index not in self.size_id_cache:
                ids = self.dataset.items[index].size_ids()
                self.size_id_cache[index] = torch.tensor(ids, dtype=torch.float32, device=self.device)
        return torch.stack([self.size_id_cache[i] for i in indices])

    def _path(self, index: int) -> Path:
        """Keyed by image file, its mtime and size, the bucket and the model, so stale entries are never used."""
        item = self.dataset.items[index]
        stat = item.path.stat()
        key = f"{item.path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{item.bucket}|{self.bundle.model_name}"
        return self.work_dir / ".latent_cache" / f"{hashlib.sha1(key.encode()).hexdigest()}.safetensors"

    def _from_disk(self, index: int) -> torch.Tensor | None:
        path = self._path(index)
        if not path.is_file():
            return None
        stored = load_file(str(path))
        self.dataset.items[index].crop = tuple(int(v) for v in stored["crop"])  # type: ignore[assignment]
        return stored["latent"]

    def _to_disk(self, index: int, latent: torch.Tensor) -> None:
        tensors = {"latent": latent.contiguous(), "crop": torch.tensor(self.dataset.items[index].crop)}
        atomic_write(self._path(index), lambda tmp: save_file(tensors, str(tmp)))

    def _check(self, index: int, latent: torch.Tensor) -> None:
        if not torch.isfinite(latent).all():
            raise NonFiniteError(
                f"{self.dataset.items[index].path}: the VAE gave NaN/inf for this image; the file may be broken "
                "(open and re-save it, or remove it), or the VAE overflowed in half precision")


class TextCache:
    """Text conditioning per caption; bypassed when the text encoders train or captions change per step.

    A batch's captions may need different numbers of 75-token chunks; cached ones are padded with the encoded
    empty chunk, as the WebUI pads the shorter prompts of a batch (``prompt_chunks.tokenize_captions``).
    """

    def __init__(self, cfg: TrainConfig, bundle: ModelBundle):
        self.bundle = bundle
        self.enabled = not (cfg.train_text_encoder or cfg.shuffle_caption or cfg.caption_dropout_rate)
        self.max_chunks = max_chunks(cfg.max_token_length)
        self.weighted = cfg.weighted_captions
        self.cache: dict[str, Conditioning] = {}

    def fill(self, captions: list[str], team: Team) -> None:
        """Encode ``captions`` up front, each process its share, when several processes would otherwise each
        encode all of them (one process encodes them as they come)."""
        if not self.enabled or team.world == 1:
            return
        mine = team.part(dict.fromkeys(captions))
        if mine:
            self.encode(mine)
        cpu = {c: Conditioning(v.context.cpu(), v.pooled.cpu() if v.pooled is not None else None)
               for c, v in self.cache.items() if c in mine}
        for caption, cond in team.gather(cpu).items():
            pooled = cond.pooled.to(self.bundle.device) if cond.pooled is not None else None
            self.cache[caption] = Conditioning(cond.context.to(self.bundle.device), pooled)

    def _encode(self, captions: list[str]) -> Conditioning:
        return self.bundle.encode_text(self.bundle.tokenize(captions, self.max_chunks, self.weighted))

    def encode(self, captions: list[str]) -> Conditioning:
        if not self.enabled:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys([*captions, ""]) if c not in self.cache]
        with torch.no_grad():
            for caption in missing:  # one at a time: each keeps its own number of chunks
                self.cache[caption] = self._encode([caption])
        parts = [self.cache[c] for c in captions]
        length = max(p.context.shape[1] for p in parts)
        empty = self.cache[""].context
        contexts = [torch.cat([p.context, *[empty] * ((length - p.context.shape[1]) // empty.shape[1])], dim=1)
                    for p in parts]
        pooled = torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None
        return Conditioning(torch.cat(contexts), pooled)
