"""The fused dare kernels (evomerge.merge.fused) against the eager path of the same keyed stream."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import Merger, fused
from evomerge.merge.streams import KeyedStream, hash_uniform

pytestmark = pytest.mark.skipif(fused._compiled() is None, reason="torch.compile cannot build kernels here")


def models(k: int, n: int = 300 * 700):
    g = torch.Generator().manual_seed(7)
    base = {
        "w": torch.randn(300, 700, generator=g) * 0.02,
        "small": torch.randn(64, generator=g),
        "tiny": torch.randn(8, generator=g),
    }
    experts = {
        f"e{i}": {name: t + torch.randn(t.shape, generator=g) * 0.01 for name, t in base.items()}
        for i in range(k)
    }
    experts["e0"]["w"][:, :10] = base["w"][:, :10]  # an untouched stripe: zero task vector there
    return base, experts


def eager(merger: Merger, method: str, params: dict) -> dict[str, torch.Tensor]:
    applies = fused.applies
    fused.applies = lambda x: False
    try:
        return merger.merge(method, params)
    finally:
        fused.applies = applies


CASES = [
    ("dare_ties", {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
    ("dare_ties", {"weight": [0.6, -0.4], "density": [0.2, 1.0], "normalize": True, "lambda": 1.3}),
    ("dare_ties", {"weight": [1.0, 1.0], "density": [0.0, 0.3], "rescale": False}),
    ("dare_linear", {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
    ("dare_linear", {"weight": [0.6, 0.4], "density": [0.9, 0.1], "normalize": True, "rescale": False}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_fused_dare_equals_the_eager_keyed_path(method, params):
    base, experts = models(2)
    merger = Merger(base, experts, seed=5, random="keyed")
    stream = KeyedStream(5)
    assert fused.applies(merger.inputs("w", stream=stream))
    assert fused.applies(merger.inputs("small", stream=stream))  # the model pays the compile anyway
    assert not fused.applies(merger.inputs("tiny", stream=stream))
    ours, ref = merger.merge(method, params), eager(merger, method, params)
    for name in ref:  # same masks; the l1 and sign sums only run in another order
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)
    kept = (ours["w"] != base["w"]).float().mean().item()
    assert kept == pytest.approx((ref["w"] != base["w"]).float().mean().item(), abs=1e-5)


def test_fused_dare_ties_three_experts_and_a_preallocated_output():
    base, experts = models(3)
    merger = Merger(base, experts, seed=1, random="keyed")
    params = {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.6, 0.8], "normalize": True}
    out = {k: torch.full_like(t, float("nan")) for k, t in base.items()}
    got = merger.merge("dare_ties", params, out=out)
    assert got["w"].data_ptr() == out["w"].data_ptr()
    torch.testing.assert_close(out["w"], eager(merger, "dare_ties", params)["w"], rtol=0, atol=1e-6)


def test_keyed_masks_keep_the_density_and_nest_across_densities():
    """The uniforms are one fixed draw per element: density 0.3 keeps a subset of density 0.6's."""
    base, experts = models(1)
    merger = Merger(base, experts, seed=2, random="keyed")
    masks = {}
    for p in (0.3, 0.6):
        merged = merger.merge("dare_linear", {"weight": [1.0], "density": p, "rescale": False})["w"]
        masks[p] = merged != base["w"]
        n = masks[p][:, 10:].numel()
        assert masks[p][:, 10:].float().mean().item() == pytest.approx(p, abs=5 * (p * (1 - p) / n) ** 0.5)
    assert not (masks[0.3] & ~masks[0.6]).any()


def test_small_models_stay_on_the_eager_path():
    """A model without a tensor of MIN_NUMEL elements never pays the compile."""
    base, experts = models(2)
    base, experts = {"small": base["small"]}, {e: {"small": sd["small"]} for e, sd in experts.items()}
    merger = Merger(base, experts, seed=5, random="keyed")
    assert not fused.applies(merger.inputs("small", stream=KeyedStream(5)))


