"""SparseVLM in hd mode against a naive per-sample implementation of its release's rule, written from
the rule itself: python lists of the sequence's slots, the raters chosen by an explicit softmax, the
rank counted from singular values, the recycled tokens clustered by loops over their distances."""

import math
from fractions import Fraction

import pytest
import torch
from test_reduction import DECODERS, _cached_step_logits, _model, _rating, two_answer_row
from torch.nn.utils.rnn import pad_sequence

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.encoder import EncodedImages, VisualEncoder
from flexvlm.models.generation import generate
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.reduction import REDUCTION, SparseVLM, Stage
from flexvlm.reduction.sparsevlm import density_peak_clusters

IMAGE = 16  # tokens of one 32 px image of the list encoder below (4 x 4 patches)


class ImageList(VisualEncoder):
    """hd's tokens of each sample's own number of images, one after another, where the prompt holds a
    placeholder per token (as SmolVLM's processor expands them): samples with other image counts."""

    def __init__(self, backbone: PatchMLPBackbone) -> None:
        super().__init__()
        self.backbone, self.feature_dim = backbone, backbone.embed_dim

    @property
    def lr_shape(self):
        return (self.backbone.grid_size, self.backbone.grid_size)

    def encode(self, images, project, mode, content_box=None):
        tokens = [project(self.backbone(sample)).flatten(0, 1) for sample in images]
        return EncodedImages(pad_sequence(tokens, batch_first=True), torch.tensor([len(t) for t in tokens]))


def _list_model(reduction, family="llama"):
    torch.manual_seed(0)
    encoder = ImageList(PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32))
    return FlexVLM(encoder=encoder, llm=DECODERS[family](), mode="hd", reduction=reduction).eval()


def _list_ids(*parts):
    """A prompt of text ids and image counts (an int k in a tuple: k images' placeholders)."""
    return [t for part in parts for t in ([IMAGE_TOKEN_INDEX] * IMAGE * part[0] if isinstance(part, tuple) else [part])]


def _batch(rows, answer_lengths, images):
    """Right-padded ``rows`` of ids, each ending in an answer of its ``answer_lengths``."""
    ids = pad_sequence([torch.tensor(r) for r in rows], batch_first=True)
    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (row, length) in enumerate(zip(rows, answer_lengths)):
        labels[i, len(row) - length : len(row)] = ids[i, len(row) - length : len(row)]
    return dict(input_ids=ids, attention_mask=mask, images=images, labels=labels)


def _question_batch():
    """144 image tokens a sample, at other places, questions of other lengths (a few raters each)."""
    torch.manual_seed(1)
    rows = [[IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9, 10, 2, 3], [4, 11, IMAGE_TOKEN_INDEX, 8, 9, 12, 13, 14, 15, 16, 17, 2]]
    return _batch(rows, [2, 1], torch.randn(2, 3, 96, 96))


def _list_batch():
    """Right-padded: one image, then two with text between them; one answer each."""
    torch.manual_seed(1)
    rows = [_list_ids(4, (1,), 5, 6, 7, 8, 2), _list_ids((1,), 9, (1,), 10, 11, 12, 13, 3, 2)]
    return _batch(rows, [2, 2], [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)])


# -- the naive reference ---------------------------------------------------------------------------------
def _naive_raters(embeds, is_image, answer_start):
    """Prompt places of the raters: the text after the last image token up to the answer's start whose
    mean (over image tokens) softmax over that text of the embeddings' products is above the mean."""
    last_image = max(p for p, image in enumerate(is_image) if image)
    text = [p for p in range(last_image + 1, answer_start + 1) if not is_image[p]]
    if not text:
        return [answer_start]
    relevance = [0.0] * len(text)
    images = [p for p, image in enumerate(is_image) if image]
    for i in images:
        products = [float(embeds[i] @ embeds[t]) for t in text]
        top = max(products)
        exps = [math.exp(v - top) for v in products]
        for k, e in enumerate(exps):
            relevance[k] += e / sum(exps) / len(images)
    mean = sum(relevance) / len(relevance)
    return [t for t, r in zip(text, relevance) if r > mean] or text


