"""The fused dare kernels (evomerge.merge.fused) against the eager path of the same keyed stream."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import Merger, fused
from evomerge.merge.streams import KeyedStream, half_uniform_i32, hash32_i32, hash_uniform
from evomerge.shapes import KEPT_TABLE_BYTES, KEPT_TABLE_MIN

pytestmark = pytest.mark.skipif(fused._compiled() is None, reason="torch.compile cannot build kernels here")


def models(k: int):
    """ "w" is large enough for a kept-l1 table (KEPT_TABLE_MIN), "small" runs the compiled l1 pass."""
    g = torch.Generator().manual_seed(7)
    base = {
        "w": torch.randn(400, 700, generator=g) * 0.02,
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
    """The merge with every fused kernel off (keyed dare and della, magnitude bands)."""
    applies, applies_unkeyed = fused.applies, fused.applies_unkeyed
    fused.applies = fused.applies_unkeyed = lambda x: False
    try:
        return merger.merge(method, params)
    finally:
        fused.applies, fused.applies_unkeyed = applies, applies_unkeyed


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
    rescaled = params.get("rescale", True) and min(params["density"]) < 1
    assert (
        ("fused.kept_table", 5) in merger.inputs("w", stream=stream).cache
    ) == rescaled  # l1 from the table
    assert ("fused.kept_table", 5) not in merger.inputs("small", stream=stream).cache  # a compiled pass


def kept_l1_by_uniforms(deltas: torch.Tensor, keys: torch.Tensor, density: list[float]) -> torch.Tensor:
    """The kept l1 with each element's uniform compared, as a float32, with its expert's density."""
    index = torch.arange(deltas.shape[1], dtype=torch.int32)
    out = []
    for i, p in enumerate(density):
        h = hash32_i32(index, keys[0, i // 2], keys[1, i // 2])
        keep = half_uniform_i32(h, i % 2) < torch.tensor(p, dtype=torch.float32)
        out.append(deltas[i].abs().double()[keep].sum())
    return torch.stack(out)


@pytest.mark.parametrize("k", [2, 3])
def test_the_kept_l1_table_gives_the_kernels_l1_at_any_density(k):
    base, experts = models(k)
    merger = Merger(base, experts, seed=4, random="keyed")
    x = merger.inputs("w", stream=KeyedStream(4))
    assert x.persistent and x.numel >= KEPT_TABLE_MIN
    table = fused.KeptTable.build(x)
    assert table.nbytes == k * KEPT_TABLE_BYTES
    kernels, deltas, _, keys = fused._prepared(x)
    grid = [0.0, 1.0, 0.5, 2**-16, 0.5 + 2**-17, 1 - 2**-16, 0.3, 0.0001, 0.97]  # on and off the 2^-16 grid
    for j in range(len(grid)):
        density = [grid[(j + i) % len(grid)] for i in range(k)]
        limits = torch.tensor([fused.grid_limit(p) for p in density], dtype=torch.int32)
        want = kernels["_kept_l1"](deltas, keys, limits).double()
        torch.testing.assert_close(want, kept_l1_by_uniforms(deltas, keys, density), rtol=2e-6, atol=0)
        torch.testing.assert_close(
            torch.tensor(table.kept_l1(density), dtype=torch.float64), want, rtol=2e-6, atol=0
        )


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


BAND_CASES = [
    ("ties", {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
    ("ties", {"weight": [0.6, -0.4, 0.3], "density": [0.2, 1.0, 0.0], "normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [1.0, 1.0, 0.5], "density": [0.3, 0.3, 0.9]}),
    ("breadcrumbs_ties", {"weight": [0.6, 0.4], "density": [0.8, 0.6], "gamma": 0.05}),
    ("breadcrumbs", {"weight": [0.6, 0.4, 0.2], "density": [0.8, 0.9, 0.5], "gamma": 0.01, "rescale": True}),
    ("breadcrumbs", {"weight": [0.6, 0.4], "density": [0.5, 1.0], "gamma": 0.0, "normalize": True}),
]


# every case in float32; in bfloat16 one with consensus and one without (the rest: -m slow)
BAND_RUNS = [
    pytest.param(
        method, params, dtype, marks=() if dtype == torch.float32 or j in (0, 4) else pytest.mark.slow
    )
    for dtype in (torch.float32, torch.bfloat16)
    for j, (method, params) in enumerate(BAND_CASES)
]


@pytest.mark.parametrize(("method", "params", "dtype"), BAND_RUNS)
def test_fused_magnitude_bands_equal_the_eager_path(method, params, dtype):
    """ties and breadcrumbs as one compiled pass: the same selection (thresholds from the sketches, ties
    at a threshold dropped by index, here many: bfloat16 and a coarse grid), the same sign election."""
    k = len(params["weight"])
    base, experts = models(k)
    for e in experts.values():  # magnitudes on a coarse grid: many values tied at every threshold
        e["w"] = base["w"] + torch.round((e["w"] - base["w"]) * 2000) / 2000
    merger = Merger(base, experts, dtype=dtype)
    assert fused.applies_unkeyed(merger.inputs("w")) and not fused.applies_unkeyed(merger.inputs("tiny"))
    ours, ref = merger.merge(method, params), eager(merger, method, params)
    consensus = method != "breadcrumbs"
    # consensus: the same float32 operations in the same order, so bit-identical; without, the eager
    # path's fused multiply-adds round otherwise (a 16-bit output then one unit in the last place)
    tol = (
        {"rtol": 0, "atol": 0}
        if consensus
        else {"rtol": 2**-7 if dtype == torch.bfloat16 else 0, "atol": 1e-6}
    )
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **tol)


def test_one_off_merges_do_not_compile_the_band_kernels():
    from evomerge.merge import merge_state_dicts

    base, experts = models(2)
    calls = []
    applies = fused.applies_unkeyed
    fused.applies_unkeyed = lambda x: calls.append(applies(x)) or False
    try:
        merge_state_dicts(
            {"base": base, **experts}, "ties", base="base", parameters={"weight": 0.5, "density": 0.5}
        )
    finally:
        fused.applies_unkeyed = applies
    assert calls and not any(calls)


DELLA_CASES = [
    ("della", {"weight": [0.6, 0.4], "density": [0.5, 0.6], "epsilon": [0.1, 0.2]}),
    ("della", {"weight": [0.6, -0.4, 0.3], "density": [0.3, 1.0, 0.0], "epsilon": 0.1, "normalize": False}),
    ("della_linear", {"weight": [0.6, 0.4], "density": [0.5, 0.7], "epsilon": 0.05, "lambda": 1.2}),
    (
        "della_linear",
        {"weight": [0.6, 0.4, 0.2], "density": [0.4, 0.8, 0.5], "epsilon": 0.1, "rescale": False},
    ),
]


@pytest.mark.parametrize(("method", "params"), DELLA_CASES)
def test_fused_della_equals_the_eager_keyed_path(method, params):
    """della's rank-dependent masks in the kernels (ranks cached per tensor) give the eager path's masks."""
    base, experts = models(len(params["weight"]))
    merger = Merger(base, experts, seed=6, random="keyed")
    stream = KeyedStream(6)
    assert fused.applies_della(merger.inputs("w", stream=stream))
    assert fused.applies_della(merger.inputs("small", stream=stream))  # a vector: one row
    assert not fused.applies_della(merger.inputs("tiny", stream=stream))
    ours, ref = merger.merge(method, params), eager(merger, method, params)
    for name in ref:  # the same masks; the kept l1 and the sums in another order
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)
    assert "fused.della_ranks" in merger.inputs("w", stream=stream).cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_magmax_equals_the_eager_path(dtype):
    base, experts = models(3)
    experts["e2"]["w"] = experts["e1"]["w"].clone()  # equal magnitudes: the later expert wins
    merger = Merger(base, experts, dtype=dtype)
    params = {"weight": [1.0, 0.8, -0.8], "lambda": 0.7}
    ours, ref = merger.merge("magmax", params), eager(merger, "magmax", params)
    tol = {"rtol": 2**-7, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 1e-6}
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **tol)


@pytest.mark.parametrize(
    ("params", "dtype"),
    [
        ({"select_topk": 0.3}, torch.float32),
        ({"select_topk": 1.0}, torch.float32),
        ({"select_topk": 0.02}, torch.float32),
        ({"select_topk": 0.3}, torch.bfloat16),
    ],
)
def test_fused_sce_equals_the_eager_path(params, dtype):
    """sce in two compiled passes (energies, then erase and merge), with variances tied at the threshold
    (a coarse grid) left out as topk leaves them."""
    base, experts = models(3)
    for e in experts.values():
        e["w"] = base["w"] + torch.round((e["w"] - base["w"]) * 300) / 300
    merger = Merger(base, experts, dtype=dtype)
    ours, ref = merger.merge("sce", params), eager(merger, "sce", params)
    tol = {"rtol": 2**-7, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 1e-6}
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **tol)
