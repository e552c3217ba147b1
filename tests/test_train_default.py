"""The default model's training script: the auxiliary attribute targets and heads."""

import dataclasses

import pytest
import torch

from indexer.train_default import ATTRIBUTE_CLASSES, AttributeHead, FeatureHead, attribute_targets
from indexer.world import feature_matrix, generate


def test_attribute_targets_name_each_image_s_classes_with_position_in_thirds():
    attrs = [a for _, a in generate(40, seed=6)]
    edges = [dataclasses.replace(attrs[0], x=0.2, y=0.9), dataclasses.replace(attrs[1], x=0.5, y=0.1)]
    targets = attribute_targets(attrs + edges)
    names = list(ATTRIBUTE_CLASSES)
    for a, row in zip(attrs, targets.tolist()):
        named = {n: ATTRIBUTE_CLASSES[n][k] for n, k in zip(names, row)}
        assert (named["shape"], named["colour"], named["size"]) == (a.shape, a.colour, a.size)
        assert (named["filled"], named["count"], named["background"]) == (a.filled, a.count, a.background)
        assert named["quality"] == a.quality
    column, row = names.index("column"), names.index("row")
    assert targets[-2, column] == 0 and targets[-2, row] == 2  # left, bottom
    assert targets[-1, column] == 1 and targets[-1, row] == 0  # middle, top


@pytest.mark.parametrize("cosine_scale", [0.0, 10.0])
def test_attribute_head_loss_is_the_mean_cross_entropy_over_attributes(cosine_scale):
    torch.manual_seed(0)
    head = AttributeHead(8, cosine_scale)
    embeddings = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    targets = attribute_targets([a for _, a in generate(5, seed=1)])
    weight = head.linear.weight
    if cosine_scale:
        weight = cosine_scale * weight / weight.norm(dim=1, keepdim=True)
    logits = embeddings @ weight.T + head.linear.bias
    expected, start = [], 0
    for k, classes in enumerate(ATTRIBUTE_CLASSES.values()):
        part = logits[:, start : start + len(classes)]
        expected.append(-torch.log_softmax(part, dim=1)[torch.arange(5), targets[:, k]].mean())
        start += len(classes)
    assert torch.allclose(head.loss(embeddings, targets), torch.stack(expected).mean())


def test_feature_head_reads_standardised_features_along_orthonormal_directions_at_its_scale():
    torch.manual_seed(0)
    features = feature_matrix([a for _, a in generate(60, seed=2)])
    features_t = torch.tensor(features, dtype=torch.float32)
    head = FeatureHead(40, features_t, scale=0.2)
    directions, bias = head.readout.weight.detach(), head.readout.bias.detach()
    assert torch.allclose(directions @ directions.T, torch.eye(features.shape[1]), atol=1e-5)
    standardised = torch.tensor((features - features.mean(0)) / features.std(0), dtype=torch.float32)
    exact = (0.2 * standardised - bias) @ directions  # reads back exactly 0.2 * standardised
    aside = torch.randn(60, 40)
    aside -= aside @ directions.T @ directions  # orthogonal to every read-out direction: invisible to the loss
    assert head.loss(exact + aside, features_t).item() < 1e-8
    embeddings = torch.nn.functional.normalize(torch.randn(60, 40), dim=-1)
    reference = ((embeddings @ directions.T + bias - 0.2 * standardised) ** 2).mean() / 0.04
    assert torch.allclose(head.loss(embeddings, features_t), reference, rtol=1e-5)
