"""The memory plan: model sizes from safetensors headers alone (7B and 70B shapes without weights), the
arithmetic of each placement, the choice, the refusals, and `evomerge plan`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.plan import (
    DEVICE_MARGIN,
    HOST_PROCESS,
    SKETCH_FRACTION,
    Machine,
    merge_work,
    model_shape,
    parse_bytes,
    plan,
    worker_memory,
)
from evomerge.preflight import plan_run
from evomerge.shapes import KEPT_TABLE_BYTES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "experiments" / "shapes"
GiB = 2**30

MISTRAL_7B = json.loads((SHAPES / "mistral-7b" / "config.json").read_text())
LLAMA_70B = json.loads((SHAPES / "llama-70b" / "config.json").read_text())


def header_only_folder(folder: Path, config: dict, dtype: str = "BF16") -> int:
    """A model folder whose safetensors file holds the header of every tensor of ``config``'s model and no
    weights (the plan never reads past the header). Returns the model's parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    data = dict(config)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    header, offset, total = {}, 0, 0
    for name, p in model.named_parameters():
        size = p.numel() * 2
        header[name] = {"dtype": dtype, "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
        total += p.numel()
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return total


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes") / "mistral-7b"
    return folder, header_only_folder(folder, MISTRAL_7B)


def test_sizes_come_from_headers_and_equal_the_config_sizing(seven_b, tmp_path):
    folder, params = seven_b
    from_headers = model_shape(str(folder))
    from_config = model_shape(str(SHAPES / "mistral-7b"))
    assert from_headers.source == "safetensors headers" and from_config.source == "config.json"
    assert from_headers.elements == from_config.elements == params
    assert 7.2e9 < params < 7.3e9
    assert from_headers.largest == 32000 * 4096
    assert from_headers.bytes("bfloat16") == 2 * params
    assert from_headers.stored == {"BF16"}


def test_placement_arithmetic():
    m, big, k = 10 * GiB, GiB, 3
    kw = dict(model_bytes=m, largest_bytes=big, experts=k)
    device = worker_memory("device", **kw)
    assert (device.device, device.host) == ((k + 2) * m, 0)
    streamed = worker_memory("streamed", **kw)
    assert (streamed.device, streamed.host) == (2 * m + 2 * k * big, k * m)
    host = worker_memory("host", **kw)
    assert (host.device, host.host) == (0, (k + 2) * m)
    # sketches are host memory; the device peaks at the larger of the sketch sort and scratch + activations
    extra = dict(sketch_bytes=5, scratch_bytes=7, activation_bytes=11)
    assert worker_memory("device", **kw, **extra, transient_bytes=3) == type(device)((k + 2) * m + 18, 5)
    assert worker_memory("device", **kw, **extra, transient_bytes=100) == type(device)((k + 2) * m + 100, 5)
    assert worker_memory("host", **kw, **extra).host == (k + 2) * m + 5 + 18
    scratch, transient = merge_work(2**30, 3, cuda=True, sketches=True)
    assert (scratch, transient) == (13 * 2**24 * 4, 28 * 2**30)
    assert merge_work(2**30, 3, cuda=False, sketches=False) == (13 * 2**18 * 4, 0)
    with pytest.raises(EvomergeError, match="unknown placement 'disk'; allowed: device, streamed, host"):
        worker_memory("disk", **kw)


def test_keyed_dare_tables_are_counted_per_large_tensor_and_expert(seven_b):
    """Mistral-7B: 32 layers x 7 matrices, the embeddings and lm_head are tabled; the norms are not."""
    from_headers, from_config = model_shape(str(seven_b[0])), model_shape(str(SHAPES / "mistral-7b"))
    assert from_headers.tabled == from_config.tabled == 32 * 7 + 2
    machine = Machine("cuda", (80 * GiB,), host=256 * GiB, cpus=16)
    kw = dict(batch_size=8, max_length=1024, placement="streamed", sketches=False)
    plain = plan(from_headers, "bfloat16", 3, machine, **kw)
    tabled = plan(from_headers, "bfloat16", 3, machine, kept_tables=True, **kw)
    assert tabled.chosen.memory.host - plain.chosen.memory.host == 3 * 226 * KEPT_TABLE_BYTES
    assert tabled.chosen.memory.device == plain.chosen.memory.device


def test_seven_b_on_one_80gb_gpu_takes_the_device_placement_and_on_40gb_streams(seven_b):
    shape = model_shape(str(seven_b[0]))
    big = Machine("cuda", (80 * GiB,), host=256 * GiB, cpus=16)
    found = plan(shape, "bfloat16", 3, big, batch_size=8, max_length=1024)
    assert found.chosen.placement == "device" and found.workers == 1
    assert found.chosen.memory.device == pytest.approx((3 + 2) * found.model_bytes, rel=0.15)
    small = Machine("cuda", (40 * GiB,), host=256 * GiB, cpus=16)
    found = plan(shape, "bfloat16", 3, small, batch_size=8, max_length=1024)
    assert found.chosen.placement == "streamed"
    sketches = int(3 * shape.elements * 4 * SKETCH_FRACTION)  # TIES's magnitude sketches, host memory
    assert found.chosen.memory.host == 3 * found.model_bytes + sketches
    assert found.chosen.memory.device < 3 * found.model_bytes + 6 * GiB  # 2 models, buffers, activations
    text = "\n".join(found.lines())
    assert "7.24B parameters" in text and "chosen    streamed, 1 worker(s), 1 GPU(s) each" in text


def test_nothing_fits_is_one_line_with_the_numbers(seven_b):
    shape = model_shape(str(seven_b[0]))
    tiny_gpu = Machine("cuda", (16 * GiB,), host=256 * GiB, cpus=16, described="the machine described")
    with pytest.raises(EvomergeError) as e:
        plan(shape, "bfloat16", 3, tiny_gpu, batch_size=8, max_length=1024)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the models do not fit on the machine described (1 GPU(s), 256.0 GiB of host")
    assert "the model is 13.5 GiB in bfloat16" in msg
    assert "device needs" in msg and "streamed needs" in msg and "on a GPU of 16.0 GiB" in msg
    # the streamed placement's pinned host memory counts too
    no_host = Machine("cuda", (40 * GiB,), host=20 * GiB, cpus=16)
    with pytest.raises(EvomergeError, match="limited by host memory"):
        plan(shape, "bfloat16", 3, no_host, batch_size=8, max_length=1024)


def test_seventy_b_fits_only_streamed_over_eight_gpus(tmp_path):
    params = header_only_folder(tmp_path / "llama-70b", LLAMA_70B)
    assert 70e9 < params < 71e9
    shape = model_shape(str(tmp_path / "llama-70b"))
    node = Machine("cuda", (80 * GiB,) * 8, host=1024 * GiB, cpus=64)
    found = plan(shape, "bfloat16", 3, node, gpus_per_worker=8, batch_size=8, max_length=1024)
    assert found.chosen.placement == "streamed" and found.workers == 1
    with pytest.raises(EvomergeError, match="the models do not fit"):
        plan(shape, "bfloat16", 3, node, gpus_per_worker=1, batch_size=8, max_length=1024)


def test_fractional_gpus_put_two_workers_on_a_gpu_when_both_fit():
    shape = model_shape(str(SHAPES / "mistral-7b"))
    node = Machine("cuda", (141 * GiB,) * 2, host=1024 * GiB, cpus=64)
    kw = dict(batch_size=8, max_length=512, placement="streamed")
    half = plan(shape, "bfloat16", 2, node, gpus_per_worker=0.5, **kw)
    assert half.workers == 4  # two 2-GPU halves of ~32 GiB each per 141 GiB GPU
    whole = plan(shape, "bfloat16", 2, node, gpus_per_worker=1, **kw)
    assert whole.workers == 2
    with pytest.raises(EvomergeError, match=r"^5 worker\(s\) do not fit .*; it fits with workers: 4$"):
        plan(shape, "bfloat16", 2, node, gpus_per_worker=0.5, workers=5, **kw)


def test_cpu_plan_is_the_host_placement_limited_by_cores_or_memory():
    shape = model_shape(str(SHAPES / "mistral-7b"))
    box = Machine("cpu", (), host=200 * GiB, cpus=32)
    found = plan(shape, "float32", 3, box, batch_size=1, max_length=256)
    assert found.chosen.placement == "host"
    need = found.chosen.memory.host + HOST_PROCESS
    assert need > 5 * 27 * GiB and found.workers == 200 * GiB // need == 1
    assert found.chosen.limit == "host memory"
    assert plan(shape, "float32", 3, Machine("cpu", (), host=2000 * GiB, cpus=4), batch_size=1).workers == 4


def test_quantized_checkpoints_are_refused(tmp_path):
    quant = {**MISTRAL_7B, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps(quant))
    cfg = _config(tmp_path / "q", device="cpu")
    with pytest.raises(EvomergeError, match=r"^base .* is a gptq checkpoint; evomerge merges float weights"):
        plan_run(cfg)
    header_only_folder(tmp_path / "int8", MISTRAL_7B, dtype="I8")
    with pytest.raises(EvomergeError, match=r"stores weights as I8, which cannot be loaded as float32"):
        plan_run(_config(tmp_path / "int8", device="cpu"))


def _config(base: Path, **top) -> object:
    return parse_config(
        {
            "models": {"base": str(base), "experts": {"a": str(base), "b": str(base)}},
            "fitness": {"tasks": ["zoo_addition"]},
            **top,
        }
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * GiB),
        ("80GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TiB", int(1.5 * 2**40)),
        ("1024", 1024),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_bytes(text, "--gpu-memory") == expected


def test_bad_sizes_are_named():
    with pytest.raises(EvomergeError, match=r"--gpu-memory '80 apples' is not a size; write e.g. 80GiB"):
        parse_bytes("80 apples", "--gpu-memory")


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"device": "gpu"}, "config: device: must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        ({"device": "cuda", "gpus_per_worker": 1.5}, "must be at most 1 or a whole number of GPUs; got 1.5"),
        ({"device": "cpu", "gpus_per_worker": 1}, "gpus_per_worker is set but device is cpu"),
        ({"device": "cpu", "placement": "streamed"}, "placement 'streamed' needs a GPU"),
        ({"workers": 0}, "config: workers: must be at least 1 or auto; got 0"),
        ({"workers": "many"}, "config: workers: Input should be a valid integer"),
        ({"models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}, "dtype": "int8"}}, "models.dtype"),
    ],
)
def test_bad_placement_config_is_one_line(top, message):
    data = {
        "models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}},
        "fitness": {"tasks": ["zoo_addition"]},
    }
    with pytest.raises(EvomergeError) as e:
        parse_config({**data, **top})
    assert message in str(e.value) and "\n" not in str(e.value)


def _cli(*args: str):
    """The CLI in this process (its imports are paid once), from the repository root."""
    from click.testing import CliRunner

    from evomerge.cli import app

    done = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return SimpleNamespace(returncode=done.exit_code, stdout=done.stdout, stderr=done.stderr)


def test_plan_command_for_another_machine_and_its_refusals(monkeypatch):
    monkeypatch.chdir(ROOT)
    done = _cli(
        "plan", "experiments/plan-7b.yaml", "--device", "cuda", "--gpus", "1", "--gpu-memory", "80GiB",
        "--host-memory", "256GiB",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "chosen    device, 1 worker(s), 1 GPU(s) each" in done.stdout
    assert "13.5 GiB in bfloat16" in done.stdout
    small = _cli(
        "plan", "experiments/plan-7b.yaml", "--gpus", "1", "--gpu-memory", "16GiB", "--host-memory", "32GiB"
    )
    assert small.returncode == 2 and small.stderr.startswith(
        "error: the models do not fit on the machine described"
    )
    assert small.stderr.count("\n") == 1
    if not torch.cuda.is_available():  # the config says device: cuda
        here = _cli("plan", "experiments/plan-7b.yaml")
        assert here.returncode == 2
        assert here.stderr.startswith("error: device is cuda but torch") and "sees no GPU here" in here.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_run_on_cuda_without_a_gpu_stops_before_anything_loads(tmp_path):
    config = tmp_path / "gpu.yaml"
    config.write_text(
        "models: {base: zoo:base, experts: {a: zoo:addition, b: zoo:script}}\n"
        "fitness: {tasks: [zoo_addition]}\ndevice: cuda\n"
    )
    done = _cli("run", str(config), "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: device is cuda but torch ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_margins_are_in_the_fit():
    """A worker fits when its arithmetic plus the margins fit: the CUDA context and the libraries."""
    shape = model_shape(str(SHAPES / "mistral-7b"))
    probe = plan(shape, "bfloat16", 1, Machine("cuda", (1000 * GiB,), host=1000 * GiB, cpus=8), batch_size=1)
    need = probe.options[0].memory.device + DEVICE_MARGIN
    exact = Machine("cuda", (need,), host=1000 * GiB, cpus=8)
    assert plan(shape, "bfloat16", 1, exact, batch_size=1, placement="device").workers == 1
    short = Machine("cuda", (need - 1,), host=1000 * GiB, cpus=8)
    with pytest.raises(EvomergeError):
        plan(shape, "bfloat16", 1, short, batch_size=1, placement="device")


def test_sizes_past_any_float_read_as_a_power_of_ten():
    """An absurd setting (the config fuzz test drew batch_size 10^400) still gets its one-line refusal."""
    from evomerge.plan import size

    assert size(10**400) == "about 10^400 bytes"
    assert size(3 * 2**30) == "3.0 GiB"


# --- the plan chooses what fits (issue 27 part 5) ----------------------------------------------------------

# The shapes of Qwen2.5-7B and Qwen3-30B-A3B (a mixture of experts), sized from config.json alone.
QWEN_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
}
PYTHON = {"function": "math:fsum"}
LMEVAL = {"tasks": ["zoo_addition"]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Model folders holding only a config.json (the plan reads no weights)."""
    root = tmp_path_factory.mktemp("config-only")
    for name, cfg in (("qwen-7b", QWEN_7B), ("qwen3-30b-a3b", QWEN3_30B_A3B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def _three_experts(base: Path, fitness: dict, **top) -> object:
    experts = {name: str(base) for name in ("math", "code", "chat")}
    return parse_config({"models": {"base": str(base), "experts": experts}, "fitness": fitness, **top})


def _gpus(n: int, memory: int = 80 * GiB) -> Machine:
    return Machine("cuda", (memory,) * n, host=512 * GiB, cpus=32, described="the machine described")


def test_seven_b_with_three_experts_and_a_python_fitness_fits_one_80gb_gpu_with_workers_unset(shapes):
    found = plan_run(_three_experts(shapes / "qwen-7b", PYTHON), _gpus(1), "cuda")
    assert found.workers == 1 and found.chosen.placement == "device"
    assert found.activations == 2 * GiB  # the stated default for a function the plan cannot see
    text = "\n".join(found.lines())
    assert (
        "fitness   a Python function, 2.0 GiB reserved per worker (fitness.memory unset: the default)" in text
    )
    declared = plan_run(_three_experts(shapes / "qwen-7b", {**PYTHON, "memory": "6GiB"}), _gpus(1), "cuda")
    assert declared.activations == 6 * GiB and declared.chosen.memory.device == (
        found.chosen.memory.device + 4 * GiB
    )
    assert "6.0 GiB reserved per worker (fitness.memory)" in "\n".join(declared.lines())
    # on a CPU, workers unset is 2, as before
    cpu = Machine("cpu", (), host=1024 * GiB, cpus=8)
    assert plan_run(_three_experts(shapes / "qwen-7b", PYTHON), cpu, "cpu").workers == 2


def test_lm_eval_batch_is_the_largest_that_fits_and_reaches_the_workers(shapes):
    from evomerge.search import Search

    cfg = _three_experts(shapes / "qwen-7b", LMEVAL, placement="device")
    found = plan_run(cfg, _gpus(1), "cuda")
    assert 1 <= found.batch < 64 and found.workers == 1
    assert found.chosen.memory.device + DEVICE_MARGIN <= 80 * GiB
    text = "\n".join(found.lines())
    assert (
        f"lm-eval, batch {found.batch} x 2048 tokens (batch_size unset: the largest up to 64 that fits)"
        in text
    )
    assert f"1 fit (GPU memory), batch {found.batch}" in text
    # one more sequence does not fit: the refusal names the batch that does
    more = _three_experts(shapes / "qwen-7b", {**LMEVAL, "batch_size": found.batch + 1}, placement="device")
    with pytest.raises(EvomergeError, match=rf"; it fits with batch_size: {found.batch}$"):
        plan_run(more, _gpus(1), "cuda")
    # a batch that is set is used as set; the workers get the plan's batch
    assert (
        plan_run(_three_experts(shapes / "qwen-7b", {**LMEVAL, "batch_size": 1}), _gpus(1), "cuda").batch == 1
    )
    spec = Search._fitness_spec(SimpleNamespace(config=cfg, plan=found))
    assert spec["batch_size"] == found.batch


def test_a_moe_that_one_gpu_cannot_hold_spreads_over_gpus_or_is_refused_naming_how_many(shapes):
    base = shapes / "qwen3-30b-a3b"
    found = plan_run(_three_experts(base, PYTHON), _gpus(4), "cuda")
    assert 30e9 < found.shape.elements < 31e9
    assert (found.chosen.placement, found.gpus_per_worker, found.workers) == ("streamed", 2, 2)
    assert (
        "chosen    streamed, 2 worker(s), 2 GPU(s) each (gpus_per_worker unset: one GPU holds no worker)"
        in ("\n".join(found.lines()))
    )
    device = _three_experts(base, PYTHON, placement="device", gpus_per_worker=1)
    with pytest.raises(EvomergeError) as e:
        plan_run(device, _gpus(4), "cuda")
    assert str(e.value).startswith("the models do not fit on the machine described (4 GPU(s)")
    assert str(e.value).endswith("; it fits with gpus_per_worker: 4") and "\n" not in str(e.value)
    with pytest.raises(EvomergeError, match="; it fits with gpus_per_worker: 2$"):
        plan_run(_three_experts(base, PYTHON, gpus_per_worker=1), _gpus(4), "cuda")
    assert plan_run(_three_experts(base, PYTHON, placement="device"), _gpus(4), "cuda").gpus_per_worker == 4
    # nothing at all fits one GPU: the numbers, no suggestion
    with pytest.raises(EvomergeError) as e:
        plan_run(_three_experts(base, PYTHON), _gpus(1), "cuda")
    assert "device needs 288.2 GiB per worker on a GPU of 80.0 GiB" in str(e.value)
    assert "it fits with" not in str(e.value)


@pytest.mark.parametrize(
    ("fitness", "top", "fix"),
    [
        (PYTHON, {"workers": 2}, "workers: 1"),
        # a smaller batch comes before streaming, which would also fit
        ({**LMEVAL, "batch_size": 12}, {"placement": "device"}, "batch_size: 2"),
        ({**LMEVAL, "batch_size": 64}, {"workers": 2}, "batch_size: 2 and workers: 1"),
    ],
)
def test_the_refusal_names_the_smallest_change_that_fits(shapes, fitness, top, fix):
    with pytest.raises(EvomergeError) as e:
        plan_run(_three_experts(shapes / "qwen-7b", fitness, **top), _gpus(1), "cuda")
    assert str(e.value).endswith(f"; it fits with {fix}") and "\n" not in str(e.value)


def test_fitness_memory_that_is_not_a_size_is_one_line_and_stores_nothing(tmp_path, shapes):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"models: {{base: {shapes / 'qwen-7b'}, experts: {{a: {shapes / 'qwen-7b'}}}}}\n"
        "fitness: {function: 'math:fsum', memory: lots}\n"
    )
    line = "error: config: fitness.memory: 'lots' is not a size; write e.g. 6GiB, 6GB or 512MiB\n"
    for command in ("check", "run", "plan"):
        out = ["--out", str(tmp_path / "run")] if command != "plan" else []
        done = _cli(command, str(config), *out)
        assert (done.returncode, done.stderr) == (2, line), command
    assert not (tmp_path / "run").exists()
    lm = {
        "models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}},
        "fitness": {**LMEVAL, "memory": "6GiB"},
    }
    with pytest.raises(
        EvomergeError,
        match="^config: fitness: memory is what a Python fitness \\(function\\) declares; lm-eval's",
    ):
        parse_config(lm)
