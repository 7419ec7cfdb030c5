"""task_arithmetic, linear and ties against their closed forms, without mergekit.

Two kinds of check, each through ``evomerge.merge_state_dicts`` and through ``evomerge.Merger``:

- hand-made tensors (2x3, 1x8) whose merged values are written out below as literal numbers;
- small random state dicts against a dense reference written here in plain torch (float64 on the
  same float32 task vectors), for several weights, densities, ``normalize`` and ``lambda`` settings.

The semantics are mergekit's (README, "Merge engine"):

    task_arithmetic  base + lambda * sum_i w_i d_i              (/ sum_i w_i when normalize)
    linear           (w_base base + sum_i w_i x_i) / (w_base + sum_i w_i)   (no division without normalize)
    ties             t_i = d_i kept at its k_i = max(1, int(density_i * n)) largest |d_i|
                     (of magnitudes tied at the threshold, the first by index);
                     d'_i = w_i t_i;  M = +1 where sum_i d'_i >= 0 else -1;  m_i = [sign(d'_i) = M];
                     base + lambda * sum_i m_i d'_i / D,  D = sum_i m_i w_i (0 -> 1), 1 without normalize

with d_i = x_i - base. No test here imports mergekit; ``test_merges_without_mergekit`` runs the
three merges in a Python where importing mergekit fails.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import evomerge

ATOL = 1e-6
PATHS = ["merge_state_dicts", "Merger"]


def assert_close(actual: torch.Tensor, expected, atol: float = ATOL) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=atol, rtol=0)


def merge(path: str, method: str, base, experts: dict, params: dict) -> dict[str, torch.Tensor]:
    """One merge of ``experts`` onto ``base`` by either entry point (per-expert values in expert
    order, or keyed by expert id, mean the same to both)."""
    if path == "merge_state_dicts":
        return evomerge.merge_state_dicts({"base": base, **experts}, method, base="base", parameters=params)
    return evomerge.Merger(base, experts).merge(method, params)


def merge_linear(path: str, base, experts: dict, weight: list[float], base_weight: float | None, **shared):
    """linear by either entry point: ``base_weight`` None merges the experts alone (no base at all).

    merge_state_dicts takes mergekit's form, one weight per input with the base among them; the
    Merger takes the experts' weights and ``base_weight``."""
    if path == "merge_state_dicts":
        if base_weight is None:
            return evomerge.merge_state_dicts(experts, "linear", parameters={"weight": weight, **shared})
        models = {"base": base, **experts}
        return evomerge.merge_state_dicts(
            models, "linear", base="base", parameters={"weight": [base_weight, *weight], **shared}
        )
    if base_weight is None:
        return evomerge.Merger(None, experts).merge("linear", {"weight": weight, **shared})
    return evomerge.Merger(base, experts).merge(
        "linear", {"weight": weight, "base_weight": base_weight, **shared}
    )


# --- hand-made tensors -----------------------------------------------------------------------------------

# 2x3: d_a = a - base = [[1, -2, 0.5], [0, 2, -1]],  d_b = b - base = [[-1, 1, 1], [2, 0, 3]]
BASE23 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
A23 = torch.tensor([[2.0, 0.0, 3.5], [4.0, 7.0, 5.0]])
B23 = torch.tensor([[0.0, 3.0, 4.0], [6.0, 5.0, 9.0]])
POS = torch.arange(3)  # a non-floating tensor: copied from the base


def sd23(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": t.clone(), "pos": POS.clone()}


# weights (1.5, 0.5): sum_i w_i d_i = [[1, -2.5, 1.25], [1, 3, 0]], sum_i w_i = 2
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shared, expected",
    [
        ({}, [[2.0, -0.5, 4.25], [5.0, 8.0, 6.0]]),  # defaults: normalize false, lambda 1
        ({"normalize": False, "lambda": 1.0}, [[2.0, -0.5, 4.25], [5.0, 8.0, 6.0]]),
        ({"normalize": True}, [[1.5, 0.75, 3.625], [4.5, 6.5, 6.0]]),
        ({"normalize": True, "lambda": 0.5}, [[1.25, 1.375, 3.3125], [4.25, 5.75, 6.0]]),
        ({"normalize": False, "lambda": -1.0}, [[0.0, 4.5, 1.75], [3.0, 2.0, 6.0]]),
    ],
)
def test_task_arithmetic_by_hand(path, shared, expected):
    out = merge(
        path,
        "task_arithmetic",
        sd23(BASE23),
        {"a": sd23(A23), "b": sd23(B23)},
        {"weight": [1.5, 0.5], **shared},
    )
    assert_close(out["w"], expected)
    assert torch.equal(out["pos"], POS)


