"""Data-flow models (``evomerge.flow``): the flow model of references against its standalone checkpoint,
the KV cache, the scaling semantics against hidden-state scaling, mergekit's passthrough export, and bad
input. Tiny random-init decoders: a base and two experts (base + small random deltas), merged by the
Merger as a worker merges them."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from evomerge.errors import EvomergeError
from evomerge.export import MERGE_STAGE, to_mergekit, to_mergekit_stages
from evomerge.flow import RESIDUAL_OUTPUTS, FlowLayer, flow_model, hold_layers, standalone
from evomerge.merge import Merger
from evomerge.recipe import FlowStep, GroupRecipe, Recipe

EXPERTS = ["a", "b"]
VOCAB = 256
CONFIGS = {
    "gemma": GemmaConfig,
    "granite": GraniteConfig,
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "phi3": Phi3Config,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "smollm3": SmolLM3Config,
}
# per-type settings that exercise what the flow must carry: a sliding window on some layers (qwen2),
# multipliers on the residual writes (granite), layers without RoPE (smollm3)
EXTRA = {
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 3.0},
    "smollm3": {"no_rope_layers": [1, 0, 1, 1]},
}
# the worker's merge: its layers differ from every input's
RECIPE = Recipe(
    (
        GroupRecipe("l0", "linear", {"weight": [0.5, 0.2], "base_weight": 0.3}, (0, 2)),
        GroupRecipe("other", "linear", {"weight": [0.2, 0.6], "base_weight": 0.2}),
    )
)
# three sources and the merge, a repeated layer (base 1), scales
FLOW = (
    FlowStep("merge", 0),
    FlowStep("base", 1, 0.8),
    FlowStep("a", 2),
    FlowStep("base", 1, 1.25),
    FlowStep("merge", 2, 0.9),
    FlowStep("b", 3),
    FlowStep("merge", 3, 1.1),
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config(model_type: str = "llama", tie: bool = False, vocab: int = VOCAB, **extra):
    return CONFIGS[model_type](
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


class Zoo:
    """A worker's models: ``model`` merged by ``merger`` as ``RECIPE`` says, and ``sources`` (its own
    layers as ``merge``, the base's and the experts' held by ``hold_layers``)."""

    def __init__(self, cfg, seed: int = 0):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(cfg).eval()
        self.state_dicts = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
        for e in EXPERTS:
            expert = copy.deepcopy(base)
            with torch.no_grad():
                for p in expert.parameters():  # tied tensors stay tied
                    p.add_(0.02 * torch.randn_like(p))
            self.state_dicts[e] = expert.state_dict()
        self.model = base
        self.merger = Merger(base.state_dict(), {e: self.state_dicts[e] for e in EXPERTS})
        self.merger.apply(RECIPE, out=self.model)
        self.sources = {"merge": self.model.get_decoder().layers}
        self.sources |= hold_layers(self.model, self.merger, ["base", *EXPERTS], EXPERTS)


@pytest.fixture(scope="module")
def zoo():
    return Zoo(config())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_held_layers_are_the_inputs(zoo):
    for name, sd in zoo.state_dicts.items():
        for i, layer in enumerate(zoo.sources[name]):
            for key, t in layer.state_dict().items():
                assert torch.equal(t, sd[f"model.layers.{i}.{key}"]), (name, i, key)
    assert not torch.equal(
        zoo.sources["merge"][0].mlp.up_proj.weight, zoo.sources["base"][0].mlp.up_proj.weight
    )


@pytest.mark.parametrize("tie", [False, True])
def test_flow_model_equals_its_standalone_checkpoint(tie, ids, tmp_path):
    zoo = Zoo(config(tie=tie))
    flow = flow_model(zoo.model, zoo.sources, FLOW)
    alone = standalone(zoo.model, zoo.sources, FLOW)
    assert type(flow) is type(zoo.model) and type(alone) is type(zoo.model)
    assert flow.config.num_hidden_layers == alone.config.num_hidden_layers == len(FLOW)
    theirs = logits(alone, ids)
    assert (logits(flow, ids) - theirs).abs().max() <= 1e-5
    alone.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == len(FLOW)
    assert (logits(loaded, ids) - theirs).abs().max() <= 1e-5
    if tie:
        assert alone.lm_head.weight is alone.model.embed_tokens.weight
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # references, not copies: every parameter is a source's or the model's own
    owned = {id(p) for p in zoo.model.parameters()}
    owned |= {id(p) for layers in zoo.sources.values() for p in layers.parameters()}
    assert all(id(p) in owned for p in flow.parameters())
    steps = flow.model.layers
    assert all(isinstance(s, FlowLayer) for s in steps)
    assert steps[1].layer is steps[3].layer is zoo.sources["base"][1]
    assert steps[0].layer is zoo.model.model.layers[0]
    assert flow.model.embed_tokens is zoo.model.model.embed_tokens and flow.lm_head is zoo.model.lm_head
    # the standalone copies: the repeated layer twice, its projections scaled by 1/C_t
    w1, w3 = alone.model.layers[1].self_attn.o_proj.weight, alone.model.layers[3].self_attn.o_proj.weight
    assert w1.data_ptr() != w3.data_ptr()
    source = zoo.sources["base"][1].self_attn.o_proj.weight
    assert torch.allclose(w1, source / 0.8) and torch.allclose(w3, source)
    assert torch.allclose(
        alone.model.layers[4].mlp.down_proj.weight, zoo.sources["merge"][2].mlp.down_proj.weight / 0.9
    )


def test_the_identity_flow_is_the_model(zoo, ids):
    identity = [FlowStep("merge", i) for i in range(4)]
    flow = flow_model(zoo.model, {"merge": zoo.model.model.layers}, identity)
    assert torch.equal(logits(flow, ids), logits(zoo.model, ids))


REPEATED = (
    FlowStep("a", 0),
    FlowStep("merge", 1, 0.7),
    FlowStep("merge", 1),
    FlowStep("base", 2),
    FlowStep("merge", 3, 1.2),
)


def test_generation_with_the_cache(zoo, ids):
    flow = flow_model(zoo.model, zoo.sources, REPEATED)
    alone = standalone(zoo.model, zoo.sources, REPEATED)
    prompt = ids[:1, :6]
    with torch.no_grad():
        out = flow.generate(
            prompt,
            max_new_tokens=8,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
        theirs = alone.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        full = flow(out.sequences[:, :-1], use_cache=False).logits[:, -1]
    assert torch.equal(out.sequences, theirs)
    assert out.sequences.shape[1] == 6 + 8
    assert (out.logits[-1] - full).abs().max() <= 1e-5


def test_the_model_is_unchanged(zoo, ids):
    before = logits(zoo.model, ids)
    params = {k: v.clone() for k, v in zoo.model.state_dict().items()}
    layers = zoo.model.model.layers
    indices = [layer.self_attn.layer_idx for layer in layers]
    first = (FlowStep("merge", 3, 0.5), FlowStep("merge", 3), FlowStep("base", 0, 1.5), FlowStep("merge", 0))
    second = (FlowStep("base", 0), FlowStep("merge", 3, 2.0), FlowStep("a", 1), FlowStep("merge", 3, 0.6))
    flows = [flow_model(zoo.model, zoo.sources, f) for f in (first, second)]
    alone = [logits(standalone(zoo.model, zoo.sources, f), ids) for f in (first, second)]
    for i in (0, 1, 0):  # one after another, on shared layers
        assert (logits(flows[i], ids) - alone[i]).abs().max() <= 1e-5
    assert torch.equal(logits(zoo.model, ids), before)
    assert zoo.model.model.layers is layers and len(layers) == 4
    assert zoo.model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == indices
    assert all(torch.equal(v, params[k]) for k, v in zoo.model.state_dict().items())
    # hidden states: the model's layers record theirs (hooks transformers installs on them), the flow's
    # steps theirs, the shared layers' hooks silent
    with torch.no_grad():
        states = zoo.model(ids, output_hidden_states=True).hidden_states
        flow_states = flows[1](ids, output_hidden_states=True).hidden_states
        alone_states = standalone(zoo.model, zoo.sources, second)(ids, output_hidden_states=True)
        assert len(zoo.model(ids, output_hidden_states=True).hidden_states) == len(states) == 5
    assert len(flow_states) == len(alone_states.hidden_states) == 5
    assert (
        max((x - y).abs().max() for x, y in zip(flow_states, alone_states.hidden_states, strict=True)) <= 1e-5
    )


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_scales_are_hidden_state_scaling(model_type, ids):
    """The residual-write form against the paper's: each step's input hidden state multiplied by its
    scale. With RMSNorm's eps tiny they agree to float rounding."""
    assert model_type in RESIDUAL_OUTPUTS
    zoo = Zoo(config(model_type, rms_norm_eps=1e-20, **EXTRA.get(model_type, {})), seed=3)
    steps = (
        FlowStep("base", 0, 3.0),
        FlowStep("merge", 1),
        FlowStep("a", 2, 0.4),
        FlowStep("a", 2),
        FlowStep("merge", 3, 1.7),
    )
    flow = flow_model(zoo.model, zoo.sources, steps)
    plain = flow_model(zoo.model, zoo.sources, [FlowStep(s.source, s.layer) for s in steps])

    def scale_input(step):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * step.scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * step.scale}

        return hook

    for wrapper, step in zip(plain.get_decoder().layers, steps, strict=True):
        wrapper.register_forward_pre_hook(scale_input(step), with_kwargs=True)
    ours, paper = logits(flow, ids), logits(plain, ids)
    assert (ours - paper).abs().max() <= 1e-5 * paper.abs().max()
    alone = standalone(zoo.model, zoo.sources, steps)
    assert (logits(alone, ids) - ours).abs().max() <= 1e-5
    if model_type == "qwen2":
        assert alone.config.layer_types == ["full_attention", "full_attention", *["sliding_attention"] * 3]
    if model_type == "smollm3":
        assert alone.config.no_rope_layers == [1, 0, 1, 1, 1]
    with torch.no_grad():
        generated = flow.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(
            generated, alone.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        )


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "step, says",
    [
        (FlowStep("c", 0), "unknown source 'c'"),
        (FlowStep("a", 4), "layer 4 is out of range; 'a' has layers 0..3"),
        (FlowStep("a", -1), "layer -1 is out of range"),
        (FlowStep("a", 1, 0.0), "scale must be finite and > 0, got 0.0"),
        (FlowStep("a", 1, -2.0), "scale must be finite and > 0"),
        (FlowStep("a", 1, float("nan")), "scale must be finite and > 0"),
        (FlowStep("a", 1, float("inf")), "scale must be finite and > 0"),
    ],
)
def test_bad_steps(zoo, step, says):
    steps = (FlowStep("merge", 0), step)
    for build in (flow_model, standalone):
        with pytest.raises(EvomergeError) as e:
            build(zoo.model, zoo.sources, steps)
        message = one_line(e)
        assert says in message and "data-flow step 1" in message, message


