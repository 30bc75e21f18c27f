"""MoCo v2 and v3: losses against float64 references and exact values, the step's semantics, DDP
equivalence (2 gloo ranks x 6 samples vs 1 process x 12), the queue-size check, and resume.

Exact values: MoCo v2 with q = k unit and every negative orthogonal to q gives logits
[1/T, 0 x K], loss log(1 + K e^(-1/T)); a queue of K copies of -k gives log(1 + K e^(-2/T)).
MoCo v3 with q = k = b orthonormal rows gives logits I/T, loss 2T (log(e^(1/T) + b - 1) - 1/T).
"""
import inspect
import math
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import ssl_lightning.losses.moco as moco_losses
import ssl_lightning.methods.mocov2 as mocov2_module
from ddp import run_distributed
from equivalence import assert_equivalent, ddp_step, max_grad_error, single_process_step
from helpers import StopAfterEpochs, tiny_data, tiny_trainer
from ssl_lightning.distributed import batch_shuffle
from ssl_lightning.losses import mocov2_loss, mocov3_loss
from ssl_lightning.methods import METHODS, MoCoV2, MoCoV3, SSLMethod
from ssl_lightning.optim import OptimizerConfig

B_LOCAL, WORLD, QUEUE = 6, 2, 24  # the queue holds 2 global batches of 12


# ---- losses --------------------------------------------------------------------------------
def mocov2_reference(q, k, queue, t):
    """Per query: -log softmax of [q.k, q.queue_1 .. q.queue_K] / t at index 0, in float64."""
    losses = []
    for qi, ki in zip(q.double(), k.double()):
        qi, ki = qi / qi.norm(), ki / ki.norm()
        logits = torch.stack([qi @ ki] + [qi @ n for n in queue.double()]) / t
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def mocov3_reference(q, k, t):
    """Per query i: -log softmax_j(q_i.k_j / t) at j = i, mean, times 2t, in float64."""
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    losses = []
    for i in range(len(qn)):
        logits = torch.stack([qn[i] @ kj for kj in kn]) / t
        losses.append(torch.logsumexp(logits, 0) - logits[i])
    return torch.stack(losses).mean() * 2 * t


def test_mocov2_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    for t in (0.2, 0.07):
        torch.testing.assert_close(mocov2_loss(q, k, queue, temperature=t).double(), mocov2_reference(q, k, queue, t),
                                   rtol=1e-5, atol=1e-6)


def test_mocov2_loss_exact_values():
    t, eye = 0.2, torch.eye(8)
    # q_i = k_i = e_i (i < 3); negatives e_3 .. e_7 orthogonal to every query: log(1 + 5 e^(-5))
    loss = mocov2_loss(eye[:3], eye[:3], eye[3:], temperature=t)
    assert loss.item() == pytest.approx(math.log1p(5 * math.exp(-1 / t)), rel=1e-6)
    # a queue of 16 copies of the negated key: log(1 + 16 e^(-10)) = 7.26e-4
    k = eye[:1]
    loss = mocov2_loss(3 * k, k, -k.repeat(16, 1), temperature=t)  # the query's norm does not matter
    # (absolute tolerance: the loss is lse - 5 with lse near 5, where a float32 step is 4.8e-7)
    assert loss.item() == pytest.approx(math.log1p(16 * math.exp(-2 / t)), abs=1e-6)


def test_mocov3_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    for t in (1.0, 0.2):
        torch.testing.assert_close(mocov3_loss(q, k, temperature=t).double(), mocov3_reference(q, k, t),
                                   rtol=1e-5, atol=1e-6)


def test_mocov3_loss_exact_value_for_orthonormal_keys():
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0][:4]  # 4 orthonormal rows
    for t in (1.0, 0.2):  # t = 1: 2 (log(e + 3) - 1) = 1.4873
        expected = 2 * t * (math.log(math.exp(1 / t) + 3) - 1 / t)
        assert mocov3_loss(q, q, temperature=t).item() == pytest.approx(expected, rel=1e-5)
    assert mocov3_loss(q, q, temperature=1.0).item() == pytest.approx(1.48734, abs=1e-5)


