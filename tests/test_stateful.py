"""Stateful families (buffers updated in training mode): several forwards before one backward.

Gradient accumulation and multi-crop call the loss more than once before ``backward``. Each
forward uses the state as it stands after its own update, so ``(m(x1, y1) + m(x2, y2)).backward()``
must give exactly what two separate steps give: forward 1, backward 1, forward 2, backward 2 on an
identical copy (same state snapshots, same seed). fp64, every CPU backend this install has.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tolerance import assert_tight

import marginops as mo
from marginops.core import backend_status

CPU_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    backend_status("cpu")[name] is not None, reason=f"{name}: {backend_status('cpu')[name]}"))
    for name in ("torch", "cpp")]

D, C, B = 8, 7, 5
# name -> (class, kwargs, embedding scale: norms where the family's norm-dependence is live)
STATEFUL = {
    "curricularface": (mo.CurricularFaceLoss, {"momentum": 0.3}, 3.0),
    "adaface": (mo.AdaFaceLoss, {"t_alpha": 0.3}, 3.0),
    "sphereface": (mo.SphereFaceLoss, {}, 3.0),
    "magface": (mo.MagFaceLoss, {}, 20.0),
    "elastic_arc": (mo.ElasticArcFaceLoss, {"seed": 11}, 3.0),
    "elastic_cos_plus": (mo.ElasticCosFaceLoss, {"seed": 11, "plus": True}, 3.0),
    "uncertainty": (mo.UncertaintyMarginLoss, {"momentum": 0.3}, 3.0),
}


def make(name: str, backend: str) -> torch.nn.Module:
    cls, kwargs, _ = STATEFUL[name]
    torch.manual_seed(0)
    m = cls(D, C, backend=backend, **kwargs).double().train()
    with torch.no_grad():
        m.weight.normal_()
    return m


def crops(name: str):
    g = torch.Generator().manual_seed(5)
    emb_scale = STATEFUL[name][2]
    out = []
    for _ in range(2):
        x = torch.randn(B, D, generator=g, dtype=torch.float64) * emb_scale
        y = torch.randint(0, C, (B,), generator=g)
        y[1] = -1
        out.append((x, y))
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(STATEFUL))
def test_two_forwards_one_backward_equals_two_steps(name, backend):
    (x1, y1), (x2, y2) = crops(name)
    together = make(name, backend)
    separate = copy.deepcopy(together)

    a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    loss = together(a1, y1) + together(a2, y2)  # CurricularFace raised "modified by an inplace
    loss.backward()                             # operation" here: the op saved a view of t

    b1, b2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    first = separate(b1, y1)
    first.backward()
    second = separate(b2, y2)
    second.backward()

    assert_tight(loss.detach(), (first + second).detach(), name="loss")
    assert_tight(a1.grad, b1.grad, name="grad x1")
    assert_tight(a2.grad, b2.grad, name="grad x2")
    assert_tight(together.weight.grad, separate.weight.grad, name="grad weight")
    for (key, value), (_, expected) in zip(together.named_buffers(), separate.named_buffers()):
        assert torch.equal(value, expected), key
    assert together.state_dict().keys() == separate.state_dict().keys()


def test_curricularface_backward_uses_the_t_of_its_own_forward():
    """The saved t is a snapshot: the first forward's backward uses t after ITS update, although
    the second forward moved the buffer since."""
    (x1, y1), (x2, y2) = crops("curricularface")
    m = make("curricularface", "torch")
    ref = copy.deepcopy(m)
    a1 = x1.clone().requires_grad_()
    loss1 = m(a1, y1)
    m(x2, y2)  # moves t (no backward)
    loss1.backward()
    b1 = x1.clone().requires_grad_()
    ref(b1, y1).backward()
    assert not torch.equal(m.t, ref.t)
    assert_tight(a1.grad, b1.grad, name="grad x1")


@pytest.mark.parametrize("name", ["elastic_arc", "elastic_cos_plus"])
def test_elastic_state_dict_resumes_the_same_draws(name):
    (x1, y1), (x2, y2) = crops(name)
    m = make(name, "torch")
    m(x1, y1)
    resumed = make(name, "torch")
    resumed.load_state_dict(m.state_dict())
    assert resumed.draw_state.tolist() == [11, 1]
    assert_tight(resumed(x2, y2), m(x2, y2), name="loss after resume")
    unseeded = [STATEFUL[name][0](D, C, seed=None).draw_state[0].item() for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # seed=None draws a seed from torch's global RNG


def test_counter_normal_matches_numpy_reference_and_is_standard_normal():
    """The int64-tensor hash (split 16-bit products) against NumPy's uint32 wrap-around, over
    seeds spanning 63 bits and steps past 2³²; and the draws look like N(0, 1)."""
    from marginops import margins
    from marginops import reference as ref
    for seed in (0, 3, 2 ** 32 + 7, 2 ** 63 - 1):
        for step in (0, 1, 2 ** 32 + 5):
            got = margins.counter_normal(torch.tensor(seed), torch.tensor(step), 33,
                                         dtype=torch.float64, device=torch.device("cpu"))
            assert_tight(got, torch.from_numpy(ref.counter_normal(seed, step, 33)),
                         rtol=1e-12, atol=1e-12, name=f"seed {seed} step {step}")
    z = margins.counter_normal(torch.tensor(1), torch.tensor(0), 100_000, dtype=torch.float64,
                               device=torch.device("cpu"))
    nxt = margins.counter_normal(torch.tensor(1), torch.tensor(1), 100_000, dtype=torch.float64,
                                 device=torch.device("cpu"))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02  # ~6σ at n = 1e5
    assert abs(torch.corrcoef(torch.stack([z, nxt]))[0, 1].item()) < 0.02  # steps independent
    assert z.abs().max() < 6  # 24-bit uniforms: |z| ≤ √(−2 ln 2⁻²⁵) ≈ 5.9
