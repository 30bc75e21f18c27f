"""The online probe: unlabelled samples carry no loss, and no batch composition is a special case."""
import torch
import torch.nn.functional as F

from ssl_lightning.models.probe import LinearProbe


def test_unlabelled_samples_have_no_influence():
    torch.manual_seed(0)
    probe = LinearProbe(8, 3)
    feats, labels = torch.randn(6, 8), torch.tensor([0, 2, -1, 1, -1, 0])
    loss, logits, kept = probe.loss(feats, labels)
    expected = F.cross_entropy(probe(feats)[labels >= 0], labels[labels >= 0])
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (4, 3) and kept.tolist() == [0, 2, 1, 0]


def test_batches_with_zero_or_one_label_train_without_error():
    probe = LinearProbe(8, 3)
    for labels in (torch.full((5,), -1), torch.tensor([-1, -1, 2, -1, -1])):
        loss, logits, _ = probe.loss(torch.randn(5, 8), labels)
        loss.backward()
        assert torch.isfinite(loss) and len(logits) == int((labels >= 0).sum())
    assert probe.linear.weight.grad is not None


def test_features_are_detached():
    feats = torch.randn(4, 8, requires_grad=True)
    LinearProbe(8, 3).loss(feats, torch.tensor([0, 1, 2, 0]))[0].backward()
    assert feats.grad is None
