"""Every merge method against mergekit's ``merge_state_dicts``, the mergekit-style API, and bad input.

Three tiny random-init Llama models (a base and two experts). Deterministic methods must agree to 1e-6;
the stochastic ones (dare_*, della*) draw their masks from the same torch generator in the same order
as mergekit, so from the same seed they must agree to 1e-6 too.
"""

from __future__ import annotations

import pytest
import torch
from tiny import random_models

from evomerge.errors import EvomergeError
from evomerge.merge import METHODS, Merger, merge_state_dicts
from evomerge.merge.kernels import Workspace
from evomerge.merge.orderstats import STEP, OrderSketch
from evomerge.recipe import GroupRecipe, Recipe

TOL = 1e-6
SEED = 1234


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def mergekit():
    return pytest.importorskip(
        "mergekit.merge_methods.api", reason="mergekit not installed (pip install -e '.[parity]')"
    )


@pytest.fixture(scope="module")
def models():
    base, a, b = (m.state_dict() for m in random_models(3))
    return {"base": base, "a": a, "b": b}


@pytest.fixture(scope="module")
def merger(models):
    return Merger(models["base"], {"a": models["a"], "b": models["b"]}, seed=SEED)


@pytest.fixture(scope="module")
def merger1(models):
    return Merger(models["base"], {"a": models["a"]}, seed=SEED)


def theirs(mergekit, models, method, params, experts=("a", "b"), seed=SEED):
    """mergekit's result with per-expert lists turned into mappings by model id."""
    mk = {k: (dict(zip(experts, v, strict=True)) if isinstance(v, list) else v) for k, v in params.items()}
    inputs = {"base": models["base"], **{e: models[e] for e in experts}}
    torch.manual_seed(seed)
    return mergekit.merge_state_dicts(inputs, method, base="base", parameters=mk)


def max_diff(ours, ref):
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert torch.isfinite(t).all(), name
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape, name
    return max((ours[n] - t).abs().max().item() for n, t in ref.items())


DETERMINISTIC = [
    ("task_arithmetic", {"weight": [0.6, 0.3], "lambda": 1.7}),
    ("ties", {"weight": [0.6, -0.3], "density": [0.2, 0.9], "normalize": False}),
    ("ties", {"weight": [0.6, 0.3], "density": [0.0, 0.5], "lambda": 0.5}),
    ("breadcrumbs", {"weight": [0.6, 0.3], "density": [0.5, 0.8], "gamma": [0.01, 0.05]}),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": 0.9, "gamma": 0.2, "normalize": True, "lambda": 0.7}),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": [0.3, 1.0], "gamma": 0.0, "rescale": True}),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": [0.0, 0.01], "gamma": 0.995}),
    ("breadcrumbs_ties", {"weight": [0.6, 0.3], "density": [0.5, 0.8], "gamma": [0.01, 0.05]}),
    (
        "breadcrumbs_ties",
        {"weight": [0.6, -0.3], "density": 0.3, "gamma": 0.1, "normalize": True, "rescale": True},
    ),
    ("sce", {}),
    ("sce", {"select_topk": 0.5}),
    ("sce", {"select_topk": 0.07, "int8_mask": True}),
    ("sce", {"select_topk": 0.0}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {"weight": [0.3, 0.7]}),
    ("nuslerp", {"weight": [1.0, 1.0], "nuslerp_row_wise": True, "nuslerp_flatten": False}),
    ("nuslerp", {"weight": [0.2, 0.5], "nuslerp_flatten": False}),
    ("nuslerp", {"weight": [0.0, 0.0]}),
]

