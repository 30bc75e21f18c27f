"""A VICReg step on 2 gloo ranks (b samples each) == 1 process on the 2b concatenated samples.

Loss (mean over ranks) within rel. 1e-5, every parameter gradient within rel. 1e-4, BN running
stats equal. Negative controls show the check can fail: per-rank BatchNorm, or a gather that
drops gradients, both move the gradients far beyond the tolerance.
"""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from ddp import run_distributed
from equivalence import StepWrapper, max_grad_error, rel_err, snapshot
from ssl_lightning.methods import VICReg

pytestmark = pytest.mark.distributed
B_LOCAL, WORLD = 6, 2


def make_method(sync_bn: bool = True) -> VICReg:
    torch.manual_seed(0)
    method = VICReg(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-32-16", sync_bn=sync_bn,
                    in_chans=3, image_size=12, num_classes=0)
    method.configure_model()
    return method


def make_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B_LOCAL * WORLD, 3, 12, 12, generator=g), torch.randn(B_LOCAL * WORLD, 3, 12, 12, generator=g)


def single_process_step(sync_bn: bool = True):
    method = make_method(sync_bn)
    v1, v2 = make_views()
    loss = method.ssl_step([v1, v2]).loss
    loss.backward()
    return snapshot(method, loss)


def ddp_step(rank, world, sync_bn=True, break_gather=False):
    if break_gather:  # a gather without gradient: the 1/W bug of the official Barlow Twins code
        import ssl_lightning.losses.vicreg as vic
        from ssl_lightning.distributed import gather_no_grad
        vic.gather_with_grad = lambda x: torch.cat([x if i == rank else t for i, t in
                                                    enumerate(gather_no_grad(x).chunk(world))])
    method = make_method(sync_bn)
    v1, v2 = make_views()
    shard = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    model = DistributedDataParallel(StepWrapper(method))
    loss = model(v1[shard], v2[shard])
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    return snapshot(method, mean_loss / world)


def test_vicreg_step_equals_single_process(tmp_path):
    ref = single_process_step()
    ranks = run_distributed(ddp_step, out_dir=tmp_path)
    for r in ranks:
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5
        assert set(r["grads"]) == set(ref["grads"])
        for name, b in ref["buffers"].items():
            torch.testing.assert_close(r["buffers"][name], b, rtol=1e-5, atol=1e-6)
    assert max_grad_error(ranks, ref) <= 1e-4


def test_negative_controls_fail_the_tolerance(tmp_path):
    ref = single_process_step()
    (tmp_path / "local_bn").mkdir(), (tmp_path / "no_grad").mkdir()
    local_bn = run_distributed(ddp_step, False, out_dir=tmp_path / "local_bn")
    assert max_grad_error(local_bn, ref) > 1e-2, "per-rank BatchNorm should not match the global-batch step"
    no_grad_gather = run_distributed(ddp_step, True, True, out_dir=tmp_path / "no_grad")
    assert max_grad_error(no_grad_gather, ref) > 1e-2, "a gradient-free gather should not match"
