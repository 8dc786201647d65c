"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), as its release's code has it (Gumpest/SparseVLMs,
the rank-based version of October 2024; docs/method.md, section 7d):

- text raters: among the prompt's text after the image, the tokens whose relevance to the image (the mean
  over image tokens of a softmax over the text of their embeddings' dot products) is above the mean;
- at each of its layers the image tokens are rated by the raters' attention (mean over heads and raters)
  and the layer's output keeps as many as rank(P) x scale + bias, P the raters' attention over the image
  tokens (all of them when P has full rank, at least one dropped otherwise);
- recycling: the dropped tokens of the highest scores are clustered (density peaks, kNN density) into a
  few merged tokens, the mean of each cluster, which stay in the sequence after the kept image tokens;
- the sequence is renumbered after each drop, merged tokens included.

``keep`` (flexvlm's budget) caps each stage's image tokens, merged ones included, on a geometric schedule
whose mean over the layers after the first drop is ``keep``: the rank count adapts below it, or, with
``adaptive=False``, the cap is the count (as the later releases' fixed token counts), so that the budget
alone decides what the method spends."""

from __future__ import annotations

import torch
from torch import Tensor

from flexvlm.reduction.base import REDUCTION, Stage, TokenReduction, kept_count, stage_ratio

OFFICIAL_LAYERS, OFFICIAL_DEPTH = (2, 6, 15, 19), 32  # the release's layers of LLaMA-7B's 32


@REDUCTION.register("sparsevlm")
class SparseVLM(TokenReduction):
    renumber_positions = True  # as its code: positions 0, 1, ... after each drop

    def __init__(self, layers: list[int] | None = None, scale: float = 13.5, bias: float = 0.0,
                 keep: float | None = None, recycle: float = 0.3, clusters: float = 0.1, adaptive: bool = True) -> None:
        """``layers``: the layers whose attention rates the image tokens, each followed by its drop (the
        release's 2, 6, 15, 19 of 32; default those shares of any decoder); ``scale``, ``bias``: a stage
        keeps floor(rank x scale + bias) image tokens (the release's 13.5 and 0, its 192-token setting of
        LLaVA-1.5's 576; 9, 6 for 128; 0.8, 0 for 64); ``keep``: flexvlm's budget, the mean share of the
        image tokens that the layers after the first drop see at most (None: no cap, the release's rule);
        ``recycle``: the share of a stage's dropped tokens recycled (the release's 30 %, plus one), the
        highest scored; ``clusters``: merged tokens per recycled token (the release's 10 %, plus one);
        ``adaptive``: a stage keeps the rank's count under the cap (the release), or False, the cap itself
        (which ``keep`` must then give)."""
        if layers is not None and (list(layers) != sorted(set(layers)) or layers[0] < 0):
            raise ValueError(f"SparseVLM's layers must be distinct, increasing and >= 0, got {layers}")
        if scale < 0:
            raise ValueError(f"SparseVLM's scale counts kept tokens per unit of rank, >= 0, got {scale}")
        if keep is not None and not 0.0 <= keep <= 1.0:
            raise ValueError(f"SparseVLM's keep is a share of the image tokens, in [0, 1], got {keep}")
        if not adaptive and keep is None:
            raise ValueError("SparseVLM without its adaptive count keeps its budget's share: give keep")
        for name, share in (("recycle", recycle), ("clusters", clusters)):
            if not 0.0 < share <= 1.0:
                raise ValueError(f"SparseVLM's {name} is a share, in (0, 1], got {share}")
        self.layers = None if layers is None else list(layers)
        self.scale, self.bias, self.keep, self.recycle, self.clusters = scale, bias, keep, recycle, clusters
        self.adaptive = adaptive

    def stage_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            layers = self.layers
        else:  # the release's layers at the same depth share; each needs a layer after it
            layers = sorted({round(layer * num_layers / OFFICIAL_DEPTH) for layer in OFFICIAL_LAYERS}
                            & set(range(num_layers - 1)))
        if not layers or layers[-1] > num_layers - 2:
            raise ValueError(f"SparseVLM drops after each of its layers {layers or list(OFFICIAL_LAYERS)}: a "
                             f"{num_layers}-layer decoder has layers 0 .. {num_layers - 2} with one after them")
        return layers

    def stages(self, num_layers: int) -> list[Stage]:
        layers = self.stage_layers(num_layers)
        starts = [layer + 1 for layer in layers]
        ratio = 1.0 if self.keep is None else stage_ratio(self.keep, starts, num_layers)
        return [Stage(prune_before=start, rate_at=start - 1, keep=ratio ** (s + 1)) for s, start in enumerate(starts)]

    def raters(self, embeds: Tensor, image: Tensor, valid: Tensor, answer_starts: Tensor) -> Tensor:
        """The text after the sample's last image token, up to where its first answer starts (the prompt's
        question at inference), whose relevance is above the mean: relevance of text token t, the mean over
        image tokens i of softmax over t of e_i . e_t (the input embeddings). Every candidate where none is
        above (all equal: one text token); the answer-start rows where no text follows the image."""
        place = torch.arange(embeds.shape[1], device=embeds.device)
        last_image = torch.where(image, place, -1).amax(-1, keepdim=True)
        first_answer = torch.where(answer_starts, place, embeds.shape[1]).amin(-1, keepdim=True)
        text = valid & ~image & (place > last_image) & (place <= first_answer)
        # the text tokens first (a few), so that the products are (tokens x text), not (tokens x tokens)
        order = text.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, : int(text.sum(-1).max())]
        is_text = text.gather(1, order)
        e = embeds.float()
        logits = e @ e.gather(1, order[..., None].expand(-1, -1, e.shape[-1])).transpose(1, 2)  # (B, N, T)
        weights = logits.masked_fill(~is_text[:, None], float("-inf")).softmax(-1).nan_to_num() * image[..., None]
        relevance = weights.sum(1) / image.sum(-1, keepdim=True).clamp(min=1)  # (B, T)
        mean = relevance.sum(-1, keepdim=True) / is_text.sum(-1, keepdim=True).clamp(min=1)
        above = is_text & (relevance > mean)
        chosen = torch.where(above.any(-1, keepdim=True), above, is_text)
        raters = torch.zeros_like(text).scatter(1, order, chosen)
        return torch.where(text.any(-1, keepdim=True), raters, answer_starts)

    def counts(self, stage: Stage, probs: Tensor, rater_valid: Tensor, image: Tensor, num_images: Tensor) -> Tensor:
        """min(floor(rank x scale + bias), n - 1) of the n current image tokens (all n when the raters'
        attention over them has rank n), at most the stage's cap: the most that, with the tokens merged
        from the rest, leave floor(keep_s x the sample's image tokens) image tokens. Not ``adaptive``: the cap."""
        current = image.sum(-1)
        candidates = torch.arange(int(current.max()) + 1, device=image.device)  # kept counts k = 0 .. n
        total = candidates + self._merged_count(current[:, None] - candidates)
        fits = (candidates <= current[:, None]) & (total <= kept_count(num_images, stage.keep)[:, None])
        cap = torch.where(fits, candidates, 0).amax(-1)
        if not self.adaptive:
            return cap
        attention = probs.detach().float().mean(1) * rater_valid[..., None] * image[:, None]  # (B, R, keys)
        # torch's default tolerance on the sample's own matrix (raters x image tokens), as the release's code
        tolerance = torch.finfo(torch.float32).eps * torch.maximum(rater_valid.sum(-1), current)
        rank = torch.linalg.matrix_rank(attention, rtol=tolerance)
        by_rank = torch.floor(rank * self.scale + self.bias).long().clamp(min=0).minimum(current - 1)
        by_rank = torch.where(rank >= current, current, by_rank)
        return torch.minimum(by_rank, cap)

    def merged(self, x: Tensor, scores: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor] | None:
        """The dropped tokens of the highest scores (ties: the earlier), ``recycle`` of them plus one,
        grouped by ``density_peak_clusters`` into ``clusters`` of that count plus one, each merged into the
        mean of its tokens (the hidden states after the rating layer), in the order of their centres."""
        recycled = self._recycled_count(dropped.sum(-1))
        if not bool(recycled.any()):
            return None
        order = scores.masked_fill(~dropped, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        order = order[:, : int(recycled.max())]
        valid = torch.arange(order.shape[1], device=x.device) < recycled[:, None]
        tokens = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        groups = self._cluster_count(recycled)
        assignment = density_peak_clusters(tokens.detach().float(), valid, groups)
        members = (assignment[:, None] == torch.arange(int(groups.max()), device=x.device)[:, None]) & valid[:, None]
        weights = members.to(x.dtype) / members.sum(-1, keepdim=True).clamp(min=1)  # (B, groups, recycled)
        return weights @ tokens, torch.arange(members.shape[1], device=x.device) < groups[:, None]

    def _recycled_count(self, dropped: Tensor) -> Tensor:
        return torch.where(dropped > 0, torch.floor(dropped * self.recycle).long() + 1, 0).minimum(dropped)

    def _cluster_count(self, recycled: Tensor) -> Tensor:
        return torch.where(recycled > 0, torch.floor(recycled * self.clusters).long() + 1, 0).minimum(recycled)

    def _merged_count(self, dropped: Tensor) -> Tensor:
        """The merged tokens a stage that drops ``dropped`` image tokens adds."""
        return self._cluster_count(self._recycled_count(dropped))

    def describe(self) -> str:
        budget = "" if self.keep is None else f", keep={self.keep}" + ("" if self.adaptive else ", the cap")
        return (f"SparseVLM(layers={self.layers or 'the release'}, scale={self.scale}, bias={self.bias}{budget}, "
                f"recycle={self.recycle}, clusters={self.clusters})")


def density_peak_clusters(points: Tensor, valid: Tensor, clusters: Tensor) -> Tensor:
    """(B, M, D) ``points`` (``valid`` (B, M)) -> (B, M) the cluster of each valid point, 0 .. clusters_b - 1,
    by density peaks with a kNN density, as the release's code: distances d = |x_i - x_j| / sqrt(D); density
    rho_i = exp(-mean of d^2 to its k = clusters_b nearest points, itself included); delta_i the distance to
    the nearest denser point (ties: the earlier point is denser), or the largest distance where none is; the
    centres are the clusters_b points of the largest rho x delta (ties: the earlier), in that order; every
    point joins its nearest centre (ties: the earlier centre), a centre its own cluster."""
    m, dim = points.shape[1:]
    index = torch.arange(m, device=points.device)
    squared = (points * points).sum(-1)
    # |a - b|^2 through products: a (B, M, M, D) difference would not fit at high-res token counts
    distance = (squared[..., None] + squared[:, None] - 2 * points @ points.transpose(1, 2)).clamp(min=0).sqrt()
    distance = distance.masked_fill(index[:, None] == index, 0.0) / dim**0.5
    pairs = valid[..., None] & valid[:, None]
    nearest = distance.masked_fill(~pairs, float("inf")).sort(-1).values
    in_knn = index < clusters[:, None, None]
    density = torch.exp(-(nearest.nan_to_num(posinf=0.0) ** 2 * in_knn).sum(-1) / clusters[:, None].clamp(min=1))
    rho_i, rho_j = density[..., None], density[:, None]  # (B, i, j) pairs
    denser = ((rho_j > rho_i) | ((rho_j == rho_i) & (index < index[:, None]))) & pairs
    largest = distance.masked_fill(~pairs, 0.0).flatten(1).amax(-1)[:, None, None]
    delta = torch.where(denser, distance, largest).amin(-1)
    peak = (delta * density).masked_fill(~valid, float("-inf"))
    centres = peak.argsort(dim=-1, descending=True, stable=True)[:, : int(clusters.max())]
    centre_valid = torch.arange(centres.shape[1], device=points.device) < clusters[:, None]
    to_centre = distance.gather(2, centres[:, None].expand(-1, m, -1)).masked_fill(~centre_valid[:, None], float("inf"))
    # a centre joins its own cluster (two centres at one place); the slots of absent centres write past the points
    own = torch.arange(centres.shape[1], device=points.device).expand_as(centres)
    assignment = torch.nn.functional.pad(to_centre.argmin(-1), (0, 1))
    return assignment.scatter(1, centres.masked_fill(~centre_valid, m), own)[:, :m]
