"""The collectives of one training step under 2-rank DDP (gloo), counted per method: a regression shows.

Counted (tests/sync_audit.CollectiveCounter) over 2 steps after 1 warm-up step of the tiny fit of every
method: torch.distributed calls by who issues them, DDP's gradient buckets and buffer broadcast. Expected
per step, for the tiny configs (width-4 convnet: 6 BatchNorm layers per pass; MLP heads; probe):

- GlobalBatchNorm: ONE all_gather per BN forward (count, mean, centred sum of squares fused) and one
  all_reduce in its backward: half of the two all_reduces each way it took before;
- the losses: what the official code gathers (VICReg, Barlow Twins: the two embeddings; SimCLR: the
  views' embeddings; MoCo v3: the keys; MoCo v2: keys + the shuffle-BN permutation; DINO: the center;
  SwAV: Sinkhorn sums), and no size check after the first step;
- DDP: one gradient bucket (25 MB buckets, tiny models) and one buffer broadcast per step;
- PreemptionHandler: one 8-byte all_reduce (its flags, read a step later);
- nothing from Lightning's SIGTERM check (its per-step broadcast is replaced).
"""
import pytest

from sync_audit import TINY_METHODS, count_collectives

pytestmark = pytest.mark.distributed

# per method: {(kind, who): calls per step}; "norm" = GlobalBatchNorm, "bwd" = backward of a gather with grad
BN = "ssl_lightning/models/norm.py forward"
BWD = "backward of a gather/all-reduce with grad"
COMMON = {("all_reduce", "DDP gradient bucket"): 1, ("all_reduce", "ssl_lightning/callbacks/preemption.py flags"): 1}
EXPECTED = {
    "barlow": {("all_gather", BN): 15, ("all_gather", "ssl_lightning/losses/barlow.py cross_correlation"): 2,
               ("all_reduce", BWD): 16},
    "vicreg": {("all_gather", BN): 15, ("all_gather", "ssl_lightning/losses/vicreg.py vicreg_terms"): 2,
               ("all_reduce", BWD): 16},
    "simclr": {("all_gather", BN): 8, ("all_gather", "ssl_lightning/losses/nt_xent.py multiview_nt_xent_loss"): 1,
               ("all_reduce", BWD): 8},
    "mocov2": {("all_gather", "ssl_lightning/methods/mocov2.py encode_keys"): 2,
               ("broadcast", "ssl_lightning/methods/mocov2.py encode_keys"): 1,
               ("all_gather", "ssl_lightning/methods/mocov2.py ssl_step"): 1},
    "dino": {("all_gather", BN): 13, ("all_reduce", "ssl_lightning/losses/dino.py dino_center_update"): 1,
             ("all_reduce", BWD): 6},
}


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    return count_collectives(sorted(TINY_METHODS), tmp_path_factory.mktemp("collectives"), warmup=1, steps=2)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_collectives_per_step(counts, method):
    calls = {key: n for key, n in counts[method]["calls"].items() if key[0] != "_broadcast_coalesced"}
    assert calls == {**COMMON, **EXPECTED[method]}, calls


def test_every_method_steps_without_extra_collectives(counts):
    """For every method: one gradient bucket, one flag all_reduce, at most one DDP buffer broadcast, and no
    collective from Lightning (its per-step SIGTERM broadcast) or from a batch-size check."""
    for method, result in counts.items():
        calls = result["calls"]
        assert calls[("all_reduce", "DDP gradient bucket")] == 1, (method, calls)
        assert calls[("all_reduce", "ssl_lightning/callbacks/preemption.py flags")] == 1, (method, calls)
        assert not [k for k in calls if "pytorch_lightning" in k[1] or "_check_equal_sizes" in k[1]], (method, calls)
        assert sum(n for (kind, _), n in calls.items() if kind == "_broadcast_coalesced") <= 1, (method, calls)
        # GlobalBatchNorm: one all_gather per layer forward, never the two all_reduces of before
        assert not [k for k in calls if k[0] == "all_reduce" and "norm.py" in k[1]], (method, calls)