def test_scales_need_a_known_model_type():
    """OLMo2 norms each branch's output before the residual add (post-norm), so scaling the residual
    writes is not scaling the hidden state: only flows with scales 1."""
    cfg = Olmo2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    sources = {"merge": model.get_decoder().layers}
    with pytest.raises(EvomergeError) as e:
        flow_model(model, sources, [FlowStep("merge", 0), FlowStep("merge", 1, 0.5)])
    message = one_line(e)
    assert "'olmo2'" in message and ", ".join(sorted(RESIDUAL_OUTPUTS)) in message
    assert "fix `data_flow.scale` at 1" in message
    steps = [FlowStep("merge", 1), FlowStep("merge", 0), FlowStep("merge", 1)]
    ids = torch.randint(0, VOCAB, (1, 5))
    assert (
        logits(flow_model(model, sources, steps), ids) - logits(standalone(model, sources, steps), ids)
    ).abs().max() <= 1e-5


def test_attentions_are_refused(zoo, ids):
    """transformers 5 records outputs with hooks on the shared layers' class, which a flow cannot tell
    apart for attentions (4.x patches each call and has nothing to refuse)."""
    pytest.importorskip("transformers.utils.output_capturing", reason="transformers 4.x: nothing to refuse")
    flow = flow_model(zoo.model, zoo.sources, REPEATED)
    with pytest.raises(EvomergeError) as e, torch.no_grad():
        flow(ids, output_attentions=True)
    assert "output_attentions" in one_line(e)
    assert [layer.self_attn.layer_idx for layer in zoo.model.model.layers] == [0, 1, 2, 3]