# weights (1.5, 0.5): 1.5 a + 0.5 b = [[3, 1.5, 7.25], [9, 13, 12]]; with the base at weight 2 added,
# 2 base + 1.5 a + 0.5 b = [[5, 5.5, 13.25], [17, 23, 24]] and the weights sum to 4
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "base_weight, shared, expected",
    [
        (None, {}, [[1.5, 0.75, 3.625], [4.5, 6.5, 6.0]]),  # default: normalize true
        (None, {"normalize": False}, [[3.0, 1.5, 7.25], [9.0, 13.0, 12.0]]),
        (0.0, {"normalize": True}, [[1.5, 0.75, 3.625], [4.5, 6.5, 6.0]]),  # base given, weight 0: left out
        (2.0, {}, [[1.25, 1.375, 3.3125], [4.25, 5.75, 6.0]]),
        (2.0, {"normalize": False}, [[5.0, 5.5, 13.25], [17.0, 23.0, 24.0]]),
    ],
)
def test_linear_by_hand(path, base_weight, shared, expected):
    out = merge_linear(
        path, sd23(BASE23), {"a": sd23(A23), "b": sd23(B23)}, [1.5, 0.5], base_weight, **shared
    )
    assert_close(out["w"], expected)
    assert torch.equal(out["pos"], POS)