def test_hash_uniforms_are_uniform_and_independent_across_keys_and_halves():
    idx = torch.arange(1 << 20)
    u = hash_uniform(idx, 11, 22)
    v = hash_uniform(idx, 11, 23)
    w = hash_uniform(idx, 11, 22, half=1)  # the pair's other expert: the low 16 bits of u's hash
    for x in (u, w):
        assert x.min() >= 0 and x.max() < 1
        assert torch.equal(x * 2**16, (x * 2**16).round())  # the 2^-16 grid
        counts = torch.histc(x, bins=16, min=0, max=1)
        expect = x.numel() / 16
        assert ((counts - expect).square() / expect).sum().item() < 60  # chi^2, 15 dof: p ~ 1e-7
        assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u, w]))[0, 1].item()) < 0.01
    for p, q in ((0.3, 0.6), (0.05, 0.9)):  # joint keep rate of the pair: the product of the rates
        both = ((u < p) & (w < q)).float().mean().item()
        assert both == pytest.approx(p * q, abs=5 * (p * q / idx.numel()) ** 0.5)
    ks = KeyedStream(3)
    assert ks.keys(("w", 0)) != ks.keys(("w", 1)) and ks.keys(("w", 0)) == KeyedStream(3).keys(("w", 0))
    assert ks.lane(("w", 0))[:2] == ks.lane(("w", 1))[:2] != ks.lane(("w", 2))[:2]  # pairs share keys
    assert [ks.lane(("w", i))[2] for i in range(3)] == [0, 1, 0]


def test_disabled_fused_kernels_fall_back(monkeypatch):
    base, experts = models(2)
    merger = Merger(base, experts, seed=5, random="keyed")
    monkeypatch.setattr(fused, "_compiled", lambda: None)
    assert not fused.applies(merger.inputs("w", stream=KeyedStream(5)))
    merger.merge("dare_ties", {"weight": [0.5, 0.5], "density": 0.5})


def test_the_32_bit_hash_gives_the_64_bit_hash_bits():
    """The kernels hash in int32 (vectorizes on AVX2): the same bits as the eager int64 hash, for keys
    across the whole unsigned range and indices up to 2^31 - 1, so masks did not change."""
    from evomerge.merge.streams import as_int32, half_uniform, half_uniform_i32, hash32, hash32_i32

    g = torch.Generator().manual_seed(1)
    idx = torch.cat(
        [torch.arange(4096), torch.randint(0, 2**31, (1 << 16,), generator=g), torch.tensor([2**31 - 1])]
    )
    for k1, k2 in ((0, 0), (2866077294, 1266947452), (2**32 - 1, 2**31), (12345, 2**32 - 7)):
        h64 = hash32(idx, k1, k2)
        h32 = hash32_i32(idx.to(torch.int32), as_int32(k1), as_int32(k2))
        assert h32.dtype == torch.int32
        assert torch.equal(h64, h32.to(torch.int64) & 0xFFFFFFFF)
        for half in (0, 1):
            assert torch.equal(half_uniform(h64, half), half_uniform_i32(h32, half))


def test_keyed_masks_are_pinned():
    """A stored run's dare/della masks re-merge identically: these values are the keyed stream v2's
    (KEYED_VERSION), unchanged by the 32-bit kernels."""
    from evomerge.merge.streams import KEYED_VERSION, hash32

    assert KEYED_VERSION == 2
    ks = KeyedStream(5)
    k1, k2, _ = ks.lane(("w", 0))
    assert (k1, k2) == (2866077294, 1266947452)
    h = hash32(torch.tensor([0, 1, 2**20, 2**31 - 1]), k1, k2)
    assert h.tolist() == [1519298706, 1095592512, 704909460, 823835565]
    u = torch.empty(6)
    ks.uniform_(u, ("model.layers.0.mlp.up_proj.weight", 1), start=1000)
    assert (u * 2**16).long().tolist() == [24531, 14308, 55142, 10316, 33127, 43952]