def _recycled(dropped, reduction):
    return 0 if dropped == 0 else min(math.floor(dropped * reduction.recycle) + 1, dropped)


def _clusters(recycled, reduction):
    return 0 if recycled == 0 else min(math.floor(recycled * reduction.clusters) + 1, recycled)


def _rank(matrix):
    """Singular values above torch's default tolerance for the matrix's shape, in float32's epsilon."""
    values = torch.linalg.svdvals(matrix.double()).tolist()
    tolerance = max(values) * torch.finfo(torch.float32).eps * max(matrix.shape)
    return sum(v > tolerance for v in values)


def _naive_clusters(points, count):
    """Density peaks on ``points`` (a list of vectors, by descending score) -> each point's cluster."""
    m, dim = len(points), points[0].shape[0]
    d = [[float((a - b).norm()) / math.sqrt(dim) for b in points] for a in points]
    rho = [math.exp(-sum(v * v for v in sorted(row)[:count]) / count) for row in d]
    largest = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)], default=largest)
             for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-delta[i] * rho[i], i))[:count]
    cluster = [min(range(count), key=lambda t: (d[i][centres[t]], t)) for i in range(m)]
    for t, i in enumerate(centres):
        cluster[i] = t
    return cluster


def naive_sparsevlm(model, ids, images, answer_start, reduction):
    """One unpadded sample through the decoder, slot list by slot list -> (hidden states (N, D) after the
    final norm, a dropped token's state the one it had when dropped; per stage: (the prompt places of
    the image tokens kept, the merged tokens in the sequence))."""
    llm = model.llm
    inputs = model.prepare(ids, torch.ones_like(ids), images)
    h = inputs.embeds[0]
    is_image = inputs.image_mask[0].tolist()
    raters = _naive_raters(h, is_image, answer_start)
    slots = [(p, is_image[p]) for p in range(len(is_image))]  # (prompt place, or None for a merged token; image)
    num_images, final, record = sum(is_image), [None] * len(is_image), []
    stages = {stage.rate_at: stage for stage in reduction.stages(len(llm.layers))}
    for i, layer in enumerate(llm.layers):
        positions = torch.arange(len(slots))  # renumbered after every drop
        out = layer(h[None], llm.attention_inputs(h[None], None, None, position_ids=positions[None]), None)[0]
        if i not in stages:
            h = out
            continue
        rows = [j for j, (p, _) in enumerate(slots) if p in raters]
        attention = torch.stack([_rating(layer, h[None], positions, [r], llm) for r in rows])  # (R, n)
        image_slots = [j for j, (_, image) in enumerate(slots) if image]
        n = len(image_slots)
        rank = _rank(attention[:, image_slots])
        count = n if rank == n else max(0, min(math.floor(rank * reduction.scale + reduction.bias), n - 1))
        target = math.floor(num_images * stages[i].keep + 1e-9)
        fits = [k for k in range(n + 1) if k + _clusters(_recycled(n - k, reduction), reduction) <= target]
        count = min(count, max(fits, default=0)) if reduction.adaptive else max(fits, default=0)
        by_score = sorted(image_slots, key=lambda j: (-float(attention[:, j].mean()), j))
        kept, dropped = by_score[:count], by_score[count:]
        recycled = dropped[: _recycled(len(dropped), reduction)]
        merged = []
        if recycled:
            groups = _clusters(len(recycled), reduction)
            cluster = _naive_clusters([out[j] for j in recycled], groups)
            merged = [torch.stack([out[j] for j, c in zip(recycled, cluster) if c == t]).mean(0) for t in range(groups)]
        new_slots, states = [], []
        for j, (p, image) in enumerate(slots):
            if not image or j in kept:
                new_slots.append((p, image))
                states.append(out[j])
            elif p is not None:
                final[p] = llm.final_norm(out[j])
            if j == image_slots[-1]:
                new_slots += [(None, True)] * len(merged)
                states += merged
        slots, h = new_slots, torch.stack(states)
        record.append((sorted(p for p, image in slots if image and p is not None), sum(p is None for p, _ in slots)))
    for j, (p, _) in enumerate(slots):
        if p is not None:
            final[p] = llm.final_norm(h[j])
    return torch.stack(final), record


