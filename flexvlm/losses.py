"""Auxiliary training objectives: modules a LightningModule adds to the language-model loss
(``FlexVLMModule(aux_objective=...)``), called as ``(lr_tokens, hr_tokens, batch, selection_maps)``."""

import torch
import torch.nn.functional as F
from torch import nn

from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.synthetic import COLOUR_NAMES, DIGITS

__all__ = ["SyntheticAuxLoss", "grounding_loss"]


class SyntheticAuxLoss(nn.Module):
    """Auxiliary losses of the built-in task, standing in for what the paper's model brings from
    pre-training, so that small models trained from scratch learn the task in minutes:

    - for the vision tower (x ``weight``): CE(colour of LR tokens) + CE(colour of HR tokens) +
      CE(digit of HR tile tokens);
    - for the decoder's grounding (x ``grounding_weight``, 0 = off): for every FA layer, CE of the
      queried tile's LR cell under the LR attention that selected HR tokens for the first answer
      row, averaged over FA layers (in ``lr_only`` mode: the maps that would select,
      ``FlexVLM.decode_with_maps``; other modes have none, and get no grounding). Selection is not
      differentiable, so nothing else teaches a decoder trained from scratch where to look; a
      pre-trained LLM already knows.
    """

    def __init__(self, embed_dim: int, weight: float = 1.0, grounding_weight: float = 0.0) -> None:
        super().__init__()
        self.weight, self.grounding_weight = weight, grounding_weight
        self.lr_colour = nn.Linear(embed_dim, len(COLOUR_NAMES) + 1)
        self.hr_colour = nn.Linear(embed_dim, len(COLOUR_NAMES) + 1)
        self.hr_digit = nn.Linear(embed_dim, len(DIGITS))

    @property
    def needs_maps(self) -> bool:
        """Whether the model's selecting maps must keep their gradient (FlexVLMModule asks)."""
        return self.grounding_weight > 0

    def forward(
        self,
        lr_tokens: torch.Tensor,
        hr_tokens: torch.Tensor,
        batch: dict[str, torch.Tensor],
        selection_maps: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """lr_tokens (B, N_lr, C), hr_tokens (B, N_hr, C) in the targets' row-major order;
        selection_maps: FA layer -> (B, R, g, g) LR attention of the selecting rows (VLMOutput)."""
        loss = self.weight * (
            F.cross_entropy(self.lr_colour(lr_tokens).flatten(0, 1), batch["aux_lr_colour"].flatten())
            + F.cross_entropy(self.hr_colour(hr_tokens).flatten(0, 1), batch["aux_hr_colour"].flatten())
            + F.cross_entropy(
                self.hr_digit(hr_tokens).flatten(0, 1),
                batch["aux_hr_digit"].flatten(),
                ignore_index=IGNORE_INDEX,
            )
        )
        if self.grounding_weight and selection_maps:
            loss = loss + self.grounding_weight * grounding_loss(selection_maps, batch["aux_query_cell"])
        return loss


def grounding_loss(selection_maps: dict[int, torch.Tensor], query_cell: torch.Tensor) -> torch.Tensor:
    """Mean over FA layers of -log(share of the first selecting row's LR attention that falls on
    the queried cell). selection_maps: layer -> (B, R, g, g); query_cell (B,) row-major LR cell."""
    terms = []
    for attn_map in selection_maps.values():
        first_row = attn_map[:, 0].flatten(1).float()  # the row that predicts the answer's first token
        share = first_row / first_row.sum(-1, keepdim=True).clamp(min=1e-12)
        terms.append(F.nll_loss(share.clamp(min=1e-12).log(), query_cell))
    return torch.stack(terms).mean()