STOCHASTIC = [
    ("dare_ties", {"weight": [0.6, 0.3], "density": [0.5, 0.7]}),
    ("dare_ties", {"weight": [0.6, -0.3], "density": [1.0, 0.3], "rescale": False, "normalize": True}),
    ("dare_ties", {"weight": [0.9, 0.3], "density": 0.1, "lambda": 1.3}),
    ("dare_linear", {"weight": [0.6, 0.3], "density": [0.5, 0.7]}),
    ("dare_linear", {"weight": [0.6, 0.3], "density": [0.0, 0.7], "normalize": True}),
    ("della", {"weight": [0.6, 0.3], "density": [0.5, 0.6], "epsilon": [0.1, 0.2]}),
    (
        "della",
        {"weight": [0.6, 0.3], "density": [0.5, 1.0], "epsilon": 0.05, "rescale": False, "lambda": 2.0},
    ),
    ("della_linear", {"weight": [0.6, 0.3], "density": [0.5, 0.6], "epsilon": [0.1, 0.2]}),
    ("della_linear", {"weight": [1.2, 0.3], "density": 0.3, "epsilon": 0.25, "normalize": True}),
]


@pytest.mark.mergekit
@pytest.mark.parametrize(("method", "params"), DETERMINISTIC, ids=lambda v: str(v))
def test_deterministic_methods_match_mergekit(mergekit, models, merger, method, params):
    assert max_diff(merger.merge(method, params), theirs(mergekit, models, method, params)) <= TOL


@pytest.mark.mergekit
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_mergekit(mergekit, models, merger1, t):
    ref = theirs(mergekit, models, "slerp", {"t": t}, experts=("a",))
    assert max_diff(merger1.merge("slerp", {"t": t}), ref) <= TOL


@pytest.mark.mergekit
@pytest.mark.parametrize(("method", "params"), STOCHASTIC, ids=lambda v: str(v))
def test_stochastic_methods_match_mergekit_from_the_same_seed(mergekit, models, merger, method, params):
    """The Merger seeds a fresh generator per merge, mergekit uses the global one after manual_seed."""
    ours = merger.merge(method, params)
    assert max_diff(ours, theirs(mergekit, models, method, params)) <= TOL
    # a seeded Merger is deterministic per recipe; another seed draws other masks
    assert max_diff(merger.merge(method, params), ours) == 0
    if any(d < 1 for d in torch.tensor(params["density"]).reshape(-1).tolist()):
        assert max_diff(merger.merge(method, params), theirs(mergekit, models, method, params, seed=1)) > 1e-3


@pytest.mark.mergekit
def test_global_generator_stream_matches_mergekit(mergekit, models):
    """seed=None draws from torch's global generator, exactly as mergekit: consecutive merges too."""
    mer = Merger(models["base"], {"a": models["a"], "b": models["b"]}, seed=None)
    params = {"weight": [0.6, 0.3], "density": [0.5, 0.7]}
    torch.manual_seed(7)
    first, second = mer.merge("dare_ties", params), mer.merge("della", {**params, "epsilon": 0.1})
    torch.manual_seed(7)
    mk = {k: dict(zip("ab", v, strict=True)) for k, v in params.items()}
    inputs = {"base": models["base"], "a": models["a"], "b": models["b"]}
    ref1 = mergekit.merge_state_dicts(inputs, "dare_ties", base="base", parameters=mk)
    ref2 = mergekit.merge_state_dicts(inputs, "della", base="base", parameters={**mk, "epsilon": 0.1})
    assert max_diff(first, ref1) <= TOL
    assert max_diff(second, ref2) <= TOL


RECIPES = [
    (
        GroupRecipe(
            "layers_0-1",
            "breadcrumbs_ties",
            {"weight": [0.8, 0.2], "density": [0.3, 0.9], "gamma": 0.02},
            (0, 2),
        ),
        GroupRecipe("layers_2-2", "sce", {"select_topk": 0.4}, (2, 3)),
        GroupRecipe("layers_3-3", "model_stock", {"filter_wise": True}, (3, 4)),
        GroupRecipe("other", "nuslerp", {"weight": [0.4, 0.6]}),
    ),
    (
        GroupRecipe("layers_0-1", "ties", {"weight": [0.5, 0.5], "density": [0.7, 0.2]}, (0, 2)),
        GroupRecipe(
            "layers_2-3", "breadcrumbs", {"weight": [0.1, 0.9], "density": 0.6, "gamma": 0.05}, (2, 4)
        ),
        GroupRecipe("other", "task_arithmetic", {"weight": [0.4, 0.6], "normalize": True}),
    ),
]


