"""How the original LLaVA code lays out a batch: ``prepare_inputs_labels_for_multimodal`` drops each
row's padding, splices every image's features in place of its one placeholder (``IMAGE_TOKEN_INDEX``),
truncates to ``tokenizer_model_max_length`` and pads the rows again on ``tokenizer_padding_side``. A
``Splice`` rebuilds that layout on the host for any kept indices, so the patcher knows where each image
and each survivor sits without re-running the splice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One prompt of the spliced sequence: its content (padding removed) and where its images sit."""

    orig: torch.Tensor  # (content,) each content position's index in the UNPRUNED content
    images: list  # (image index into ``images``, first content position, token count) per spliced image
    full: int  # content length of the unpruned row


class Splice:
    """The layout rules of one model: its placeholder id, patches per image and config."""

    def __init__(self, image_token: int, n: int, config):
        self.image_token, self.n, self.config = image_token, n, config

    def rows(self, ids, mask, kept: list) -> list[Row]:
        """The layout the original code builds: per prompt, its content positions' unpruned indices and
        its spliced images. ``kept[i]`` are the kept raster indices of ``images[i]`` (ascending)."""
        n = self.n
        rows, image = [], 0
        for r in range(ids.shape[0]):
            # host sync: the original code builds this layout on the host, row by row (this line and the next)
            content = ids[r] if mask is None else ids[r][mask[r].bool()]
            marks = (content == self.image_token).nonzero().flatten().tolist()  # host sync: as above
            if not marks:  # the original code consumes one image for a prompt without a placeholder
                rows.append(Row(torch.arange(content.shape[0], device=ids.device), [], content.shape[0]))
                image += 1
                continue
            pieces, spliced, orig, prev = [], [], 0, 0
            for mark in marks:
                text = mark - prev
                pieces.append(torch.arange(orig, orig + text, device=ids.device))
                orig += text
                start = sum(p.shape[0] for p in pieces)
                pieces.append(orig + kept[image].to(ids.device))
                spliced.append((image, start, kept[image].shape[0]))
                orig, prev, image = orig + n, mark + 1, image + 1
            pieces.append(torch.arange(orig, orig + content.shape[0] - prev, device=ids.device))
            rows.append(Row(torch.cat(pieces), spliced, orig + content.shape[0] - prev))
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit is not None:  # the original code truncates every row to this length
            for row in rows:
                row.orig, row.full = row.orig[:limit], min(row.full, limit)
                row.images = [(i, s, max(0, min(c, limit - s))) for i, s, c in row.images if s < limit]
        return rows

    def images_needed(self, ids, mask) -> int:
        counts = ((ids == self.image_token) & (mask.bool() if mask is not None else True)).sum(1)
        return int(counts.clamp_min(1).sum())  # host sync: the original code counts images on the host too

    @property
    def left_padded(self) -> bool:
        return getattr(self.config, "tokenizer_padding_side", "right") == "left"

    def place(self, rows: list[Row], length: int):
        """Output column of each row's content position 0 in a padded batch of ``length``."""
        if self.left_padded:
            return [length - row.orig.shape[0] for row in rows]
        return [0] * len(rows)

    def position_ids(self, rows: list[Row], length: int, caller_positions, generating: bool, device):
        """The unpatched model's position ids, gathered at the survivors (``positions="original"``).

        The unpatched model counts content positions 0..L-1 per prompt when position ids exist (given
        by the caller, or, inside ``generate``, derived from the attention mask); when ``forward`` gets
        none, the LM counts every column of the padded batch, padding included."""
        counting_columns = caller_positions is None and not generating
        full_len = max(row.full for row in rows)
        pos = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for r, (row, start) in enumerate(zip(rows, self.place(rows, length))):
            shift = full_len - row.full if counting_columns and self.left_padded else 0
            pos[r, start:start + row.orig.shape[0]] = (row.orig + shift)
        return pos