def _recorded(pruning, i):
    """The model's own record of sample i, as the reference keeps it."""
    out = []
    for segment in pruning.segments[1:]:
        real = segment.valid[i]
        index, image = segment.index[i][real], segment.image[i][real]
        out.append((sorted(index[image & (index >= 0)].tolist()), int((index < 0).sum())))
    return out


def _check_against_the_naive_rule(model, batch):
    with torch.no_grad():
        inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
        out = model(**batch)
        row_mask = torch.nn.functional.pad(inputs.labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        model.decode(inputs.embeds, inputs.attention_mask, row_mask, None, pruning=inputs.pruning)
    records = []
    for i in range(len(batch["input_ids"])):
        real = batch["attention_mask"][i].bool()
        images = batch["images"][i : i + 1] if torch.is_tensor(batch["images"]) else [batch["images"][i]]
        first_label = int((inputs.labels[i] != IGNORE_INDEX).nonzero()[0])
        with torch.no_grad():
            hidden, record = naive_sparsevlm(model, batch["input_ids"][i : i + 1, real], images, first_label - 1,
                                             model.reduction)
        torch.testing.assert_close(out.logits[i, : hidden.shape[0]], model.llm.logits(hidden), atol=2e-5, rtol=1e-4)
        assert _recorded(inputs.pruning, i) == record
        records.append(record)
    return records


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("reduction", [SparseVLM(), SparseVLM(keep=0.15), SparseVLM(keep=0.15, adaptive=False)],
                         ids=["release", "budget", "budget-alone"])
def test_teacher_forced_pass_matches_the_naive_rule_per_sample(reduction, family):
    """144 image tokens a sample, right padding: every stage keeps what the reference keeps, merges what
    it merges, and every prompt row's logits are the reference's."""
    records = _check_against_the_naive_rule(_model(reduction, family), _question_batch())
    assert all(merged for record in records for _, merged in record)  # recycling at every stage
    seen = [[len(places) + merged for places, merged in record] for record in records]
    caps = [math.floor(144 * stage.keep + 1e-9) for stage in reduction.stages(4)]
    assert all(n <= cap for sample in seen for n, cap in zip(sample, caps))
    if not reduction.adaptive:  # the budget alone: each stage its cap (less what merging cannot fit)
        assert all(cap - 1 <= n <= cap for sample in seen for n, cap in zip(sample, caps))
        return
    assert seen[0] != seen[1]  # a count of each sample's own
    if reduction.keep is None:  # the rank's count: a few raters, far fewer than 144 tokens
        assert all(sample[0] < 60 for sample in seen)
    else:  # the rank's count under the cap, or the cap
        assert any(n == cap for sample in seen for n, cap in zip(sample, caps))
        assert any(n < cap for sample in seen for n, cap in zip(sample, caps))


@pytest.mark.parametrize("family", DECODERS)
def test_samples_with_other_image_counts_match_the_naive_rule(family):
    """One image against two with text between them (the raters: the text after the last one), in one
    right-padded batch: adaptive counts per sample."""
    records = _check_against_the_naive_rule(_list_model(SparseVLM(scale=4.0, bias=1.0), family), _list_batch())
    assert [len(records[0][0][0]), len(records[1][0][0])] != [IMAGE, 2 * IMAGE]
    assert records[0] != records[1]


@pytest.mark.parametrize("reduction", [SparseVLM(scale=4.0, bias=1.0), SparseVLM(scale=4.0, keep=0.3)],
                         ids=["release", "budget"])
def test_cached_generation_matches_uncached_single_samples_and_the_naive_rule(reduction):
    """Left-padded, other image counts, the KV cache: each layer's cache holds its stage's tokens (merged
    ones included) and each step its stage's positions. Recomputing the whole sequence every step (the
    same raters: the prompt's text) and each sample alone give the same tokens; every cached step's
    logits are the reference's on the whole sequence so far."""
    model = _list_model(reduction)
    rows = [_list_ids(4, (1,), 5, 6, 7), _list_ids((2,), 9, 10, 11, 12)]
    ids = torch.stack([torch.tensor([0] * (len(rows[1]) - len(rows[0])) + rows[0]), torch.tensor(rows[1])])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[len(rows[1]) - len(rows[0])], [0]])).long()
    torch.manual_seed(3)
    images = [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    cached = generate(model, ids, mask, images, max_new_tokens=5)
    uncached = generate(model, ids, mask, images, max_new_tokens=5, use_cache=False)
    assert cached.tokens == uncached.tokens
    torch.testing.assert_close(cached.hr_fraction, uncached.hr_fraction)
    assert bool((cached.hr_fraction < 1).all())
    step_logits = _cached_step_logits(model, ids, mask, images, cached.tokens)
    for i in range(2):
        real = mask[i].bool()
        single = generate(model, ids[i : i + 1, real], mask[i : i + 1, real], [images[i]], max_new_tokens=5)
        assert single.tokens[0] == cached.tokens[i]
        prompt = ids[i : i + 1, real]
        for step in range(5):
            sequence = torch.cat((prompt, torch.tensor([cached.tokens[i][:step]], dtype=torch.long)), dim=1)
            with torch.no_grad():
                hidden, _ = naive_sparsevlm(model, sequence, [images[i]], prompt.shape[1] - 1, model.reduction)
            torch.testing.assert_close(step_logits[step][i], model.llm.logits(hidden[-1]), atol=2e-5, rtol=1e-4)


def test_training_rates_with_the_instruction_and_trains():
    """In training (gradient checkpointing on) the raters are the instruction's text before the first
    answer; the pass is the reference's and the loss reaches the decoder through kept and merged tokens."""
    model = _model(SparseVLM(scale=4.0)).train()
    model.llm.gradient_checkpointing = True
    ids, labels, images = two_answer_row(4)
    out = model(ids, torch.ones_like(ids), images, labels=labels)
    with torch.no_grad():
        expected, _ = naive_sparsevlm(model, ids, images, 144 + 2, model.reduction)  # the row before answer one
    torch.testing.assert_close(out.logits[0].detach(), model.llm.logits(expected), atol=2e-5, rtol=1e-4)
    out.loss.backward()
    missing = [n for n, p in model.llm.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def _exact_rank(rows):
    """Rank of a matrix of integers by Gaussian elimination over the rationals."""
    matrix, rank = [[Fraction(v) for v in row] for row in rows], 0
    for col in range(len(matrix[0]) if matrix else 0):
        pivot = next((r for r in range(rank, len(matrix)) if matrix[r][col]), None)
        if pivot is None:
            continue
        matrix[rank], matrix[pivot] = matrix[pivot], matrix[rank]
        for r in range(len(matrix)):
            if r != rank and matrix[r][col]:
                factor = matrix[r][col] / matrix[rank][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[rank])]
        rank += 1
    return rank


def test_the_count_follows_the_rank_of_the_raters_attention():
    """Rating matrices of known rank (rows repeated and combined; padded raters and keys that are no
    image tokens are left out): a stage keeps floor(rank x scale + bias), one fewer than the image
    tokens at most, all of them at full rank, and never more than its cap allows."""
    torch.manual_seed(5)
    base = torch.randint(1, 9, (3, 6)).float()
    matrices = [base[[0, 0, 0]], base[[0, 1, 0, 1]], torch.cat((base, base[:1] + base[1:2])), base[:2, :2]]
    reduction = SparseVLM(scale=2.5, bias=1.0)
    rows, keys = 5, 8
    probs = torch.zeros(len(matrices), 1, rows, keys)
    rater_valid = torch.zeros(len(matrices), rows, dtype=torch.bool)
    image = torch.zeros(len(matrices), keys, dtype=torch.bool)
    for b, m in enumerate(matrices):
        probs[b, 0, : m.shape[0], 1 : 1 + m.shape[1]] = m
        probs[b, 0, : m.shape[0], 0] = 50.0  # a text key: not part of the rank
        rater_valid[b, : m.shape[0]], image[b, 1 : 1 + m.shape[1]] = True, True
    ranks = [_exact_rank(m.long().tolist()) for m in matrices]
    assert ranks == [1, 2, 3, 2]
    num_images = image.sum(-1)
    counts = reduction.counts(Stage(1, 0, 1.0), probs, rater_valid, image, num_images)
    expected = [n if r == n else min(math.floor(r * 2.5 + 1), n - 1) for r, n in zip(ranks, num_images.tolist())]
    assert counts.tolist() == expected == [3, 5, 5, 2]
    capped = reduction.counts(Stage(1, 0, 0.5), probs, rater_valid, image, num_images)
    # caps of 3 image tokens of 6 and 1 of 2, merged ones included: 2 kept and 1 merged of the 4 dropped;
    # none kept and 1 merged of the 2 dropped
    assert capped.tolist() == [2, 2, 2, 0]


def test_density_peaks_find_separated_groups_and_their_centres():
    """Three tight groups of points, far apart: three clusters, one per group, each centre in its group;
    the padded sample's points are left out."""
    torch.manual_seed(6)
    centres = torch.tensor([[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]])
    group = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    points = (centres[group] + 0.01 * torch.randn(10, 4))[None].repeat(2, 1, 1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    assignment = density_peak_clusters(points, valid, torch.tensor([3, 3]))
    for b in range(2):
        real = valid[b]
        pairs = {(int(g), int(c)) for g, c in zip(group[real], assignment[b][real])}
        assert len(pairs) == 3 and len({c for _, c in pairs}) == 3
        cluster = [int(c) for c in assignment[b][real]]
        assert cluster == _naive_clusters(list(points[b][real]), 3)
    # twins, every point a centre: the later twin (no denser than the earlier) keeps a cluster of its own
    twins = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]])
    cluster = density_peak_clusters(twins, torch.ones(1, 3, dtype=torch.bool), torch.tensor([3]))[0].tolist()
    assert cluster == _naive_clusters(list(twins[0]), 3) == [0, 2, 1]