def test_hold_layers_refuses_merge_and_unknown_names(zoo):
    with pytest.raises(EvomergeError) as e:
        hold_layers(zoo.model, zoo.merger, ["merge"], EXPERTS)
    assert "model.get_decoder().layers" in one_line(e)
    with pytest.raises(EvomergeError) as e:
        hold_layers(zoo.model, zoo.merger, ["bas"], EXPERTS)
    assert "did you mean 'base'" in one_line(e)


# mergekit: the flow as a mergekit-multi file


def test_export_writes_two_stages_and_slices():
    recipe = Recipe(
        RECIPE.groups,
        flow=(
            FlowStep("base", 0),
            FlowStep("base", 1),
            FlowStep("a", 1, 0.5),
            FlowStep("a", 2),
            FlowStep("merge", 3, 2.0),
        ),
    )
    merge, stack = to_mergekit_stages(recipe, "B", {"a": "A", "b": "C"})
    assert merge == {"name": MERGE_STAGE, **to_mergekit(Recipe(RECIPE.groups), "B", {"a": "A", "b": "C"})}
    scale = [{"filter": "self_attn.o_proj", "value": 2.0}, {"filter": "mlp.down_proj", "value": 2.0}]
    assert stack["merge_method"] == "passthrough"
    assert stack["slices"] == [
        {"sources": [{"model": MERGE_STAGE, "layer_range": [0, 0]}]},
        {"sources": [{"model": "B", "layer_range": [0, 2]}]},
        {"sources": [{"model": "A", "layer_range": [1, 3], "parameters": {"scale": scale}}]},
        {"sources": [{"model": MERGE_STAGE, "layer_range": [3, 4]}]},
    ]
    assert to_mergekit_stages(Recipe(RECIPE.groups), "B", {"a": "A", "b": "C"}) == [
        to_mergekit(Recipe(RECIPE.groups), "B", {"a": "A", "b": "C"})
    ]
    with pytest.raises(EvomergeError) as e:
        to_mergekit(recipe, "B", {"a": "A", "b": "C"})
    assert "to_mergekit_stages" in one_line(e)


