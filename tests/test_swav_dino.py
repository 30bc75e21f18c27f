"""SwAV and DINO: Sinkhorn's marginals and stability, the losses against float64 loop references,
DDP equivalence with multi-crop (2 global 16 px + 2 local 8 px crops; 2 gloo ranks x 6 samples vs
1 process x 12), the frozen prototypes / last layer of epoch 0, and bit-identical resume (DINO's
teacher and center, SwAV's queue).

Numbers: in SwAV's regime (B = 256 cosine scores, K = 3000 prototypes, eps 0.05, 3 iterations) the
codes of every sample sum to 1 within 1e-6 (the last Sinkhorn step normalises the samples) and every
prototype's total is within 1% of B/K (measured 0.16%; a plain softmax is off by 490%).
DDP (tolerances of tests/equivalence.py: loss 1e-5, gradients 1e-4 relative, buffers 1e-5/1e-6), measured:
SwAV loss 1e-7 / gradients 3.5e-6; DINO 2.4e-7 / 7.5e-6 with the center and every BN running statistic
(teacher's included) within 1.2e-7; SwAV with a used queue 0 / 6.2e-6, queue rows within 8.7e-7
(the queue moves that step's loss by 1.4%, so it was used).
"""
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ddp import run_distributed
from equivalence import StepWrapper, assert_equivalent, ddp_step, rel_err, single_process_step, snapshot
from helpers import StopAfterEpochs, tiny_data, tiny_trainer
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses import dino_center_update, dino_loss, sinkhorn, swav_loss, teacher_temp_at
from ssl_lightning.methods import DINO, METHODS, SwAV
from ssl_lightning.methods.dino import WeightNormLinear
from ssl_lightning.optim import OptimizerConfig

B_LOCAL, WORLD = 6, 2
TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_chans=3, image_size=16)


# ---- Sinkhorn --------------------------------------------------------------------------------
def sinkhorn_reference(scores, eps, iters):
    """The official distributed_sinkhorn on one process, element by element, in float64."""
    n, k = scores.shape
    q = [[math.exp(float(scores[b, p]) / eps) for b in range(n)] for p in range(k)]  # (K, B)
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[p][b] for p in range(k)) for b in range(n)]
        q = [[q[p][b] / cols[b] / n for b in range(n)] for p in range(k)]
    return torch.tensor([[q[p][b] * n for p in range(k)] for b in range(n)], dtype=torch.float64)


