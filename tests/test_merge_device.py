"""The merge engine on any device: resident and streamed placements give identical weights, nothing a
merge creates lands off its inputs' device, and (where a GPU is present) GPU merges equal CPU ones.

Without a GPU, device-correctness is checked on the CPU with torch's default device set to "meta":
any tensor the merge code creates without naming its device is then a meta tensor, and combining it
with the CPU inputs raises (or yields a meta result that cannot be read back).
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import METHODS, Merger, base, fused, kernels, nuslerp, orderstats
from evomerge.merge.kernels import DEVICE_CHUNK, STORE
from evomerge.merge.streams import make_stream

EXPERTS = {1: ["a"], 2: ["a", "b"], 3: ["a", "b", "c"]}
PARAMS = {  # every registered method, with per-model values for 3 experts (cut to K)
    "linear": {"weight": [0.6, 0.3, 0.1], "base_weight": 0.2},
    "task_arithmetic": {"weight": [0.6, 0.3, 0.4], "lambda": 0.9},
    "ties": {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.3]},
    "dare_ties": {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.3]},
    "dare_linear": {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.7, 0.3], "normalize": True},
    "breadcrumbs": {"weight": [0.6, 0.4, 0.3], "density": [0.8, 0.9, 0.7], "gamma": 0.01},
    "breadcrumbs_ties": {"weight": [0.6, 0.4, 0.3], "density": [0.8, 0.9, 0.7], "gamma": 0.01},
    "della": {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.6, 0.4], "epsilon": 0.1},
    "della_linear": {"weight": [0.6, 0.4, 0.3], "density": [0.5, 0.6, 0.4], "epsilon": 0.1},
    "sce": {"select_topk": 0.3},
    "model_stock": {"filter_wise": True},
    "nuslerp": {"weight": [0.6, 0.4]},
    "slerp": {"t": 0.3},
    "tsv": {"weight": [0.6, 0.4, 0.3], "rank_fraction": 0.5},
    "iso_c": {"lambda": 0.8},
    "iso_cts": {"common_space_fraction": 0.6},
    "star": {"weight": [0.6, 0.4, 0.3], "eta": 0.5},
    "cart": {"weight": [0.6, 0.4, 0.3], "rank_fraction": 0.2},
    "magmax": {"weight": [0.6, 0.4, 0.3], "lambda": 0.7},
    "lines": {"weight": [0.6, 0.4, 0.3], "shallow": 0.3, "deep": 1.2},
}
K = {"slerp": 1, "nuslerp": 2}  # the others merge 3 experts
# SVDs of this file's 1000-wide embedding take seconds each: these run with -m slow (and streamed vs
# resident on tiny models in tests/test_merge_subspace.py)
SUBSPACE = {"tsv", "iso_c", "iso_cts", "star", "cart"}


def params_for(method: str) -> dict:
    k = K.get(method, 3)
    return {n: (v[:k] if isinstance(v, list) else v) for n, v in PARAMS[method].items()}


def random_state_dicts(k: int, seed: int = 0) -> tuple[dict, dict]:
    """A small model: an embedding over STORE elements (chunked sums, byte masks), tied to the head,
    matrices, a norm vector, a 3-D tensor (della ranks along dim 1) and a non-float buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(STORE // 1000 + 8, 1000, generator=g) * 0.02,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 40, generator=g) * 0.02,
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 40, generator=g) * 0.02,
        "model.layers.0.input_layernorm.weight": torch.ones(40),
        "model.layers.1.conv.weight": torch.randn(4, 6, 8, generator=g),
        "model.rotary.position_ids": torch.arange(16),
    }
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    experts = {}
    for e in EXPERTS[k]:
        x = {
            n: (t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
            for n, t in sd.items()
        }
        x["model.layers.0.mlp.up_proj.weight"][:, :3] = sd["model.layers.0.mlp.up_proj.weight"][
            :, :3
        ]  # zeros
        x["lm_head.weight"] = x["model.embed_tokens.weight"]
        experts[e] = x
    return sd, experts


@pytest.fixture(scope="module")
def inputs():
    return {k: random_state_dicts(k) for k in EXPERTS}


@pytest.fixture(scope="module")
def placements(inputs):
    """(resident, streamed) Mergers per expert count, built on the meta default device; the streamed
    ones prepared for every method ahead (on the CPU threads, from staged copies), the resident ones
    computing their statistics on first use. Keyed masks take the eager path here (the fused kernels'
    compile is paid in ``test_fused_kernels_create_nothing_off_device`` only)."""
    out = {}
    with torch.device("meta"):
        for k, (sd, experts) in inputs.items():
            resident = Merger(sd, experts)
            streamed = Merger(sd, experts, streamed=True)
            streamed.prepare([m for m in METHODS.names() if K.get(m, 3) == k and m not in SUBSPACE])
            resident.fuse = streamed.fuse = False
            out[k] = (resident, streamed)
    return out


def assert_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name


def test_every_method_has_parameters_here():
    assert set(PARAMS) == set(METHODS.names())


CASES = [
    pytest.param(m, "mergekit", marks=[pytest.mark.slow] if m in SUBSPACE else []) for m in sorted(PARAMS)
] + [(m, "keyed") for m in sorted(PARAMS) if METHODS.get(m).random_masks]


@pytest.mark.parametrize(("method", "random"), CASES)
def test_streamed_equals_resident_and_creates_nothing_off_device(placements, method, random):
    resident, streamed = placements[K.get(method, 3)]
    resident.random = streamed.random = random
    with torch.device("meta"):
        a = resident.merge(method, params_for(method))
        b = streamed.merge(method, params_for(method))
    assert all(t.device.type == "cpu" for t in b.values())
    assert_equal(a, b)
    assert b["lm_head.weight"] is b["model.embed_tokens.weight"]
    assert torch.equal(b["model.rotary.position_ids"], torch.arange(16))


def test_streamed_writes_into_a_model_in_place(placements):
    """A preallocated model (one tensor in bfloat16, the head tied to the embedding) is overwritten."""
    resident, streamed = placements[3]
    params = params_for("ties")
    target = {
        n: torch.full_like(t, float("nan")) if t.is_floating_point() else torch.zeros_like(t)
        for n, t in resident.base.items()
    }
    target["model.layers.0.mlp.up_proj.weight"] = target["model.layers.0.mlp.up_proj.weight"].bfloat16()
    target["lm_head.weight"] = target["model.embed_tokens.weight"]
    with torch.device("meta"):
        got = streamed.merge("ties", params, out=target)
    ref = resident.merge("ties", params)
    for n, t in target.items():
        assert got[n] is t
        assert torch.equal(t, ref[n].to(t.dtype)), n


def test_memory_by_place_and_part(placements):
    resident, streamed = placements[3]
    resident.merge("ties", params_for("ties"))
    streamed.merge("ties", params_for("ties"))
    r, s = resident.memory(), streamed.memory()
    sd, _ = random_state_dicts(3)
    model = sum(t.numel() * 4 for n, t in sd.items() if t.is_floating_point() and n != "lm_head.weight")
    largest = max(t.numel() * 4 for t in sd.values())
    for m in (r, s):
        assert m.device == 0 and m.host == m.total  # a CPU Merger holds everything in host memory
        assert m.parts["base"] == model + 16 * 8  # the int64 buffer besides the floats
        assert m.parts["task_vectors"] == 3 * model
        assert m.parts["statistics"] > 0  # the magnitude sketches of ties
        assert sum(m.parts.values()) == m.total
    assert r.parts["staging"] == 0 and s.parts["staging"] == 3 * largest  # one buffer on a CPU
    assert resident.nbytes() == r.total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_merges_round_the_float32_merge_once(inputs, dtype):
    """In a 16-bit compute dtype (the workers' default on GPUs) base and task vectors are held in it,
    the arithmetic runs in float32 and each element is rounded once: every method equals the float32
    merge of the same 16-bit base and task vectors, rounded."""
    for method in sorted(set(PARAMS) - SUBSPACE):
        sd, experts = inputs[K.get(method, 3)]
        narrow = Merger(sd, experts, dtype, seed=1, random="keyed")
        rounded = {n: t.to(dtype).float() if t.is_floating_point() else t for n, t in sd.items()}
        rounded["lm_head.weight"] = rounded["model.embed_tokens.weight"]
        wide = Merger(rounded, experts, seed=1, random="keyed")
        for name, d in narrow.deltas.items():
            wide.deltas[name].copy_(d)
        narrow.fuse = wide.fuse = False
        got, ref = narrow.merge(method, params_for(method)), wide.merge(method, params_for(method))
        for name, t in got.items():
            assert t.dtype == (dtype if t.is_floating_point() else torch.int64)
            assert torch.equal(t, ref[name].to(t.dtype)), f"{method} {name}"


def test_device_chunking_gives_the_same_merges(inputs, monkeypatch):
    """On a GPU the loops run in chunks of DEVICE_CHUNK elements (whole tensors here): the same
    results as the CPU's chunks, to float32 rounding of sums."""
    sd, experts = inputs[3]
    merger = Merger(sd, experts, seed=4, random="keyed")
    merger.fuse = False
    refs = {m: merger.merge(m, params_for(m)) for m in PARAMS if K.get(m, 3) == 3 and m not in SUBSPACE}
    for module in (base, kernels, orderstats, nuslerp):
        monkeypatch.setattr(module, "chunk_size", lambda device: DEVICE_CHUNK)
    merger = Merger(sd, experts, seed=4, random="keyed")
    merger.fuse = False
    for method, ref in refs.items():
        got = merger.merge(method, params_for(method))
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=f"{method} {name}")