def test_no_gradient_reaches_the_keys():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    (mocov2_loss(q, k, F.normalize(torch.randn(8, 8), dim=1)) + mocov3_loss(q, k)).backward()
    assert k.grad is None and q.grad is not None and q.grad.abs().sum() > 0


# ---- the methods on one process --------------------------------------------------------------
def make_mocov2(sync_bn: bool = True, shuffle_bn: bool = False, symmetric: bool = False) -> MoCoV2:
    torch.manual_seed(0)
    method = MoCoV2(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", queue_size=QUEUE,
                    sync_bn=sync_bn, shuffle_bn=shuffle_bn, symmetric=symmetric, in_chans=3, image_size=12,
                    num_classes=0)
    method.configure_model()
    return method


def make_mocov2_symmetric() -> MoCoV2:
    return make_mocov2(symmetric=True)


def make_mocov2_paper() -> MoCoV2:
    """The paper's setting: per-rank BatchNorm, Shuffling BN on."""
    return make_mocov2(sync_bn=False, shuffle_bn=True)


def make_mocov2_shuffle_eval_teacher() -> MoCoV2:
    """Shuffling BN with the key encoder in eval mode: a key no longer depends on its BN batch. Its BN
    running statistics are first set to those of all 24 images (at their initial values every key
    would point the same way and a wrong order would go unnoticed)."""
    method = make_mocov2_paper()
    for module in method.teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    with torch.no_grad():
        method.teacher["backbone"](torch.cat(make_views()))
    method.teacher.eval()
    return method


def make_mocov3() -> MoCoV3:
    torch.manual_seed(0)
    method = MoCoV3(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", predictor="32-16",
                    temperature=0.2, in_chans=3, image_size=12, num_classes=0)
    method.configure_model()
    return method


def make_views() -> list[torch.Tensor]:
    """Two views of 12 samples with per-sample brightness and contrast, so that keys differ."""
    g = torch.Generator().manual_seed(1)
    n = B_LOCAL * WORLD
    return [torch.randn(n, 3, 12, 12, generator=g) * (0.2 + 2 * torch.rand(n, 1, 1, 1, generator=g))
            + torch.randn(n, 3, 1, 1, generator=g) for _ in range(2)]


def defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items() if name != "kwargs"}


def test_registry_defaults_and_heads():
    assert METHODS["mocov2"] is MoCoV2 and METHODS["mocov3"] is MoCoV3
    assert defaults(MoCoV2) == {"projector": "2048-128", "temperature": 0.2, "queue_size": 65536, "shuffle_bn": True,
                                "symmetric": False, "base_momentum": 0.999, "final_momentum": 0.999, "sync_bn": False}
    assert defaults(MoCoV3) == {"projector": "4096-256", "predictor": "4096-256", "predictor_last_norm": False,
                                "temperature": 1.0, "base_momentum": 0.99, "final_momentum": 1.0}
    assert inspect.signature(SSLMethod).parameters["sync_bn"].default is True  # MoCo v3 inherits global BN
    v2, v3 = make_mocov2(), make_mocov3()
    # MoCo v2 head: Linear-ReLU-Linear with biases, no BN; MoCo v3: affine-free BN after the projector only
    assert [type(m).__name__ for m in v2.projector] == ["Linear", "ReLU", "Linear"]
    assert v2.projector[-1].bias is not None
    assert type(v3.projector[-1]).__name__.endswith("BatchNorm") and not v3.projector[-1].affine
    assert type(v3.predictor[-1]).__name__ == "Linear" and v3.predictor[-1].bias is None
    assert set(v3.teacher) == {"backbone", "projector"}
    # the key encoders stay frozen after configure_model swaps in GlobalBatchNorm (else DDP never reduces)
    assert not any(p.requires_grad for m in (v2, v3) for p in m.teacher.parameters())
    with pytest.raises(ValueError, match="set shuffle_bn: false"):
        make_mocov2(sync_bn=True, shuffle_bn=True)