def test_settings_and_bad_settings():
    assert REDUCTION.get("sparsevlm") is SparseVLM
    assert SparseVLM().stages(32) == [Stage(3, 2, 1.0), Stage(7, 6, 1.0), Stage(16, 15, 1.0), Stage(20, 19, 1.0)]
    assert [s.rate_at for s in SparseVLM().stages(4)] == [0, 1, 2]
    assert [s.rate_at for s in SparseVLM().stages(3)] == [0, 1]
    stages = SparseVLM(layers=[0, 1], keep=0.2).stages(3)  # layers 1 and 2 see lambda and lambda^2
    assert (stages[0].keep + stages[1].keep) / 2 == pytest.approx(0.2) and stages[1].keep == pytest.approx(
        stages[0].keep**2)
    with pytest.raises(ValueError, match="3-layer decoder has layers 0 .. 1"):
        SparseVLM(layers=[1, 2]).check(3)
    with pytest.raises(ValueError, match="4-layer decoder has layers 0 .. 2"):
        _model(SparseVLM(layers=[3]))
    with pytest.raises(ValueError, match="distinct, increasing"):
        SparseVLM(layers=[2, 1])
    with pytest.raises(ValueError, match="recycle is a share"):
        SparseVLM(recycle=0.0)
    with pytest.raises(ValueError, match="keep is a share"):
        SparseVLM(keep=1.5)
    with pytest.raises(ValueError, match="without its adaptive count keeps its budget's share: give keep"):
        SparseVLM(adaptive=False)