def test_torch_sort_sketch_equals_numpy_sketch():
    """What a GPU computes for an order sketch (torch.sort, searchsorted) equals the CPU's (numpy)."""
    g = torch.Generator().manual_seed(1)
    for n in (1, 255, 256, 257, 5000):
        x = torch.randn(n, generator=g).abs()
        x[::7] = 0  # zeros
        x[1::5] = x[n // 2]  # a run of ties
        ours = orderstats._torch_sketch(x.clone())
        theirs = orderstats._numpy_sketch(x.clone())
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]) and ours[2] == theirs[2]


@pytest.mark.skipif(fused._compiled() is None, reason="torch.compile cannot build kernels here")
def test_fused_kernels_create_nothing_off_device(inputs):
    """The fused dare kernels (a model with a tensor of MIN_NUMEL elements), streamed, on the meta
    default device, against the resident merge."""
    sd, experts = inputs[3]
    resident = Merger(sd, experts, seed=3, random="keyed")
    with torch.device("meta"):
        streamed = Merger(sd, experts, seed=3, random="keyed", streamed=True)
        x = streamed.inputs("model.embed_tokens.weight", stream=make_stream("keyed", 3))
        assert fused.applies(x)
    ref = resident.merge("dare_ties", params_for("dare_ties"))  # the l1 and the consensus kernels
    with torch.device("meta"):
        got = streamed.merge("dare_ties", params_for("dare_ties"))
    assert_equal(ref, got)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("random", ["mergekit", "keyed"])