def cosine_scores(n, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


def test_sinkhorn_matches_float64_loop_reference():
    scores = cosine_scores(12, 7, 5)
    for eps, iters in ((0.05, 3), (0.1, 1), (0.03, 5)):
        ref = sinkhorn_reference(scores.double(), eps, iters)
        torch.testing.assert_close(sinkhorn(scores.double(), epsilon=eps, iters=iters), ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(sinkhorn(scores, epsilon=eps, iters=iters).double(), ref, rtol=1e-5, atol=1e-7)


def test_sinkhorn_codes_sum_to_one_and_prototypes_get_equal_mass():
    b, k = 256, 3000
    scores = cosine_scores(b, k, 128)
    codes = sinkhorn(scores, epsilon=0.05, iters=3)
    assert codes.dtype == torch.float32 and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(b), rtol=0, atol=1e-6)
    assert (codes.sum(dim=0) / (b / k) - 1).abs().max() < 0.01
    softmax = F.softmax(scores / 0.05, dim=1)  # negative control: no equipartition
    assert (softmax.sum(dim=0) / (b / k) - 1).abs().max() > 1.0


def test_sinkhorn_is_stable_when_scores_over_epsilon_are_huge():
    """scores / eps ~ 1e4: exp overflows without the max subtraction (inf / inf = NaN)."""
    small = cosine_scores(16, 10, 8)
    scores = 500.0 + small  # float32; 500 / 0.05 = 1e4
    naive = torch.exp(scores / 0.05).T
    naive = naive / naive.sum()
    assert torch.isinf(torch.exp(scores / 0.05)).all() and torch.isnan(naive).all()
    codes = sinkhorn(scores, epsilon=0.05, iters=3)
    assert torch.isfinite(codes).all()
    # Shift invariance: the same codes as for the (exactly representable) shifted-back scores.
    ref = sinkhorn_reference(scores.double() - 500.0, 0.05, 3)
    torch.testing.assert_close(codes.double(), ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(scores, iters=0)


# ---- losses --------------------------------------------------------------------------------
def swav_reference(scores, codes, t):
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            per_sample = [-sum(q[n, k] * torch.log_softmax(s[n] / t, 0)[k] for k in range(s.shape[1]))
                          for n in range(s.shape[0])]
            sub += sum(per_sample) / len(per_sample)
        total += sub / (len(scores) - 1)
    return total / len(codes)


def test_swav_loss_matches_float64_reference():
    scores = [cosine_scores(5, 7, 4, seed=s) for s in range(4)]  # 2 global + 2 local crops
    codes = [sinkhorn(s) for s in scores[:2]]
    for t in (0.1, 0.5):
        ref = swav_reference([s.double() for s in scores], [c.double() for c in codes], t)
        torch.testing.assert_close(swav_loss(scores, codes, temperature=t).double(), ref, rtol=1e-5, atol=1e-6)
    wrong = swav_reference([s.double() for s in scores], [c.double() for c in codes[::-1]], 0.1)  # unswapped
    assert abs(float(swav_loss(scores, codes)) - float(wrong)) > 1e-3


def dino_reference(student, teacher, center, tt, ts):
    terms = []
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            per_sample = []
            for n in range(s.shape[0]):
                target = torch.softmax((t[n] - center[0]) / tt, 0)
                per_sample.append(-sum(target[d] * torch.log_softmax(s[n] / ts, 0)[d] for d in range(s.shape[1])))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms)


def test_dino_loss_and_center_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(5, 9, generator=g) for _ in range(4)]
    teacher = [torch.randn(5, 9, generator=g) for _ in range(2)]
    center = torch.randn(1, 9, generator=g) * 0.1
    for tt in (0.04, 0.07):
        ref = dino_reference([s.double() for s in student], [t.double() for t in teacher], center.double(), tt, 0.1)
        torch.testing.assert_close(dino_loss(student, teacher, center, teacher_temp=tt).double(), ref,
                                   rtol=1e-5, atol=1e-6)
    everything = torch.cat(teacher).double()
    expected = 0.9 * center.double() + 0.1 * everything.mean(dim=0, keepdim=True)
    torch.testing.assert_close(dino_center_update(center, torch.cat(teacher), momentum=0.9).double(), expected,
                               rtol=1e-6, atol=1e-7)


def test_teacher_temperature_follows_the_official_per_epoch_schedule():
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [teacher_temp_at(e, warmup_temp=0.04, final_temp=0.07, warmup_epochs=30) for e in range(100)]
    np.testing.assert_allclose(ours, official, rtol=1e-12)
    assert teacher_temp_at(0, warmup_temp=0.04, final_temp=0.07, warmup_epochs=0) == 0.07


def test_weight_norm_last_layer_matches_torch_weight_norm():
    torch.manual_seed(0)
    layer = WeightNormLinear(6, 11, fixed_gain=True)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 11, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original1.copy_(layer.weight)
        reference.parametrizations.weight.original0.fill_(1.0)  # the official fills the gain with 1
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), reference(x))
    assert not layer.gain.requires_grad and WeightNormLinear(6, 11, fixed_gain=False).gain.requires_grad


def test_registry_and_queue_length_check():
    assert METHODS["swav"] is SwAV and METHODS["dino"] is DINO
    with pytest.raises(ValueError, match="multiple of the global batch_size 256"):
        SwAV(**TINY, num_classes=0, queue_length=3000)


