"""The data set of encoded pairs a data module serves, and the sampler that orders it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from src.data.encoding import CORRUPTED, EncodedPair, PromptEncoder
from src.data.images import ImageResolver, corrupt_image, mean_colour
from src.data.records import DataError, PreferenceRecord


def check_conditional(record: PreferenceRecord, answers: tuple[str, ...]) -> None:
    """Refuse a record with several pictures when an answer is scored under a corrupted picture: which one to
    corrupt is not chosen yet."""
    if CORRUPTED in answers and len(record.images) > 1:
        why = f"several pictures per record: the conditional term ({CORRUPTED}) does not support them yet"
        raise DataError(f"record {record.id}: {len(record.images)} pictures; {why}", reason=why)


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), and can skip what a resumed run already trained on.

    The epoch comes from ``epoch_fn`` (the trainer's current epoch), so the order is the same on every
    device and after a restart; ``skip`` samples are left out of the next iteration only.
    """

    def __init__(self, size: int, seed: int, epoch_fn: Any):
        self.size, self.seed, self.epoch_fn, self.skip = size, seed, epoch_fn, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + int(self.epoch_fn()))
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size


class PreferenceDataset(Dataset):
    """Encoded pairs; images are loaded and processed per item, by the encoder that encoded the pairs.

    With ``answers`` holding ``chosen_corrupted``, an item also carries ``answer_image`` (0: the real image,
    1: the corrupted one, per answer) and ``corrupted_image_inputs``: the image corrupted by ``corruption``
    (`corrupt_image`, seeded by the record id), processed by the same encoder; None for a record without an image.
    """

    def __init__(
        self,
        records: list[PreferenceRecord],
        pairs: list[EncodedPair],
        resolver: ImageResolver,
        encoder: PromptEncoder,
        answers: tuple[str, ...] = (),
        corruption: dict[str, Any] | None = None,
    ):
        self.records = {r.id: r for r in records}
        self.pairs = pairs
        self.resolver = resolver
        self.encoder = encoder
        self.answer_image = [int(key == CORRUPTED) for key in answers] if CORRUPTED in answers else None
        if self.answer_image and corruption is None:
            raise ValueError(f"the answers hold {CORRUPTED} but no corruption is set (objective.corruption)")
        self.corruption = corruption

    def __len__(self) -> int:
        return len(self.pairs)

    def set_reference_logps(self, rows: list[list[float]]) -> None:
        """Give pair ``i`` the reference log-probs ``rows[i]`` (one per answer), computed before training."""
        self.pairs = [replace(pair, reference_logps=row) for pair, row in zip(self.pairs, rows, strict=True)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair = self.pairs[i]
        record = self.records[pair.id]
        image = self.resolver.resolve(record)  # several pictures: a list, one processor entry each, in order
        item = {"pair": pair, "image_inputs": self.encoder.image_inputs(image)}
        if self.answer_image:
            check_conditional(record, (CORRUPTED,))
            fill = mean_colour(self.encoder.processor.image_processor)
            corrupted = None if image is None else corrupt_image(image, self.corruption, pair.id, fill)
            item |= {"answer_image": self.answer_image, "corrupted_image_inputs": self.encoder.image_inputs(corrupted)}
            # the prompt's image tokens are counted for the real image's size (LLaVA-NeXT): the corrupted one keeps it
            if image is not None and "image_sizes" in item["image_inputs"]:
                inputs = (item["image_inputs"], item["corrupted_image_inputs"])
                sizes = [torch.as_tensor(x["image_sizes"]) for x in inputs]
                assert torch.equal(*sizes), (pair.id, sizes)
        return item
