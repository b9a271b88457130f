"""SwAV's math against hand-worked examples and independent re-derivations of the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import torchrun

from swav.loss import swav_loss
from swav.models import SwAVModel, build_trunk
from swav.optim import LARS
from swav.queue import EmbeddingQueue, local_queue_length
from swav.schedules import warmup_cosine
from swav.sinkhorn import sinkhorn


def reference_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The reference's loop, literally, in float64 (fine for the moderate scores used here)."""
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_equal_scores_give_uniform_assignments():
    q = sinkhorn(torch.full((6, 5), 0.3))
    assert torch.allclose(q, torch.full((6, 5), 0.2), atol=1e-7)


def test_sinkhorn_matches_the_reference_loop_and_rows_sum_to_one():
    torch.manual_seed(0)
    scores = torch.rand(16, 10) * 2 - 1
    q = sinkhorn(scores, 0.5, 3)
    assert torch.allclose(q.double(), reference_sinkhorn(scores, 0.5, 3), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(16), atol=1e-5)


def test_sinkhorn_is_invariant_to_constant_shifts():
    torch.manual_seed(1)
    s = torch.rand(8, 6) * 2 - 1
    base = sinkhorn(s)
    assert torch.allclose(sinkhorn(s + 0.7), base, atol=1e-6)
    shifted = s.clone()
    shifted[:, 2] += 0.4  # one prototype's scores: absorbed by the row normalisation
    assert torch.allclose(sinkhorn(shifted, iterations=3), sinkhorn(s, iterations=3), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sinkhorn_is_finite_for_any_finite_input(dtype):
    torch.manual_seed(2)
    s = (torch.rand(64, 3000) * 2 - 1).to(dtype)
    for eps in (0.05, 0.03, 0.01):
        q = sinkhorn(s, eps)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    extreme = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    assert torch.isfinite(sinkhorn(extreme, 0.03)).all()


def test_two_rank_sinkhorn_equals_one_process_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(3)
    scores = torch.rand(12, 7) * 2 - 1
    torch.save(scores, tmp_path / "scores.pt")
    r = torchrun(2, "tests/dist/sinkhorn_ranks.py", str(tmp_path), module=False)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = [torch.load(tmp_path / f"q{rank}.pt") for rank in range(2)]
    assert torch.allclose(torch.cat(parts), sinkhorn(scores), atol=1e-6)


def loop_loss(scores, b, assign, t, eps, iters, queue=None):
    """An explicit double loop over crops, written from the paper's equations."""
    n = scores.shape[0] // b
    total = 0.0
    for i, c in enumerate(assign):
        s = scores[c * b:(c + 1) * b].double()
        if queue is not None:
            s = torch.cat([queue[i].double(), s])
        q = reference_sinkhorn(s, eps, iters)[-b:]
        sub = 0.0
        for v in range(n):
            if v == c:
                continue
            p = torch.softmax(scores[v * b:(v + 1) * b].double() / t, dim=1)
            for row in range(b):
                sub += -(q[row] * p[row].log()).sum() / b
        total += sub / (n - 1)
    return total / len(assign)


def test_loss_is_ln_k_for_equal_scores():
    k = 3000
    assert math.isclose(float(swav_loss(torch.zeros(8 * 4, k), 4)), math.log(k), rel_tol=1e-6)
    assert math.isclose(math.log(3000), 8.0064, abs_tol=1e-4)


def test_loss_matches_an_explicit_double_loop_with_and_without_queue():
    torch.manual_seed(4)
    b, k = 5, 9
    scores = torch.rand(6 * b, k) * 2 - 1
    got = swav_loss(scores, b, (0, 1), 0.1, 0.5, 3)
    assert math.isclose(float(got), float(loop_loss(scores, b, (0, 1), 0.1, 0.5, 3)), rel_tol=1e-5)
    queue = [torch.rand(10, k) * 2 - 1, torch.rand(10, k) * 2 - 1]
    got_q = swav_loss(scores, b, (0, 1), 0.1, 0.5, 3, queue_scores=queue)
    assert math.isclose(float(got_q), float(loop_loss(scores, b, (0, 1), 0.1, 0.5, 3, queue)), rel_tol=1e-5)
    assert not math.isclose(float(got_q), float(got), rel_tol=1e-4), "the queue must change the assignments"


def test_loss_gradient_flows_to_scores_only_through_the_prediction():
    torch.manual_seed(5)
    s = (torch.rand(4 * 3, 6) * 2 - 1).requires_grad_()
    swav_loss(s, 3, (0,)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_lars_step_matches_a_hand_computation():
    w0 = torch.tensor([[3.0, 4.0]])          # ||w|| = 5
    g0 = torch.tensor([[0.6, 0.8]])          # ||g|| = 1
    lr, wd, trust, mom = 0.5, 0.1, 0.01, 0.9
    w = w0.clone().requires_grad_()
    opt = LARS([w], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=trust)
    w.grad = g0.clone()
    opt.step()
    adaptive = trust * 5 / (1 + wd * 5 + 1e-8)
    d = (g0 + wd * w0) * adaptive
    expected1 = w0 - lr * d
    assert torch.allclose(w.detach(), expected1, atol=1e-7)
    assert torch.equal(w.grad, g0), "the optimizer never edits p.grad"
    w.grad = g0.clone()
    opt.step()
    wn = expected1.norm().item()
    d2 = (g0 + wd * expected1) * (trust * wn / (1 + wd * wn + 1e-8))
    expected2 = expected1 - lr * (mom * d + d2)
    assert torch.allclose(w.detach(), expected2, atol=1e-6)


def test_lars_clip_and_exclusion():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0], requires_grad=True)
    opt = LARS([w, b], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=1.0, clip=True,
               exclude_bias_and_bn=True)
    w.grad = torch.tensor([0.6, 0.8])
    b.grad = torch.tensor([1.0, 1.0])
    opt.step()
    # clip: adaptive = min(trust*5/1 / lr, 1) = 1 -> plain SGD step for w; b is not adapted at all.
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.06, 4.0 - 0.08]))
    assert torch.allclose(b.detach(), torch.tensor([0.9, 0.9]))