@pytest.mark.mergekit
@pytest.mark.parametrize("groups", RECIPES, ids=["mixed-methods", "per-group-values"])
def test_per_layer_group_recipes_match_mergekit_per_group(mergekit, models, merger, groups):
    recipe = Recipe(groups)
    ours = merger.apply(recipe)
    expected = {g.name: theirs(mergekit, models, g.method, dict(g.parameters)) for g in groups}
    assert {recipe.group_for(n).name for n in ours} == {g.name for g in groups}
    for name, t in ours.items():
        assert (t - expected[recipe.group_for(name).name][name]).abs().max().item() <= TOL, name


def test_writes_into_preallocated_model_and_ties_stay_tied(models):
    """Merged weights land in the target's own storage; tied tensors are merged once."""
    (target,) = random_models(1, seed=9)
    base = dict(models["base"])
    shared = {k: v for k, v in base.items()}
    shared["lm_head.weight"] = shared["model.embed_tokens.weight"]  # tie them, as tied checkpoints do
    experts = {}
    for e in ("a", "b"):
        sd = dict(models[e])
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        experts[e] = sd
    mer = Merger(shared, experts)
    assert "lm_head.weight" in mer.aliases and "lm_head.weight" not in mer.deltas
    ptrs = {n: p.data_ptr() for n, p in target.state_dict().items()}
    out = mer.merge("ties", {"weight": [0.5, 0.5], "density": 0.4}, out=target)
    sd = target.state_dict()
    assert all(sd[n].data_ptr() == ptrs[n] for n in ptrs)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def big_models(bf16: bool = False, huge: bool = False):
    """Tensors spanning several chunks (``huge``: one over STORE elements, whose random masks are kept
    as bytes), one with an untouched (all-zero) task vector; with bf16 values many magnitudes tie at
    any threshold."""
    out = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        sd = {
            "w": torch.randn(700, 900, generator=g) * 0.02,
            "v": 1 + torch.randn(1000, generator=g) * 0.01,
        }
        if huge:
            sd["e"] = torch.randn(1200, 900, generator=g) * 0.02
        if bf16:
            sd = {k: v.bfloat16().float() for k, v in sd.items()}
        out.append(sd)
    out[1]["v"] = out[0]["v"].clone()
    return dict(zip(["base", "a", "b"], out, strict=True))


@pytest.mark.mergekit
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"weight": [0.6, 0.3], "density": [0.013, 0.999]}),
        ("breadcrumbs_ties", {"weight": [0.6, 0.3], "density": [0.5, 0.8], "gamma": 0.05, "rescale": True}),
        ("dare_ties", {"weight": [0.6, 0.3], "density": [0.5, 0.7]}),
        ("della_linear", {"weight": [0.6, 0.3], "density": [0.5, 0.6], "epsilon": 0.2}),
        ("sce", {"select_topk": 0.3}),
        ("model_stock", {}),
    ],
)
def test_tensors_larger_than_a_chunk_match_mergekit(mergekit, method, params):
    big = big_models(huge=True)
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]}, seed=SEED)
    mer.prepare([method])
    assert max_diff(mer.merge(method, params), theirs(mergekit, big, method, params)) <= TOL


@pytest.mark.mergekit
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"weight": [0.6, 0.3], "density": [0.5, 0.7]}),
        ("breadcrumbs", {"weight": [0.6, 0.3], "density": [0.5, 0.8], "gamma": 0.05, "rescale": True}),
    ],
)
def test_ties_at_thresholds_differ_only_at_tied_positions(mergekit, method, params):
    """bf16-valued task vectors tie at every threshold; mergekit keeps an arbitrary subset of the tied
    entries, evomerge the first ones, as many of them: a few positions differ, the rest agree (in 'w';
    'v' has so few distinct values that ties are a large share of it)."""
    big = big_models(bf16=True)
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]}, seed=SEED)
    ours, ref = mer.merge(method, params), theirs(mergekit, big, method, params)
    differ = ((ours["w"] - ref["w"]).abs() > TOL).float().mean().item()
    assert differ < 2e-3, differ