# 1x8, density 0.5 (k = 4 of 8 each), weights (1.5, 0.5):
#   d_a = [4, -3, 2, -1, -2, 0, 2, 1]: |d_a| has 4, 3 and then three 2s (indices 2, 4, 6) for the last
#         two places: the first two by index stay, index 6 goes  -> t_a = [4, -3, 2, 0, -2, 0, 0, 0]
#   d_b = [-2, 1, 3, -4, -1, 2.5, 1.5, 0.5]                      -> t_b = [-2, 0, 3, -4, 0, 2.5, 0, 0]
#   d'_a = [6, -4.5, 3, 0, -3, 0, 0, 0],  d'_b = [-1, 0, 1.5, -2, 0, 1.25, 0, 0]
#   sum = [5, -4.5, 4.5, -2, -3, 1.25, 0, 0] -> M = [+, -, +, -, -, +, +, +]
#   m_a = [1, 1, 1, 0, 1, 0, 0, 0],  m_b = [0, 0, 1, 1, 0, 1, 0, 0]   (zeros never agree)
#   num = [6, -4.5, 4.5, -2, -3, 1.25, 0, 0],  D = [1.5, 1.5, 2, 0.5, 1.5, 0.5, 0 -> 1, 0 -> 1]
BASE8 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
DA8 = torch.tensor([[4.0, -3.0, 2.0, -1.0, -2.0, 0.0, 2.0, 1.0]])
DB8 = torch.tensor([[-2.0, 1.0, 3.0, -4.0, -1.0, 2.5, 1.5, 0.5]])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shared, expected",
    [
        ({}, [[5.0, -1.0, 5.25, 0.0, 3.0, 8.5, 7.0, 8.0]]),  # defaults: normalize true, lambda 1
        ({"normalize": False}, [[7.0, -2.5, 7.5, 2.0, 2.0, 7.25, 7.0, 8.0]]),
        ({"normalize": True, "lambda": 0.5}, [[3.0, 0.5, 4.125, 2.0, 4.0, 7.25, 7.0, 8.0]]),
    ],
)
def test_ties_by_hand(path, shared, expected):
    experts = {"a": {"w": BASE8 + DA8}, "b": {"w": BASE8 + DB8}}
    params = {"weight": [1.5, 0.5], "density": 0.5, **shared}
    out = merge(path, "ties", {"w": BASE8.clone()}, experts, params)
    assert_close(out["w"], expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "density, kept",
    [
        (0.5, [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]),  # k = 4 of 8 equal magnitudes: the first 4
        (0.3, [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # k = int(2.4) = 2
        (0.1, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # int(0.8) = 0: at least one is kept
        (1.0, [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]),  # no trimming
    ],
)
def test_ties_keeps_the_first_of_tied_magnitudes(path, density, kept):
    """Every |d| equal: which survive is decided by index alone (one expert, so every kept entry
    agrees with the elected sign and D = w)."""
    base = torch.full((1, 8), 0.5)
    d = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    out = merge(path, "ties", {"w": base}, {"a": {"w": base + d}}, {"weight": [0.25], "density": density})
    assert_close(out["w"], [[0.5 + v for v in kept]])


def test_ties_tie_at_the_threshold_spanning_rows():
    """The tie in d_a above, in a larger tensor (the 1x8 pattern twice, 2x8): k = 8 of 16 now keeps the
    two 4s, two 3s and four of the six 2s: the first four by flat index (2, 4, 6 in row 0, 2 in
    row 1)."""
    da = torch.cat([DA8, DA8])
    base = torch.zeros(2, 8)
    out = merge("Merger", "ties", {"w": base}, {"a": {"w": da}}, {"weight": [1.0], "density": 0.5})
    expected = [[4.0, -3.0, 2.0, 0.0, -2.0, 0.0, 2.0, 0.0], [4.0, -3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert_close(out["w"], expected)


# --- random tensors against a dense reference --------------------------------------------------------------

SHAPES = {"w1": (4, 6), "bias": (10,), "w3": (2, 3, 5)}


@pytest.fixture(scope="module")
def random_sds():
    """A base and three experts: float32 tensors of three shapes, plus an integer buffer."""
    g = torch.Generator().manual_seed(1234)
    base = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    base["ids"] = torch.arange(5)
    experts = {}
    for e in ("a", "b", "c"):
        sd = {name: base[name] + 0.5 * torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
        sd["ids"] = base["ids"].clone()
        experts[e] = sd
    return base, experts


def per_expert(value, experts: list[str]) -> list[float]:
    if isinstance(value, dict):
        return [float(value[e]) for e in experts]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)] * len(experts)


def ref_task_arithmetic(base, xs, weight, normalize=False, lam=1.0):
    deltas = [(x - base).double() for x in xs]  # the float32 task vectors, as the engine takes them
    total = sum(w * d for w, d in zip(weight, deltas, strict=True))
    if normalize:
        total = total / sum(weight)
    return base.double() + lam * total


def ref_linear(base, xs, weight, base_weight, normalize=True):
    total = sum(w * x.double() for w, x in zip(weight, xs, strict=True))
    if base is not None:
        total = total + base_weight * base.double()
    if normalize:
        total = total / (sum(weight) + (base_weight if base is not None else 0.0))
    return total


def trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """d kept at its k = max(1, int(density * n)) largest magnitudes, ties going to the lower index."""
    if density >= 1:
        return d.clone()
    flat = d.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros_like(flat)
    mask[order[:k]] = 1
    return (flat * mask).reshape(d.shape)


def ref_ties(base, xs, weight, density, normalize=True, lam=1.0):
    trimmed = [trim(x - base, p).double() for x, p in zip(xs, density, strict=True)]
    weighted = [w * t for w, t in zip(weight, trimmed, strict=True)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    masks = [(torch.sign(t) == elected).double() for t in weighted]
    num = sum(m * t for m, t in zip(masks, weighted, strict=True))
    if normalize:
        den = sum(m * w for m, w in zip(masks, weight, strict=True))
        num = num / torch.where(den == 0, 1.0, den)
    return base.double() + lam * num


TA_CASES = [
    {"weight": [0.7, 0.3, 0.5]},
    {"weight": [1.0, 1.0, 1.0], "normalize": True},
    {"weight": {"a": 0.2, "b": 0.9, "c": 0.4}, "normalize": True, "lambda": 0.6},
    {"weight": [0.8, -0.4, 1.3], "lambda": 2.0},
    {"weight": 0.5, "normalize": False, "lambda": -0.5},
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("params", TA_CASES)
def test_task_arithmetic_random(random_sds, path, params):
    base, experts = random_sds
    names = list(experts)
    out = merge(path, "task_arithmetic", base, experts, params)
    for name in SHAPES:
        expected = ref_task_arithmetic(
            base[name],
            [experts[e][name] for e in names],
            per_expert(params["weight"], names),
            params.get("normalize", False),
            params.get("lambda", 1.0),
        )
        assert_close(out[name], expected)
    assert torch.equal(out["ids"], base["ids"])


LINEAR_CASES = [
    ([0.7, 0.3, 0.5], None, {}),
    ([0.7, 0.3, 0.5], None, {"normalize": False}),
    ([0.2, 0.9, 0.4], 0.6, {}),
    ([1.5, -0.5, 0.25], 1.0, {"normalize": True}),
    ([0.5, 0.5, 0.5], 2.0, {"normalize": False}),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight, base_weight, shared", LINEAR_CASES)
def test_linear_random(random_sds, path, weight, base_weight, shared):
    base, experts = random_sds
    out = merge_linear(path, base, experts, weight, base_weight, **shared)
    for name in SHAPES:
        expected = ref_linear(
            base[name] if base_weight is not None else None,
            [experts[e][name] for e in experts],
            weight,
            base_weight or 0.0,
            shared.get("normalize", True),
        )
        assert_close(out[name], expected)


TIES_CASES = [
    {"weight": [0.7, 0.3, 0.5], "density": 0.5},
    {"weight": [1.0, 1.0, 1.0]},  # density 1: sign election alone
    {"weight": [0.6, 0.4, 0.8], "density": {"a": 0.2, "b": 0.7, "c": 0.45}, "normalize": False},
    {"weight": [0.5, 1.2, 0.3], "density": [0.3, 1.0, 0.6], "lambda": 0.7},
    {"weight": [0.9, -0.4, 0.6], "density": 0.35, "normalize": False, "lambda": 1.5},
    {"weight": {"a": 0.3, "b": 0.3, "c": 2.0}, "density": 0.05, "normalize": True, "lambda": 2.0},
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("params", TIES_CASES)
def test_ties_random(random_sds, path, params):
    base, experts = random_sds
    names = list(experts)
    out = merge(path, "ties", base, experts, params)
    for name in SHAPES:
        expected = ref_ties(
            base[name],
            [experts[e][name] for e in names],
            per_expert(params["weight"], names),
            per_expert(params.get("density", 1.0), names),
            params.get("normalize", True),
            params.get("lambda", 1.0),
        )
        assert_close(out[name], expected)
    assert torch.equal(out["ids"], base["ids"])


def test_one_merger_gives_every_setting_its_closed_form(random_sds):
    """A Merger keeps per-tensor statistics between merges: all the settings above, in turn through
    one Merger, still give their closed forms."""
    base, experts = random_sds
    names = list(experts)
    merger = evomerge.Merger(base, experts)
    for _ in range(2):
        for params in TIES_CASES:
            out = merger.merge("ties", params)
            for name in SHAPES:
                expected = ref_ties(
                    base[name],
                    [experts[e][name] for e in names],
                    per_expert(params["weight"], names),
                    per_expert(params.get("density", 1.0), names),
                    params.get("normalize", True),
                    params.get("lambda", 1.0),
                )
                assert_close(out[name], expected)
        for params in TA_CASES:
            out = merger.merge("task_arithmetic", params)
            for name in SHAPES:
                expected = ref_task_arithmetic(
                    base[name],
                    [experts[e][name] for e in names],
                    per_expert(params["weight"], names),
                    params.get("normalize", False),
                    params.get("lambda", 1.0),
                )
                assert_close(out[name], expected)


def test_merges_without_mergekit():
    """The three methods run in a Python where ``import mergekit`` fails."""
    code = """
import sys
sys.modules["mergekit"] = None  # any import of mergekit or a submodule now raises ImportError
import torch
import evomerge
base = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
a = {"w": torch.tensor([[2.0, 0.0, 3.5], [4.0, 7.0, 5.0]])}
b = {"w": torch.tensor([[0.0, 3.0, 4.0], [6.0, 5.0, 9.0]])}
models = {"base": base, "a": a, "b": b}
for method, params in [
    ("task_arithmetic", {"weight": [1.5, 0.5]}),
    ("linear", {"weight": [0.0, 1.5, 0.5]}),
    ("ties", {"weight": [1.5, 0.5], "density": 0.5}),
]:
    evomerge.merge_state_dicts(models, method, base="base", parameters=params)
    evomerge.Merger(base, {"a": a, "b": b}).merge(method, {"weight": [1.5, 0.5]} | (
        {"density": 0.5} if method == "ties" else {}))
assert not any(m == "mergekit" or m.startswith("mergekit.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