def test_export_refuses_what_mergekit_cannot_write(tmp_path):
    with pytest.raises(EvomergeError) as e:
        to_mergekit_stages(Recipe(RECIPE.groups, flow=(FlowStep("c", 0),)), "B", {"a": "A", "b": "C"})
    assert "unknown source 'c'" in one_line(e)
    llama, qwen = tmp_path / "llama", tmp_path / "qwen"
    config().save_pretrained(llama)
    config("qwen3").save_pretrained(qwen)
    with pytest.raises(EvomergeError) as e:
        to_mergekit_stages(Recipe(RECIPE.groups, flow=(FlowStep("a", 4),)), str(llama), {"a": "A", "b": "C"})
    assert "layer 4 is out of range" in one_line(e)
    with pytest.raises(EvomergeError) as e:
        to_mergekit_stages(
            Recipe(RECIPE.groups, flow=(FlowStep("a", 0), FlowStep("a", 0))), str(qwen), {"a": "A", "b": "C"}
        )
    assert "layer_types" in one_line(e) and "--format hf" in str(e.value)
    same_depth = tuple(FlowStep("a", i) for i in (0, 0, 1, 2))
    assert (
        len(to_mergekit_stages(Recipe(RECIPE.groups, flow=same_depth), str(qwen), {"a": "A", "b": "C"})) == 2
    )
    olmo = tmp_path / "olmo2"
    Olmo2Config(num_hidden_layers=4, pad_token_id=0, eos_token_id=2, vocab_size=VOCAB).save_pretrained(olmo)
    with pytest.raises(EvomergeError) as e:
        to_mergekit_stages(
            Recipe(RECIPE.groups, flow=(FlowStep("a", 0, 2.0),)), str(olmo), {"a": "A", "b": "C"}
        )
    assert "'olmo2'" in one_line(e) and "data_flow.scale" in str(e.value)
    with pytest.raises(EvomergeError) as e:
        to_mergekit_stages(
            Recipe((GroupRecipe("other", "tsv", {"weight": [0.5, 0.5]}),), flow=same_depth),
            "B",
            {"a": "A", "b": "C"},
        )
    assert "tsv" in one_line(e)