@pytest.mark.mergekit
@pytest.mark.parametrize("select_topk", [0.05, 0.3, 0.77])
def test_sce_breaks_ties_at_its_threshold_as_mergekit(mergekit, select_topk):
    """sce selects with torch.topk, whose choice among variances tied at the threshold follows its own
    selection path; evomerge asks topk in that case, so even bf16 task vectors (ties everywhere) agree."""
    big = big_models(bf16=True)
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]})
    params = {"select_topk": select_topk}
    assert max_diff(mer.merge("sce", params), theirs(mergekit, big, "sce", params)) <= TOL


@pytest.mark.mergekit
@pytest.mark.parametrize("density", [0.013, 0.5, 0.93])
def test_sparsifiers_keep_mergekits_magnitudes_under_ties(mergekit, density):
    """With ties, the kept magnitudes are the same multiset as mergekit's (so rescaling agrees)."""
    from mergekit import sparsify as mks

    from evomerge.merge import sparsify

    big = big_models(bf16=True)
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]})
    for name in big["base"]:
        x = mer.inputs(name)
        n = x.numel
        for i in range(2):
            d = mer.deltas[name][i]
            pairs = [
                (sparsify.magnitude(x, i, density), mks.magnitude(d, density)),
                (
                    sparsify.magnitude_outliers(x, i, density, 0.02),
                    mks.magnitude_outliers(d, density, gamma=0.02),
                ),
            ]
            for sp, ref in pairs:
                kept = sp.fill(slice(0, n), torch.empty(n), torch.empty(n))
                assert torch.equal(kept.abs().sort().values, ref.reshape(-1).abs().sort().values), (name, i)


def test_order_sketch_is_exact_with_zeros_and_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-40, 41, (5 * STEP + 17,), generator=g).float() * 0.5  # ties and zeros everywhere
    x[:300] = 0
    sketch = OrderSketch(x)
    flat = x.abs().sort().values
    ws = Workspace()
    for rank in range(x.numel()):
        sel = sketch.select(rank, lambda sl, _buf: x[sl], ws)
        assert sel.value == flat[rank].item(), rank
        assert sel.less == int((x.abs() < sel.value).sum()), rank
        if sel.value != 0:
            assert torch.equal(sel.equal, (x.abs() == sel.value).nonzero().squeeze(1)), rank


def test_sce_counts_its_selection_as_mergekit():
    """mergekit's k = int(count_nonzero(var) * select_topk) is a float32 product: 28311552 * 0.3 is
    8493465.6 in float64 but 8493466 in float32 (an embedding of SmolLM2's size)."""
    from evomerge.merge.sce import _count

    assert _count(28311552, 0.3) == 8493466 != int(28311552 * 0.3)


def test_standalone_inputs_compute_without_a_merger(models):
    """A method called on hand-built MergeInputs (no cache, no workspace) gives the Merger's result."""
    from evomerge.merge import MergeInputs

    mer = Merger(models["base"], {"a": models["a"], "b": models["b"]})
    name = "model.layers.0.mlp.down_proj.weight"
    for method, params in [
        ("ties", {"weight": [0.6, 0.3], "density": [0.3, 0.6]}),
        ("sce", {"select_topk": 0.2}),
        ("breadcrumbs", {"weight": [0.6, 0.3], "density": 0.5, "gamma": 0.1}),
    ]:
        m = METHODS.get(method)
        resolved = m.resolve(params, ["a", "b"])
        alone = m.fn(MergeInputs(name, mer.base[name], mer.deltas[name]), **resolved)
        assert torch.equal(alone, mer.merge(method, params)[name]), method


# --- keyed streams: another stream, the same distribution ------------------------------------------


