"""No host-device synchronisation in the steady-state training step of any method (tests/sync_audit.py).

For every method in the registry, 8 steps of a tiny fit after 2 warm-up steps, with the CLI's default
callbacks, the online probe, logging every 4 steps and an epoch end (validation, spectrum and kNN
monitors, checkpoint) inside the window: the plain steps must make 0 calls that would synchronise on a
GPU; any site that does fails the test and names its line. ssl_lightning/spectral.py's checks run as on
an accelerator (CHECKS "deferred"): on a CPU they raise at once, which reads the flag, and costs nothing
there.
"""
import pytest
import torch

from sync_audit import TINY_METHODS, AuditReport, SyncAudit, audit_fit, sync_kind
from ssl_lightning import spectral
from ssl_lightning.methods import METHODS



def test_every_registered_method_is_audited():
    assert set(TINY_METHODS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_per_step_synchronisation(method, monkeypatch):
    monkeypatch.setattr(spectral, "CHECKS", "deferred")  # what an accelerator runs
    report = audit_fit(method)
    print(report.describe())
    assert report.per_step_total == 0, f"{method} synchronises every step:\n{report.describe()}"
    # the periodic work is there and counted: checkpoint, monitors and logging in the window
    kinds = {kind for kind, _ in report.periodic}
    assert {"torch.save", "item"} <= kinds, report.describe()


def test_the_audit_sees_what_it_must():
    """Negative control: each kind of synchronising call made inside a step is counted, with its line."""
    audit = SyncAudit()
    x = torch.randn(4, requires_grad=True)
    mask = x > 0
    with audit:
        audit.step = 0
        x.sum().item()
        bool(x.sum() > 0)
        x[mask.detach()]
        torch.nonzero(x)
        torch.tensor([1.0, 2.0], device=x.device)
        torch.unique(x.detach())
        host = torch.tensor([1.0])
        host.to(x.device)  # a host tensor to the device: a blocking copy on CUDA
        float(host)  # ... but reading a host tensor is free
        x.detach().cpu()
    kinds = [kind for _, kind, _ in audit.events]
    assert kinds == ["item", "bool", "bool_mask_index", "nonzero", "tensor(device=)", "unique", "to(device)",
                     "cpu"], kinds
    assert all("tests/test_sync_audit.py" in site for _, _, site in audit.events), audit.events
    # per step: the mean over the plain steps; periodic: what special steps add, per 100 steps
    a, b = ("item", "a.py:1"), ("item", "b.py:2")
    report = AuditReport.from_events([(0, *a), (1, *a), (2, *a), (2, *b), (2, *b)], [0, 1, 2], special={2})
    assert report.per_step == {a: 1.0} and report.periodic == {b: pytest.approx(200 / 3)}
    assert sync_kind(torch.Tensor.to, (x, torch.float64), {}, audit.host) is None, "a dtype cast is no sync"


def test_a_per_step_sync_fails_the_audit(monkeypatch):
    """A .item() put back into the training step is reported as per-step, at its line."""
    from ssl_lightning.methods import VICReg

    ssl_step = VICReg.ssl_step

    def with_item(self, views):
        out = ssl_step(self, views)
        out.loss.item()
        return out

    monkeypatch.setattr(VICReg, "ssl_step", with_item)
    report = audit_fit("vicreg", steps=6)
    [(kind, site)] = report.per_step
    assert kind == "item" and report.per_step_total == 1.0, report.describe()
    assert site.startswith(f"tests/test_sync_audit.py:{with_item.__code__.co_firstlineno + 2} (with_item) <- "
                           "ssl_lightning/methods/base.py:"), site