@pytest.mark.parametrize("name,params,width", [("resnet50", 23_508_032, 2048), ("resnet50w2", 93_907_072, 4096),
                                               ("resnet50w4", 375_378_176, 8192), ("resnet50w5", 586_450_240, 10240)])
def test_trunk_parameter_counts_equal_the_reference(name, params, width):
    with torch.device("meta"):
        trunk = build_trunk(name)
    assert sum(p.numel() for p in trunk.parameters()) == params
    assert trunk.out_dim == width


def test_resnet50_trunk_loads_into_torchvision_strictly():
    trunk = build_trunk("resnet50")
    tv = torchvision.models.resnet50()
    state = {**trunk.state_dict(), "fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias}
    tv.load_state_dict(state, strict=True)
    tv.fc = torch.nn.Identity()
    trunk.eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(trunk(x), tv(x), atol=1e-5)


def test_model_forward_shapes_normalisation_and_fp32_under_bf16_autocast():
    torch.manual_seed(6)
    model = SwAVModel("resnet50w0.0625", hidden_mlp=32, feat_dim=16, num_prototypes=[20, 30])
    assert isinstance(model.projection_head[1], torch.nn.BatchNorm1d)
    model.normalize_prototypes()
    for w in model.prototype_weights():
        assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-6)
    crops = [torch.randn(2 * 3, 3, 32, 32), torch.randn(4 * 3, 3, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, scores = model(crops)
        loss = swav_loss(scores[0], 3)
    assert emb.shape == (18, 16) and emb.dtype == torch.float32
    assert [s.shape for s in scores] == [(18, 20), (18, 30)] and all(s.dtype == torch.float32 for s in scores)
    assert torch.allclose(emb.norm(dim=1), torch.ones(18), atol=1e-5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.prototype_weights()[0].dtype == torch.float32


def test_reference_hidden_sizes():
    assert SwAVModel("resnet50w0.0625").projection_head[0].out_features == 128
    with torch.device("meta"):
        assert SwAVModel("resnet50").projection_head[0].out_features == 2048
        assert SwAVModel("resnet50w2").projection_head[0].out_features == 8192
        assert SwAVModel("resnet50w5").projection_head[0].out_features == 10240


def test_queue_length_and_fifo():
    assert local_queue_length(3840, 64, 4) == 3840 // 4
    assert local_queue_length(1000, 64, 4) == 768 // 4     # rounded down to a multiple of the global batch
    q = EmbeddingQueue(2, 6, 3)
    for step in range(3):
        for i in range(2):
            q.push(i, torch.full((2, 3), float(step * 10 + i)))
    assert q.full
    assert q.rows[0, :, 0].tolist() == [20, 20, 10, 10, 0, 0]  # newest first
    assert q.rows[1, :2, 0].tolist() == [21, 21]


def test_schedule_warmup_then_cosine():
    lr = warmup_cosine(4.8, 0.0048, 100, 10, 0.3)
    assert len(lr) == 100 and lr[0] == pytest.approx(0.3)
    assert lr[10] == pytest.approx(4.8) and lr[-1] > 0.0048 and lr[-1] < 0.01
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_checkpoint_names_are_data_never_paths(tmp_path):
    from swav.checkpoint import local_path, safe_parts
    from swav_io.errors import UserError

    root = tmp_path / "stage"
    root.mkdir()
    assert local_path(str(root), "rank00000/ds/mp_rank_00_model_states.pt") == \
        str(root / "rank00000" / "ds" / "mp_rank_00_model_states.pt")
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\\..\\x", "a//b", "./a", "a/.", "", "a\0b", None, 3):
        with pytest.raises(UserError, match="refusing the file name|not a non-empty string"):
            safe_parts(bad, "manifest")
    # A link inside the staging folder that points out of it is not a way out either.
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(UserError, match="leads outside"):
        local_path(str(root), "out/x")