def test_keyed_stream_is_random_access_and_thread_invariant():
    from evomerge.merge.streams import KeyedStream

    ks = KeyedStream(5)
    n, cut = 3 * 65536 + 123, 65536 + 777
    whole = ks.uniform_(torch.empty(n), ("w", 0), 10)
    parts = torch.cat(
        [ks.uniform_(torch.empty(cut), ("w", 0), 10), ks.uniform_(torch.empty(n - cut), ("w", 0), 10 + cut)]
    )
    assert torch.equal(whole, parts)
    torch.set_num_threads(2)
    try:
        assert torch.equal(whole, ks.uniform_(torch.empty(n), ("w", 0), 10))
    finally:
        torch.set_num_threads(1)
    assert not torch.equal(whole, ks.uniform_(torch.empty(n), ("w", 1), 10))
    assert whole.min() >= 0 and whole.max() < 1


def _single_expert_mask(merged, big):
    """dare/della_linear with weights (1, 0) and no rescaling leave base + mask * delta_a."""
    d = big["a"]["w"] - big["base"]["w"]
    kept = merged["w"] - big["base"]["w"]
    return kept != 0, kept, d


@pytest.mark.mergekit
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keyed_dare_keeps_mergekits_rates_rescaling_and_means(mergekit, density):
    big = big_models()
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]}, seed=3, random="keyed")
    n = big["base"]["w"].numel()
    sigma = (density * (1 - density) / n) ** 0.5
    plain = {"weight": [1.0, 0.0], "density": density, "rescale": False}
    ours_mask, _, d = _single_expert_mask(mer.merge("dare_linear", plain), big)
    ref_mask, _, _ = _single_expert_mask(theirs(mergekit, big, "dare_linear", plain), big)
    for mask in (ours_mask, ref_mask):  # keep rates: both within 5 sigma of the density
        assert abs(mask.float().mean().item() - density) < 5 * sigma
    assert (ours_mask != ref_mask).any()  # really another stream
    rescaled = {**plain, "rescale": True}
    _, ours, _ = _single_expert_mask(mer.merge("dare_linear", rescaled), big)
    _, ref, _ = _single_expert_mask(theirs(mergekit, big, "dare_linear", rescaled), big)
    for kept in (ours, ref):  # l1 rescaling restores sum |delta| exactly, up to rounding
        assert kept.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    # means of the rescaled vectors agree within their sampling error
    se = (d.square().mean().item() * (1 - density) / density / n) ** 0.5
    assert abs(ours.mean().item() - ref.mean().item()) < 5 * 2**0.5 * se
    # with both experts and sign election the merged means agree too
    both = {"weight": [0.6, 0.4], "density": density}
    a, b = mer.merge("dare_ties", both)["w"], theirs(mergekit, big, "dare_ties", both)["w"]
    assert abs((a - b).mean().item()) < 10 * (a - b).std().item() / n**0.5


@pytest.mark.mergekit
def test_keyed_della_keep_rates_rise_with_rank_as_mergekits(mergekit):
    big = big_models()
    density, eps = 0.5, 0.3
    mer = Merger(big["base"], {"a": big["a"], "b": big["b"]}, seed=3, random="keyed")
    params = {"weight": [1.0, 0.0], "density": density, "epsilon": eps, "rescale": False}
    ours, _, d = _single_expert_mask(mer.merge("della_linear", params), big)
    ref, _, _ = _single_expert_mask(theirs(mergekit, big, "della_linear", params), big)
    ranks = d.abs().argsort(dim=1).argsort(dim=1).float() / (d.shape[1] - 1)
    for lo, hi in [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)]:
        part = (ranks >= lo) & (ranks < hi)
        expect = density - eps + 2 * eps * ranks[part].mean().item()
        sigma = (expect * (1 - expect) / part.sum().item()) ** 0.5
        for mask in (ours, ref):
            assert abs(mask[part].float().mean().item() - expect) < 5 * sigma, (lo, hi)


