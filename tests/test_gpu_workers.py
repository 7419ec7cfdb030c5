"""Workers and GPUs, on a machine without one: Ray places workers by the GPUs declared to it
(``ray.init(num_gpus=2)``), and the streamed placement (task vectors in host memory, copied to the
device tensor by tensor; here the "device" is the CPU) gives the resident placement's weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny import save_model_set

from evomerge.errors import EvomergeError
from evomerge.models import ModelSet, SafetensorsDict
from evomerge.recipe import Recipe
from evomerge.workers import Where, Worker, WorkerPool, gpu_slots

TESTS = Path(__file__).resolve().parent
FITNESS = {"function": "fitness_fns:closeness"}


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    folders = save_model_set(tmp_path_factory.mktemp("gpu_models"), ["base", "a", "b"])
    return {"base": str(folders["base"]), "experts": {"a": str(folders["a"]), "b": str(folders["b"])}}


@pytest.fixture(scope="module")
def two_gpu_ray():
    """A local Ray that believes it has two GPUs; its workers import the test fitness functions."""
    ray = pytest.importorskip("ray")
    ray.shutdown()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), old) if p)
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def test_two_half_gpu_workers_share_one_gpu(two_gpu_ray, model_set):
    pool = WorkerPool(model_set, FITNESS, 2, where=Where("cpu", "host", gpus=0.5))
    try:
        placements = two_gpu_ray.get([a.placement.remote() for a in pool.actors])
    finally:
        pool.shutdown()
    ids = [p["gpu_ids"] for p in placements]
    assert len(ids[0]) == 1 and ids[0] == ids[1], placements
    assert placements[0]["worker"] != placements[1]["worker"]


def test_more_gpu_workers_than_gpus_are_refused_with_the_numbers(two_gpu_ray, model_set):
    with pytest.raises(EvomergeError) as e:
        WorkerPool(model_set, FITNESS, 4, where=Where("cpu", "host", gpus=1.0))
    assert str(e.value) == (
        "workers: 4 with gpus_per_worker 1 need 4 GPUs; the Ray cluster has 2 on 1 node(s), room for 2 "
        "worker(s): set workers: auto or 2, or a smaller gpus_per_worker"
    )
    with pytest.raises(
        EvomergeError, match=r"^gpus_per_worker is 3 but no node of the Ray cluster has more than 2"
    ):
        WorkerPool(model_set, FITNESS, 1, where=Where("cpu", "host", gpus=3.0))
    assert gpu_slots(two_gpu_ray, 0.5, "auto") == 4
    assert gpu_slots(two_gpu_ray, 2.0, "auto") == 1
    assert gpu_slots(two_gpu_ray, 1.0, 2) == 2


def test_experts_are_read_tensor_by_tensor_from_safetensors(model_set):
    models = ModelSet(**model_set)
    base = models.load_model()
    lazy = models.expert_state_dicts(base.state_dict())["a"]
    assert isinstance(lazy, SafetensorsDict)
    loaded = models.load_model(model_set["experts"]["a"]).state_dict()
    assert set(lazy) <= set(loaded)
    for name in lazy:
        assert torch.equal(lazy[name], loaded[name]), name
    # names the model does not know (a checkpoint transformers converts on load): loaded as a model
    assert not isinstance(models.expert_state_dicts({"other": torch.zeros(1)})["a"], SafetensorsDict)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_a_streamed_worker_merges_what_a_resident_one_does(model_set, method):
    threads = torch.get_num_threads()
    try:
        resident = Worker(model_set, FITNESS, where=Where("cpu", "host"))
        streamed = Worker(model_set, FITNESS, where=Where("cpu", "streamed"))
    finally:
        torch.set_num_threads(threads)
    params = {"weight": [0.7, 0.4]} if method == "task_arithmetic" else {"weight": [0.7, 0.4], "density": 0.5}
    recipe = Recipe.uniform(method, params)
    a = {k: v.clone() for k, v in resident.materialize(recipe).state_dict().items()}
    b = streamed.materialize(recipe).state_dict()
    assert streamed.merger.memory().host > 0 and resident.placement()["placement"] == "host"
    for name, t in a.items():
        assert torch.equal(t, b[name]), name


def test_cuda_workers_need_a_gpu_torch_can_see():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EvomergeError, match=r"^device is cuda but torch .* sees no GPU"):
        Where("cuda", "device", gpus=1.0).torch_device()