def test_export_candidate_writes_a_mergekit_multi_file(tmp_path):
    from evomerge.export import export_candidate
    from evomerge.store import Candidate, Store

    run = tmp_path / "run"
    store = Store(run / "store.sqlite")
    store.set_meta(
        "models", {"base": "B", "experts": {"a": "A", "b": "C"}, "tokenizer": None, "dtype": "float32"}
    )
    recipe = Recipe(RECIPE.groups, flow=REPEATED)
    cid = store.add(Candidate(recipe=recipe.to_dict(), recipe_key=recipe.key(), split="search", status="ok"))
    store.close()
    written = export_candidate(run, cid)
    assert written == run / "exports" / f"candidate-{cid}.mergekit-multi.yaml"
    docs = list(yaml.safe_load_all(written.read_text()))
    assert docs == to_mergekit_stages(recipe, "B", {"a": "A", "b": "C"})


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "steps",
    [
        (
            FlowStep("base", 0),
            FlowStep("base", 1),
            FlowStep("a", 1, 0.7),
            FlowStep("a", 2),
            FlowStep("a", 1),
            FlowStep("base", 3),
        ),
        (
            FlowStep("merge", 0),
            FlowStep("merge", 1, 1.3),
            FlowStep("b", 2),
            FlowStep("merge", 2, 0.6),
            FlowStep("merge", 3),
        ),
    ],
    ids=["base-expert", "merge"],
)
def test_mergekit_makes_the_standalone_weights(steps, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit not installed (pip install -e '.[parity]')")
    from evomerge.zoos.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # mergekit builds the merged model's vocabulary from the base's tokenizer
    cfg = config(vocab=len(tokenizer))
    zoo = Zoo(cfg, seed=5)
    folders = {}
    for name, sd in zoo.state_dicts.items():
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(sd)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    recipe = Recipe(RECIPE.groups, flow=steps)
    docs = to_mergekit_stages(recipe, folders["base"], {e: folders[e] for e in EXPERTS})
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit.scripts.multimerge",
            str(tmp_path / "flow.yaml"),
            "--out-path",
            str(out),
            "-I",
            str(tmp_path / "stages"),
            "--no-lazy-unpickle",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        theirs.update(load_file(f))
    standalone(zoo.model, zoo.sources, steps).save_pretrained(tmp_path / "mine")
    mine = load_file(tmp_path / "mine" / "model.safetensors")
    assert set(theirs) == set(mine)
    assert max((mine[k] - t).abs().max().item() for k, t in theirs.items()) <= 1e-6
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(steps)
