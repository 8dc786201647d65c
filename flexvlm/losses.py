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
      row (the regions task: of each answer row's own tile, ``grounding_loss``), averaged over FA
      layers (in ``lr_only`` mode: the maps that would select, ``FlexVLM.decode_with_maps``; other
      modes have none, and get no grounding). Selection is not differentiable, so nothing else
      teaches a decoder trained from scratch where to look; a pre-trained LLM already knows.

    ``colour_classes``: the task's colour classes, background included (the regions task's:
    ``flexvlm.data.regions.COLOUR_CLASSES``).
    """

    def __init__(self, embed_dim: int, weight: float = 1.0, grounding_weight: float = 0.0,
                 colour_classes: int = len(COLOUR_NAMES) + 1) -> None:
        super().__init__()
        self.weight, self.grounding_weight = weight, grounding_weight
        self.lr_colour = nn.Linear(embed_dim, colour_classes)
        self.hr_colour = nn.Linear(embed_dim, colour_classes)
        self.hr_digit = nn.Linear(embed_dim, len(DIGITS))

    @property
    def needs_maps(self) -> bool:
        """Whether the model's selecting maps must keep their gradient (FlexVLMModule asks)."""
        return self.grounding_weight > 0

    def fit_to_data(self, datamodule: object) -> None:
        """A clear error, once at set-up (FlexVLMModule calls it), for a task with more colour classes than
        the objective has (else torch's bare "target out of bounds" at the first step)."""
        classes, ours = getattr(datamodule, "colour_classes", None), self.lr_colour.out_features
        if classes is not None and classes > ours:
            raise ValueError(f"the data has {classes} colour classes, the objective {ours}: set "
                             f"model.aux_objective.init_args.colour_classes to the task's (the regions task's: "
                             f"flexvlm.data.regions.COLOUR_CLASSES, experiments/regions/task.yaml)")

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
    """Mean over FA layers of the mean over counted rows of -log(share of the row's LR attention that
    falls on its target cell). selection_maps: layer -> (B, R, h, w), row r the selecting row that
    predicts answer token r; query_cell: row-major LR cells, (B,) for the first row alone (the tile
    task), or (B, A) for the first A rows, IGNORE_INDEX where a row does not count (the end token, an
    answer shorter than A; the regions task)."""
    targets = query_cell[:, None] if query_cell.dim() == 1 else query_cell
    terms = []
    for attn_map in selection_maps.values():
        rows = min(attn_map.shape[1], targets.shape[1])  # a batch of short answers has fewer rows
        maps = attn_map[:, :rows].flatten(2).float()
        share = maps / maps.sum(-1, keepdim=True).clamp(min=1e-12)
        terms.append(F.nll_loss(share.clamp(min=1e-12).log().flatten(0, 1), targets[:, :rows].flatten(),
                                ignore_index=IGNORE_INDEX))
    return torch.stack(terms).mean()