def test_symmetric_step_scores_each_view_against_its_own_queue():
    """loss = (l(q1, k2, queue_0) + l(q2, k1, queue_1)) / 2 with the queues as they were before the
    step; then queue_0 holds k2 and queue_1 holds k1 in rows 0..11 and both pointers are at 12."""
    method = make_mocov2_symmetric()
    v1, v2 = make_views()
    before = [queue.features.clone() for queue in method.queues]
    loss = method.ssl_step([v1, v2]).loss
    with torch.no_grad():
        k1, k2 = (F.normalize(method.teacher["projector"](method.teacher["backbone"](v)), dim=1) for v in (v1, v2))
        q1, q2 = (method.projector(method.backbone(v)) for v in (v1, v2))
    expected = (mocov2_loss(q1, k2, before[0]) + mocov2_loss(q2, k1, before[1])) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(method.queues[0].features[:12], k2)
    torch.testing.assert_close(method.queues[1].features[:12], k1)
    torch.testing.assert_close(method.queues[0].features[12:], before[0][12:])
    assert [int(q.ptr) for q in method.queues] == [12, 12]


@pytest.mark.slow
def test_indivisible_queue_size_is_rejected_at_fit_start(tmp_path):
    data = tiny_data()  # global batch 32
    method = MoCoV2(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", queue_size=48,
                    batch_size=data.hparams.batch_size, in_chans=data.channels, image_size=data.image_size)
    with pytest.raises(ValueError, match="queue_size 48 is not divisible by the global batch size 32.*e.g. 32"):
        tiny_trainer(tmp_path).fit(method, data)


# ---- DDP: one spawn runs every scenario --------------------------------------------------------
def ddp_scenarios(rank: int, world: int) -> dict:
    out = {"v2": ddp_step(rank, world, make_mocov2, make_views),
           "v2_symmetric": ddp_step(rank, world, make_mocov2_symmetric, make_views),
           "v3": ddp_step(rank, world, make_mocov3, make_views),
           "v2_shuffle_eval_teacher": ddp_step(rank, world, make_mocov2_shuffle_eval_teacher, make_views)}
    with mock.patch.object(mocov2_module, "batch_unshuffle", lambda k, index: k):  # negative control
        out["v2_shuffle_without_unshuffle"] = ddp_step(rank, world, make_mocov2_shuffle_eval_teacher, make_views)
    with mock.patch.object(moco_losses, "rank", lambda: 0):  # negative control: labels without rank offset
        out["v3_labels_without_offset"] = ddp_step(rank, world, make_mocov3, make_views)
    perms = []

    def recording_shuffle(x):
        shuffled, unshuffle_index = batch_shuffle(x)
        perms.append(torch.argsort(unshuffle_index))
        return shuffled, unshuffle_index

    with mock.patch.object(mocov2_module, "batch_shuffle", recording_shuffle):
        out["v2_paper"] = ddp_step(rank, world, make_mocov2_paper, make_views)
    out["v2_paper"]["perm"] = perms[0]
    return out


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_distributed(ddp_scenarios, out_dir=tmp_path_factory.mktemp("moco_ddp"))


@pytest.mark.distributed
def test_mocov3_step_equals_single_process(ddp_results):
    """Loss within rel. 1e-5, every gradient within rel. 1e-4, BN running stats of both encoders
    equal. Control: labels arange(b) without the b*rank offset point rank 1's queries at rank 0's
    keys and move the gradients far beyond the tolerance."""
    ref = single_process_step(make_mocov3, make_views)
    assert_equivalent(ref, [r["v3"] for r in ddp_results])
    assert any(k.startswith("teacher.") and "running_mean" in k for k in ref["buffers"])
    assert max_grad_error([r["v3_labels_without_offset"] for r in ddp_results], ref) > 1e-2


@pytest.mark.distributed
@pytest.mark.parametrize("name, make_method", [("v2", make_mocov2), ("v2_symmetric", make_mocov2_symmetric)])
def test_mocov2_with_global_bn_equals_single_process(ddp_results, name, make_method):
    """With sync_bn and no shuffle the step is equivalent: loss, gradients, BN stats, and the queue
    after the step (keys gathered in rank order = the single process's order), pointer at 12."""
    ref = single_process_step(make_method, make_views)
    ranks = [r[name] for r in ddp_results]
    assert_equivalent(ref, ranks)
    for r in ranks:
        assert all(int(r["buffers"][f"queues.{i}.ptr"]) == 12 for i in range(len(make_method().queues)))