def test_keyed_masks_of_a_group_do_not_depend_on_other_groups(models):
    mer = Merger(models["base"], {"a": models["a"], "b": models["b"]}, seed=11, random="keyed")

    def recipe(other_density):
        return Recipe(
            (
                GroupRecipe("layers_0-1", "dare_ties", {"weight": [0.5, 0.5], "density": 0.4}, (0, 2)),
                GroupRecipe(
                    "other", "della", {"weight": [0.5, 0.5], "density": other_density, "epsilon": 0.1}
                ),
            )
        )

    one, two = mer.apply(recipe(0.3)), mer.apply(recipe(0.8))
    layers = [n for n in one if ".layers.0." in n or ".layers.1." in n]
    assert layers and all(torch.equal(one[n], two[n]) for n in layers)
    assert not torch.equal(one["model.embed_tokens.weight"], two["model.embed_tokens.weight"])


# --- the mergekit-style API ------------------------------------------------------------------------


API_CALLS = [
    # (models as given, method, kwargs): inputs are named by id; sequences follow input order
    ("seq", "ties", {"base": 0, "parameters": {"weight": [0.6, 0.3], "density": [0.5, 0.7]}}),
    (
        "map",
        "ties",
        {"base": "base", "parameters": {"weight": {"a": 0.6, "b": 0.3, "base": 9.0}, "density": 0.5}},
    ),
    ("map", "linear", {"parameters": {"weight": [0.2, 0.6, 0.3]}}),
    ("map", "linear", {"base": "base", "parameters": {"weight": {"base": 0.2, "a": 0.6, "b": 0.3}}}),
    ("experts", "linear", {"parameters": {"weight": 1.0, "normalize": False}}),
    ("experts", "nuslerp", {"parameters": {"weight": [0.3, 0.7]}}),
    ("experts", "nuslerp", {"parameters": {"weight": [0.3, 0.7], "nuslerp_flatten": False}}),
    ("map", "nuslerp", {"base": "base", "parameters": {"weight": [0.3, 0.7]}}),
    ("map", "dare_ties", {"base": "base", "parameters": {"weight": 0.5, "density": 0.4}}),
    ("modules", "della", {"base": 0, "parameters": {"weight": [1.0, 0.5], "density": 0.4, "epsilon": 0.1}}),
    (
        "map",
        "task_arithmetic",
        {"base": "base", "parameters": {"weight": [1.0, 0.5]}, "out_dtype": torch.bfloat16},
    ),
    ("slerp", "slerp", {"base": "base", "parameters": {"t": 0.4}}),
]


def _api_models(kind, models):
    if kind == "seq":
        return [models["base"], models["a"], models["b"]]
    if kind == "modules":
        mods = random_models(3, seed=3)
        return mods
    if kind == "experts":
        return {"a": models["a"], "b": models["b"]}
    if kind == "slerp":
        return {"base": models["base"], "a": models["a"]}
    return dict(models)