@pytest.fixture
def one_thread():
    """Tiny tensors: 2 intra-op threads on the busy 2-core machine made a tiny fit ~20x slower (11 vs 0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- DDP equivalence -------------------------------------------------------------------------
def make_swav(queue_length: int = 0) -> SwAV:
    torch.manual_seed(0)
    method = SwAV(**TINY, num_classes=0, projector="32-16", num_prototypes=10, batch_size=B_LOCAL * WORLD,
                  queue_length=queue_length, queue_start_epoch=0)
    method.configure_model()
    return method


def make_dino() -> DINO:
    torch.manual_seed(0)
    method = DINO(**TINY, num_classes=0, projector="32-32-16", out_dim=20, use_bn=True)
    method.configure_model()
    with torch.no_grad():
        method.center.normal_(0, 0.1)  # a non-zero center, as after the first steps
    return method


def make_views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = B_LOCAL * WORLD
    return [torch.randn(n, 3, s, s, generator=g) for s in (16, 16, 8, 8)]


def swav_queue_steps(rank: int, world: int) -> dict:
    """3 steps with a queue of 2 global batches: full after step 2, used in step 3. Rank r scores
    slice r of the global queue (here step 1's 12 rows on rank 0, step 2's on rank 1)."""
    method = make_swav(queue_length=2 * B_LOCAL * WORLD)
    model = StepWrapper(method) if world == 1 else DistributedDataParallel(StepWrapper(method))
    for step in range(3):
        method.zero_grad()
        loss = model(*[v.chunk(world)[rank] for v in make_views(seed=step)])
        loss.backward()
    assert method.queues[0].full
    loss = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(loss)
    return snapshot(method, loss / world)


def per_rank_buffer_after_forward(rank: int) -> torch.Tensor:
    """Why the queue is global: DDP (broadcast_buffers=True, Lightning's default) copies rank 0's
    buffers into every rank at each forward, so a per-rank queue buffer would hold rank 0's rows."""
    module = torch.nn.Linear(2, 1)
    module.register_buffer("per_rank", torch.zeros(3))
    model = DistributedDataParallel(module)
    module.per_rank.fill_(rank + 1.0)
    model(torch.ones(1, 2)).sum().backward()
    return module.per_rank.clone()


def all_ddp_steps(rank: int, world: int) -> dict:
    """Every 2-rank run of this file in one spawn (starting processes is the slow part)."""
    return {"swav": ddp_step(rank, world, make_swav, make_views), "dino": ddp_step(rank, world, make_dino, make_views),
            "swav_queue": swav_queue_steps(rank, world), "per_rank_buffer": per_rank_buffer_after_forward(rank)}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_distributed(all_ddp_steps, out_dir=tmp_path_factory.mktemp("ddp"))


@pytest.mark.distributed
def test_swav_ddp_step_equals_single_process(ddp_runs, one_thread):
    assert_equivalent(single_process_step(make_swav, make_views), [r["swav"] for r in ddp_runs])


@pytest.mark.distributed
def test_dino_ddp_step_equals_single_process(ddp_runs, one_thread):
    """Loss, gradients, and the buffers: DINO's center and the BN running statistics of student and
    teacher (backbone and head), all equal to the single process's."""
    ref = single_process_step(make_dino, make_views)
    assert any(n.startswith("teacher.") and n.endswith("running_var") for n in ref["buffers"])
    assert not torch.equal(ref["buffers"]["center"], make_dino().center)  # the step moved it
    assert_equivalent(ref, [r["dino"] for r in ddp_runs])


@pytest.mark.distributed
def test_swav_with_queue_ddp_equals_single_process(ddp_runs, one_thread):
    ref = swav_queue_steps(0, 1)
    assert_equivalent(ref, [r["swav_queue"] for r in ddp_runs])
    without_queue = make_swav()  # the queue changed the step-3 loss: it was used
    for step in range(3):
        loss = without_queue.ssl_step(make_views(seed=step)).loss
    assert rel_err(loss, ref["loss"]) > 1e-4
    assert all(torch.equal(r["per_rank_buffer"], torch.ones(3)) for r in ddp_runs)  # rank 1's rows were lost


# ---- training: frozen epoch 0, bit-identical resume -----------------------------------------
class Track(pl.Callback):
    """Copies of one tensor at the start of training and after every epoch."""

    def __init__(self, get):
        self.get, self.values = get, []

    def on_train_start(self, trainer, pl_module):
        self.values.append(self.get(pl_module).detach().clone())

    def on_train_epoch_end(self, trainer, pl_module):
        self.values.append(self.get(pl_module).detach().clone())


def multicrop_data():
    return tiny_data(views=[ViewConfig(size=16, count=2, scale=(0.4, 1.0)),
                            ViewConfig(size=8, count=2, scale=(0.1, 0.4))], augment="device")  # batched: fast


def fit(build, ckpt_dir, *, stop_after=None, ckpt_path=None, track=None):
    pl.seed_everything(0)
    data = multicrop_data()
    model = build(data)
    trainer = tiny_trainer(ckpt_dir, limit_val_batches=0)  # validation plays no part in the state
    trainer.callbacks += [c for c in (track, StopAfterEpochs(stop_after) if stop_after else None) if c]
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def tiny_kwargs(data) -> dict:
    optimizer = OptimizerConfig(name="lars", lr=0.3, lars_eta=0.02, warmup_epochs=0.5)
    return dict(**{**TINY, "image_size": data.image_size}, num_classes=data.num_classes,
                batch_size=data.hparams.batch_size, optimizer=optimizer)


def build_swav(data) -> SwAV:
    # 128 samples / 32 = 4 steps an epoch: the queue (2 batches) fills in epoch 1 and is used from its 3rd step.
    return SwAV(**tiny_kwargs(data), projector="32-16", num_prototypes=10, queue_length=64, queue_start_epoch=1)


def build_dino(data) -> DINO:
    return DINO(**tiny_kwargs(data), projector="32-32-16", out_dim=20, warmup_teacher_temp_epochs=2,
                base_momentum=0.99)


def assert_resume_is_exact(build, tmp_path, track):
    straight, t_straight = fit(build, tmp_path / "straight", track=track)
    fit(build, tmp_path / "split", stop_after=1)
    resumed, t_resumed = fit(build, tmp_path / "split", ckpt_path="last")
    assert t_resumed.global_step == t_straight.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"state differs after resume: {different}"
    return straight, t_straight


@pytest.mark.slow
def test_swav_prototypes_frozen_in_epoch_0_and_resume_is_exact_with_queue(tmp_path, one_thread):
    track = Track(lambda m: m.prototypes.weight)
    model, trainer = assert_resume_is_exact(build_swav, tmp_path, track)
    assert model.queues[0].full and float(trainer.callback_metrics["train/queue_used"]) == 1.0
    start, after_epoch0, after_epoch1 = track.values
    # Epoch 0: only the per-step row normalisation touched them (measured: exactly normalize(start));
    # epoch 1: the optimizer moved them (measured max |change| 1.4e-3).
    torch.testing.assert_close(after_epoch0, F.normalize(start, dim=1), rtol=0, atol=1e-6)
    assert (after_epoch1 - after_epoch0).abs().max() > 1e-4


@pytest.mark.slow
def test_dino_last_layer_frozen_in_epoch_0_and_resume_is_exact(tmp_path, one_thread):
    track = Track(lambda m: m.projector.last_layer.weight)
    model, _ = assert_resume_is_exact(build_dino, tmp_path, track)
    start, after_epoch0, after_epoch1 = track.values
    assert torch.equal(after_epoch0, start)
    assert (after_epoch1 - after_epoch0).abs().max() > 1e-4  # measured 8.5e-4
    assert torch.equal(model.projector.last_layer.gain, torch.ones_like(model.projector.last_layer.gain))
    assert not torch.equal(model.center, torch.zeros_like(model.center))
