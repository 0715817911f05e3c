"""Image embeddings of one request and where they go: the prompt positions of its image tokens."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class ImageEmbeds:
    positions: list[int]  # prompt positions of the image tokens, ascending
    values: torch.Tensor  # [len(positions), hidden]: what goes in place of their token embeddings

    def __post_init__(self):
        if len(self.positions) != self.values.shape[0]:
            raise ValueError(
                f"{len(self.positions)} image positions but {self.values.shape[0]} embedding rows"
            )

    def within(self, start: int, n: int) -> tuple[list[int], torch.Tensor]:
        """(offsets from `start`, values) of the image tokens among prompt positions [start, start + n):
        what one prefill chunk needs."""
        lo = bisect.bisect_left(self.positions, start)
        hi = bisect.bisect_left(self.positions, start + n)
        return [p - start for p in self.positions[lo:hi]], self.values[lo:hi]


def expand_image_tokens(
    ids: list[int], image_token_id: int, per_image: int, num_images: int
) -> tuple[list[int], list[int]]:
    """The prompt with each image token repeated `per_image` times (one per embedding row, as the Hugging
    Face processor expands `<image>`), and the positions of all of them. ValueError when the prompt's
    image tokens and the images given do not pair up."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != num_images:
        raise ValueError(
            f"the prompt has {found} image token(s) but the request has {num_images} image(s); "
            "put one image placeholder in the prompt per image"
        )
    out, positions = [], []
    for t in ids:
        if t == image_token_id:
            positions.extend(range(len(out), len(out) + per_image))
            out.extend([t] * per_image)
        else:
            out.append(t)
    return out, positions