@pytest.mark.mergekit
@pytest.mark.parametrize(("kind", "method", "kwargs"), API_CALLS, ids=lambda v: str(v)[:40])
def test_merge_state_dicts_is_a_drop_in_for_mergekits(mergekit, models, kind, method, kwargs):
    inputs = _api_models(kind, models)
    torch.manual_seed(SEED)
    with torch.no_grad():
        ours = merge_state_dicts(inputs, method, **kwargs)
        torch.manual_seed(SEED)
        ref = mergekit.merge_state_dicts(inputs, method, **kwargs)
    assert list(ours) == list(ref)
    tol = TOL if kwargs.get("out_dtype") is None else 1e-2
    assert max_diff(ours, ref) <= tol


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        (
            "dare_tie",
            {"base": "base", "parameters": {"weight": 1.0}},
            "unknown merge method 'dare_tie' (did you mean 'dare_ties'?)",
        ),
        (
            "breadcrumbs",
            {"base": "base", "parameters": {"density": 0.5}},
            "merge method 'breadcrumbs' needs parameter 'weight'",
        ),
        ("nuslerp", {"base": "base", "parameters": {}}, "merge method 'nuslerp' needs parameter 'weight'"),
        (
            "dare_ties",
            {"base": "base", "parameters": {"weight": 1.0, "density": 1.5}},
            "merge method 'dare_ties' parameter 'density'=1.5 is outside [0.0, 1.0]",
        ),
        (
            "della",
            {"base": "base", "parameters": {"weight": 1.0, "density": {"a": 0.5, "b": -0.1}}},
            "parameter 'density'=-0.1 is outside [0.0, 1.0] (expert 'b')",
        ),
        (
            "breadcrumbs",
            {"base": "base", "parameters": {"weight": 1.0, "gamma": 2.0}},
            "merge method 'breadcrumbs' parameter 'gamma'=2.0 is outside [0.0, 1.0]",
        ),
        (
            "slerp",
            {"base": "base", "parameters": {"t": 0.5}},
            "merge method 'slerp' needs the base and exactly 1 other model(s), got 2",
        ),
        (
            "slerp",
            {"base": "base", "parameters": {"t": 1.5}},
            "needs the base and exactly 1 other model(s), got 2",
        ),
        (
            "nuslerp",
            {"parameters": {"weight": 1.0}},
            "merge method 'nuslerp' needs exactly 2 expert model(s) besides the optional base, got 3",
        ),
        (
            "ties",
            {"parameters": {"weight": 1.0}},
            "merge method 'ties' needs a base model: pass base=<one of",
        ),
        (
            "della",
            {"base": "base", "parameters": {"weight": 1.0, "density": 0.1}},
            "merge method 'della' parameters 'density'=0.1 and 'epsilon'=0.15 (expert 'a')",
        ),
        (
            "ties",
            {"base": "base", "parameters": {"weight": 1.0, "gamma": 0.1}},
            "merge method 'ties' has no parameter 'gamma'",
        ),
        (
            "ties",
            {"base": "nope", "parameters": {"weight": 1.0}},
            "merge method 'ties': base 'nope' is not one of the models",
        ),
    ],
)
def test_bad_input_names_method_and_parameter(models, method, kwargs, message):
    with pytest.raises(EvomergeError) as err:
        merge_state_dicts(models, method, **kwargs)
    assert message in str(err.value)


def test_slerp_with_one_model_is_refused(models):
    with pytest.raises(EvomergeError, match=r"'slerp' needs the base and exactly 1 other model\(s\), got 0"):
        merge_state_dicts({"base": models["base"]}, "slerp", base="base", parameters={"t": 0.5})


def test_tensors_of_different_shapes_name_method_and_tensor(models):
    (wide,) = random_models(1, hidden=64)
    with pytest.raises(
        EvomergeError,
        match=r"merge method 'ties': tensor 'model.embed_tokens.weight' has shape \(\d+, 64\) in model 'wide'",
    ):
        merge_state_dicts(
            {"base": models["base"], "a": models["a"], "wide": wide.state_dict()},
            "ties",
            base="base",
            parameters={"weight": 1.0},
        )


def test_every_method_declares_fraction_ranges_and_counts():
    assert set(METHODS.names()) >= {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "slerp", "nuslerp", "model_stock", "sce",
    }  # fmt: skip
    for m in (METHODS.get(n) for n in METHODS.names()):
        for p in m.params:
            if p.name in {"density", "gamma", "epsilon", "t", "select_topk"}:
                assert (p.low, p.high) == (0.0, 1.0), (m.name, p.name)
    assert (METHODS.get("slerp").min_experts, METHODS.get("slerp").max_experts) == (1, 1)
    assert (METHODS.get("nuslerp").min_experts, METHODS.get("nuslerp").max_experts) == (2, 2)
    assert METHODS.get("model_stock").min_experts == 2
    dare = METHODS.get("dare_ties")
    assert {p.name: p.default for p in dare.params if not p.required} == {
        "density": 1.0, "normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False,
    }  # fmt: skip