@pytest.mark.distributed
def test_shuffle_bn_returns_each_rank_its_own_keys(ddp_results):
    """With Shuffling BN a step cannot equal the single-process step: each rank's key-encoder BN
    normalises a random half of the global batch, so keys depend on which samples share a rank.
    With the key encoder in eval mode a key depends on its sample alone, so unshuffle(shuffle(x))
    must give the single process's queue exactly. Control: skipping the unshuffle leaves the keys
    in shuffled order, which fails the same check (so the shuffle really mixes the ranks)."""
    ref = single_process_step(make_mocov2_shuffle_eval_teacher, make_views)
    queue = ref["buffers"]["queues.0.features"]
    for r in ddp_results:
        torch.testing.assert_close(r["v2_shuffle_eval_teacher"]["buffers"]["queues.0.features"], queue)
        broken = r["v2_shuffle_without_unshuffle"]["buffers"]["queues.0.features"]
        assert (broken[:12] - queue[:12]).abs().max() > 0.1


@pytest.mark.distributed
def test_shuffle_bn_queue_holds_the_global_batch_in_rank_order(ddp_results):
    """The paper's setting (per-rank BN in train mode, shuffled): both ranks hold the same queue, and
    row i is the key of global sample i as computed in the BN batch the recorded permutation sent it
    to. Keys computed in the unshuffled per-rank batches differ, which is why no equivalence holds."""
    perm = ddp_results[0]["v2_paper"]["perm"]
    assert torch.equal(perm, ddp_results[1]["v2_paper"]["perm"]) and not torch.equal(perm, torch.arange(12))
    teacher = make_mocov2_paper().teacher
    x = make_views()[1]  # keys come from view 2

    def keys_in_batches(batches):
        keys = torch.empty(12, 16)
        with torch.no_grad():
            for idx in batches:
                keys[idx] = F.normalize(teacher["projector"](teacher["backbone"](x[idx])), dim=1)
        return keys

    queues = [r["v2_paper"]["buffers"]["queues.0.features"] for r in ddp_results]
    assert torch.equal(queues[0], queues[1])
    torch.testing.assert_close(queues[0][:12], keys_in_batches(perm.view(WORLD, -1)), rtol=1e-5, atol=1e-6)
    assert (queues[0][:12] - keys_in_batches(torch.arange(12).view(WORLD, -1))).abs().max() > 1e-3


# ---- resume ------------------------------------------------------------------------------------


def fit_mocov2(ckpt_dir, *, stop_after=None, ckpt_path=None) -> tuple[MoCoV2, pl.Trainer]:
    pl.seed_everything(0)
    data = tiny_data()  # 128 samples, batch 32: 4 steps per epoch; the queue of 64 wraps every 2 steps
    method = MoCoV2(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", queue_size=64,
                    base_momentum=0.99, final_momentum=0.999,  # a schedule that depends on the global step
                    optimizer=OptimizerConfig(name="sgd", lr=0.3, weight_decay=1e-4, warmup_epochs=0.5),
                    num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                    batch_size=data.hparams.batch_size)
    trainer = tiny_trainer(ckpt_dir)
    if stop_after:
        trainer.callbacks.append(StopAfterEpochs(stop_after))
    trainer.fit(method, data, ckpt_path=ckpt_path)
    return method, trainer


@pytest.mark.slow
def test_mocov2_resume_gives_identical_queue_and_key_encoder(tmp_path):
    """2 epochs straight == 1 epoch + resume from last.ckpt: bit-identical state dict, queue rows,
    pointer and key encoder included."""
    straight, t_straight = fit_mocov2(tmp_path / "straight")
    fit_mocov2(tmp_path / "split", stop_after=1)
    resumed, t_resumed = fit_mocov2(tmp_path / "split", ckpt_path="last")
    assert t_resumed.global_step == t_straight.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert {"queues.0.features", "queues.0.ptr", "teacher.backbone.features.0.weight"} <= a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"state differs after resume: {different}"
    assert int(a["queues.0.ptr"]) == 0 and int(a["queues.0.filled"]) == 64  # 8 pushes of 32 rows wrapped
    assert not torch.equal(a["teacher.backbone.features.0.weight"], a["backbone.features.0.weight"])