def test_gpu_merges_equal_cpu_merges(inputs, random):
    """Every method on a GPU (resident and streamed from pinned memory) against the CPU: the streamed
    placement is identical to the resident one, and both within float32 rounding of the CPU's (della's
    row ranks may break magnitude ties differently on a GPU: argsort's tie order is the device's).
    The SVD methods are not here: a GPU's SVD rounds otherwise."""
    for method in sorted(set(PARAMS) - SUBSPACE):
        if random == "keyed" and not METHODS.get(method).random_masks:
            continue
        sd, experts = inputs[K.get(method, 3)]
        on_gpu = {n: t.cuda() for n, t in sd.items()}
        on_gpu["lm_head.weight"] = on_gpu["model.embed_tokens.weight"]
        cpu = Merger(sd, experts, seed=5, random=random).merge(method, params_for(method))
        resident = Merger(on_gpu, experts, seed=5, random=random)
        streamed = Merger(on_gpu, experts, seed=5, random=random, streamed=True)
        assert streamed.host is not None and streamed.host.pinned
        a = resident.merge(method, params_for(method))
        b = streamed.merge(method, params_for(method))
        assert_equal(a, b)
        assert b["lm_head.weight"] is b["model.embed_tokens.weight"]
        for name, t in a.items():
            assert t.is_cuda, name
            if method.startswith("della"):
                continue
            torch.testing.assert_close(t.cpu(), cpu[name], rtol=0, atol=1e-6, msg=f"{method} {name}")
        r, s = resident.memory(), streamed.memory()
        assert (
            r.parts["task_vectors"] == s.parts["task_vectors"] <= r.device
            and s.host >= s.parts["task_vectors"]
        )


@cuda
def test_device_override_and_cpu_experts_in_bfloat16(inputs):
    sd, experts = inputs[3]
    half = {
        e: {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in x.items()}
        for e, x in experts.items()
    }
    merger = Merger(sd, half, device="cuda", streamed=True)
    assert all(t.is_cuda for t in merger.base.values())
    got = merger.merge("task_arithmetic", params_for("task_arithmetic"))
    ref = Merger(sd, half).merge("task_arithmetic", params_for("task_arithmetic"))
    for name in ref:
        torch.testing.assert_close(got[name].cpu(), ref[name], rtol=0, atol=1e-6)
