"""Data-flow models (layer stacking, Sakana's data-flow-space merging, arXiv 2403.13187): a token passes
through a sequence of decoder layers, each taken from one of the models a worker holds.

A flow is a sequence of ``FlowStep(source, layer, scale)``: decoder layer ``layer`` of model ``source``
(``merge``: the worker's own model, the parameter-space merge of the recipe's groups; ``base``; or an
expert), the hidden state entering it multiplied by ``scale``.

Scaling. In a pre-norm decoder (an RMSNorm before each branch, a final norm) multiplying the hidden
state entering step t by s_t is, up to the norms' eps, the same function as multiplying the residual
writes of step t and of every later step by 1/s_t. With C_t = s_0 s_1 ... s_t, the paper's step
y_t = x_t + f_t(x_t), x_t = s_t y_{t-1}, gives y_t = C_t z_t where z_t = z_{t-1} + f_t(z_{t-1}) / C_t
(z_{-1} = y_{-1}, the embeddings), because each branch f_t, and the final norm, sees its input only
through RMSNorm(c x) = RMSNorm(x), which holds exactly when eps is 0. So the layer at step t has the
outputs of its residual-output projections (``RESIDUAL_OUTPUTS``: ``self_attn.o_proj`` and
``mlp.down_proj``) multiplied by 1/C_t. That form is exact for the weights: ``standalone`` writes it
into a checkpoint (the projections' weights and biases times 1/C_t), ``flow_model`` computes the same
function with forward hooks, and mergekit's passthrough reproduces it (``evomerge.export``). It equals
hidden-state scaling up to RMSNorm's eps (eps is added to the mean square, which scales by C_t^2); the
hidden states a flow model returns are the z_t. A model type without a known residual-output table
(post-norm decoders such as OLMo2 and Gemma2 are not pre-norm) takes only flows whose scales are all 1.

Memory. ``hold_layers`` keeps one model's decoder layers per held name (base or expert; the worker's
own model is ``merge``), and while it writes them, the tensors outside the layers (embeddings, final
norm, lm_head) once more. ``flow_model`` allocates no weights: its layers are references to the
sources' layers, so a layer used twice is one module called twice. ``standalone`` is a full copy.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from evomerge.errors import EvomergeError, unknown
from evomerge.merge import Merger
from evomerge.recipe import MERGE, FlowStep, reference_recipes

# Residual-output projections by model_type, relative to a decoder layer: pre-norm decoders whose
# residual stream is written only by these (verified in tests/test_flow_model.py against hidden-state
# scaling).
RESIDUAL_OUTPUTS: dict[str, tuple[str, ...]] = {
    t: ("self_attn.o_proj", "mlp.down_proj")
    for t in ("gemma", "granite", "llama", "mistral", "phi3", "qwen2", "qwen3", "smollm3")
}

# Config lists with one entry per decoder layer: a flow's config holds the entries of its steps' layers.
PER_LAYER = ("layer_types", "mlp_layer_types", "no_rope_layers")

_FACTOR = "_evomerge_flow_factor"  # on a hooked projection: the factor its output is multiplied by


def _describe(step: FlowStep) -> str:
    return f"({step.source!r}, {step.layer}, {step.scale:g})"


def check_flow(flow: Sequence[FlowStep], counts: Mapping[str, int]) -> None:
    """Refuse a flow with an unknown source, a layer out of range or a scale that is not finite and > 0,
    naming the step; ``counts`` is each source's number of layers."""
    if not flow:
        raise EvomergeError("a data flow needs at least one step")
    for t, step in enumerate(flow):
        where = f"data-flow step {t} {_describe(step)}"
        if step.source not in counts:
            raise EvomergeError(f"{where}: {unknown('source', step.source, counts)}")
        n = counts[step.source]
        if not (isinstance(step.layer, numbers.Integral) and 0 <= step.layer < n):
            raise EvomergeError(
                f"{where}: layer {step.layer} is out of range; {step.source!r} has layers 0..{n - 1}"
            )
        if not (math.isfinite(step.scale) and step.scale > 0):
            raise EvomergeError(f"{where}: scale must be finite and > 0, got {step.scale}")


def factors(flow: Sequence[FlowStep]) -> list[float]:
    """1/C_t for each step t, C_t the product of the scales of steps 0..t: what step t's residual writes
    are multiplied by."""
    out, c = [], 1.0
    for step in flow:
        c *= step.scale
        out.append(1.0 / c)
    return out


def residual_outputs(model_type: str, flow: Sequence[FlowStep]) -> tuple[str, ...]:
    """The residual-output projections that carry the flow's scales (none when every scale is 1);
    a model type without a known table refuses scales."""
    if all(step.scale == 1.0 for step in flow):
        return ()
    return scalable(model_type)


def scalable(model_type: str) -> tuple[str, ...]:
    """The residual-output projections of ``model_type``; one line where evomerge knows none."""
    if model_type not in RESIDUAL_OUTPUTS:
        raise EvomergeError(
            f"data-flow scales need a pre-norm decoder whose residual-output projections evomerge knows; "
            f"model_type {model_type!r} is not one (known: {', '.join(sorted(RESIDUAL_OUTPUTS))}): "
            "fix `data_flow.scale` at 1"
        )
    return RESIDUAL_OUTPUTS[model_type]


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise EvomergeError(f"{type(target).__name__} is not among {type(root).__name__}'s modules")


def hold_layers(
    model: nn.Module, merger: Merger, names: Iterable[str], experts: Sequence[str]
) -> dict[str, nn.ModuleList]:
    """For each name (``base`` or an expert), a copy of ``model``'s decoder layers holding that model's
    weights, written by ``merger`` from the recipe that is exactly that model.

    ``model`` (whose weights ``merger`` holds, named as in its state dict) is left as it is; each copy
    costs one model's decoder layers, and the tensors outside the layers are written once more into
    scratch shared by all names."""
    layers = model.get_decoder().layers
    prefix = _module_name(model, layers) + "."
    recipes = reference_recipes(list(experts))
    own = model.state_dict()
    scratch: dict[str, torch.Tensor] = {}
    held: dict[str, nn.ModuleList] = {}
    for name in names:
        if name == MERGE:
            raise EvomergeError(
                f"{MERGE!r} is the worker's own model: pass model.get_decoder().layers for it"
            )
        if name not in recipes:
            raise unknown("data-flow source", name, recipes)
        copied = copy.deepcopy(layers)
        out = {prefix + key: t for key, t in copied.state_dict(keep_vars=True).items()}
        for key in merger.names:
            if key in out or key in merger.aliases:
                continue
            if key.startswith(prefix):
                raise EvomergeError(f"the Merger holds {key!r}, which {type(model).__name__}'s layers lack")
            if key not in scratch:
                scratch[key] = torch.empty_like(own[key])
            out[key] = scratch[key]
        for key, owner in merger.aliases.items():  # tied tensors share their owner's buffer
            out.setdefault(key, out[owner])
        merger.apply(recipes[name], out=out)
        held[name] = copied
    return held


def flow_sources(
    model: nn.Module,
    merger: Merger,
    flow: Sequence[FlowStep],
    experts: Sequence[str],
    held: dict[str, nn.ModuleList] | None = None,
) -> dict[str, Sequence[nn.Module]]:
    """The sources a flow names: ``merge`` (``model``'s own layers) and the layers of the base and
    experts it uses, taken from ``held`` where there and otherwise held now (``hold_layers``) and added
    to it, so a caller that keeps ``held`` pays for each model once."""
    held = {} if held is None else held
    wanted = {step.source for step in flow} - {MERGE} - set(held)
    if wanted:
        held |= hold_layers(model, merger, sorted(wanted), experts)
    return {MERGE: model.get_decoder().layers, **held}


def _set_factor(module: nn.Module, factor: float) -> None:
    module.__dict__[_FACTOR] = factor


def _scale_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    factor = module.__dict__.get(_FACTOR, 1.0)
    return None if factor == 1.0 else output * factor


def _hooked(layer: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The projections ``names`` of ``layer``, each with the output-scaling hook (registered once)."""
    out = []
    for name in names:
        try:
            proj = layer.get_submodule(name)
        except AttributeError:
            raise EvomergeError(
                f"{type(layer).__name__} has no residual-output projection {name!r}"
            ) from None
        if _FACTOR not in proj.__dict__:
            proj.register_forward_hook(_scale_output)
            _set_factor(proj, 1.0)
        out.append(proj)
    return out


class FlowLayer(nn.Module):
    """Step ``index`` of a flow: calls ``layer`` (a reference, shared with its source) as layer
    ``index`` (its ``layer_idx`` attributes, which index the KV cache, set for the call) with its
    residual writes multiplied by ``factor``. Attributes the model reads off its layers (e.g.
    ``attention_type``) are the layer's."""

    def __init__(self, layer: nn.Module, index: int, factor: float, projections: Sequence[nn.Module]):
        super().__init__()
        self.layer = layer
        self.index = index
        self.factor = factor
        self._projections = list(projections) if factor != 1.0 else []
        self._indexed = [m for m in layer.modules() if isinstance(m.__dict__.get("layer_idx"), int)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        capturing = _output_capturing()
        collecting = capturing._active_collector.get() if capturing is not None else None
        if collecting and set(collecting) - {"hidden_states", "_hidden_states_layers"}:
            raise EvomergeError(
                "a data-flow model records hidden states only: output_attentions is not supported"
            )
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            m.layer_idx = self.index
        for p in self._projections:
            _set_factor(p, self.factor)
        # the layer's own capture hooks (installed when its source recorded outputs) stay silent: this
        # step records its hidden state itself
        token = capturing._active_collector.set(None) if collecting else None
        try:
            return self.layer(*args, **kwargs)
        finally:
            if collecting:
                capturing._active_collector.reset(token)
            for p in self._projections:
                _set_factor(p, 1.0)
            for m, i in zip(self._indexed, saved, strict=True):
                m.layer_idx = i

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None:
                raise
            return getattr(layer, name)


def flow_config(config: Any, flow: Sequence[FlowStep]) -> Any:
    """A copy of ``config`` for the flow's model: the decoder's ``num_hidden_layers`` is the depth and
    its per-layer lists (``PER_LAYER``) hold the entries of the steps' layers."""
    new = copy.deepcopy(config)
    text = new.get_text_config(decoder=True)
    if getattr(text, "is_heterogeneous", False):
        raise EvomergeError(
            f"model_type {text.model_type!r} with per-layer configs: data flows need identical layers"
        )
    n = text.num_hidden_layers
    lists = {k: getattr(text, k, None) for k in PER_LAYER}
    text.num_hidden_layers = len(flow)
    for key, values in lists.items():
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(text, key, [values[step.layer] for step in flow])
    return new


def _shell(module: nn.Module, configs: Mapping[int, Any]) -> nn.Module:
    """A shallow copy of ``module`` with its own module, parameter, buffer and hook tables (so nothing
    done to it reaches ``module``) and its config replaced per ``configs`` (id of old -> new)."""
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
        elif id(value) in configs:
            new.__dict__[key] = configs[id(value)]
    forward = module.__dict__.get("forward")
    if forward is not None:  # an instance-level forward (accelerate's device hooks) bound to module
        args = getattr(forward, "args", ())
        if not (args and args[0] is module):
            raise EvomergeError(
                f"{type(module).__name__} has a forward of its own that a data flow cannot rebind"
            )
        new.__dict__["forward"] = functools.update_wrapper(
            functools.partial(forward.func, new, *args[1:], **forward.keywords), forward
        )
    return new


@functools.cache
def _output_capturing() -> Any:
    """transformers 5's output-capturing module (hooks that record hidden states per layer class), or
    None with transformers 4.x, which patches each matching module's forward for the call instead (a
    shared layer then records once per step by itself)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return output_capturing


def _capture_hidden_states(decoder: nn.Module, steps: nn.ModuleList) -> None:
    """Record the decoder's hidden states at the steps (transformers records them with hooks on its
    decoder-layer class, which here are shared with other models), never through the shared layers."""
    capturing = _output_capturing()
    if capturing is None:  # transformers 4.x patches each matching module's forward per call: nothing to do
        return
    _CAN_RECORD_REGISTRY = capturing._CAN_RECORD_REGISTRY
    OutputRecorder = capturing.OutputRecorder
    install_output_capuring_hook = capturing.install_output_capuring_hook

    decoder.__dict__["_output_capturing_hooks_installed"] = True
    specs = _CAN_RECORD_REGISTRY.get(decoder).get("hidden_states")
    specs = specs if isinstance(specs, list) else [specs] if specs is not None else []
    for spec in specs:
        if not isinstance(spec, OutputRecorder):
            if not isinstance(spec, type):
                continue
            spec = OutputRecorder(target_class=spec)
        if spec.layer_name is None and all(isinstance(s.layer, spec.target_class) for s in steps):
            for s in steps:
                install_output_capuring_hook(
                    s, "hidden_states", spec.index, spec.capture_initial_hidden_state
                )
            return


def _source_layers(sources: Mapping[str, Sequence[nn.Module]]) -> dict[str, int]:
    return {name: len(layers) for name, layers in sources.items()}


def flow_model(
    model: nn.Module, sources: Mapping[str, Sequence[nn.Module]], flow: Sequence[FlowStep]
) -> nn.Module:
    """A model of ``model``'s class that runs ``flow`` over ``sources`` (name -> decoder layers; the
    caller passes ``merge``: ``model.get_decoder().layers`` where the flow uses it).

    It shares every module with ``model`` except the decoder's layer list, which holds one ``FlowLayer``
    per step around references to the sources' layers; its config is ``flow_config``'s, so transformers'
    own KV cache and layer loop see ``depth`` layers. Nothing is allocated and ``model`` computes as
    before (the residual-output projections of layers that carry a scale get an output hook, which
    multiplies by 1 outside a flow). Flow models that share layers must not run concurrently."""
    flow = tuple(flow)
    check_flow(flow, _source_layers(sources))
    scaled = residual_outputs(model.config.model_type, flow)
    decoder = model.get_decoder()
    path = _module_name(model, decoder.layers).split(".")
    config = flow_config(model.config, flow)
    configs = {id(model.config): config}
    old_text = model.config.get_text_config(decoder=True)
    configs[id(old_text)] = config.get_text_config(decoder=True)
    steps = nn.ModuleList()
    for t, (step, factor) in enumerate(zip(flow, factors(flow), strict=True)):
        layer = sources[step.source][step.layer]
        steps.append(FlowLayer(layer, t, factor, _hooked(layer, scaled) if factor != 1.0 else ()))
    top = _shell(model, configs)
    decoder_path = _module_name(model, decoder)
    flow_decoder = top if decoder_path == "" else None
    parent = top
    for i, name in enumerate(path[:-1]):
        child = _shell(parent._modules[name], configs)
        parent._modules[name] = child
        if ".".join(path[: i + 1]) == decoder_path:
            flow_decoder = child
        parent = child
    parent._modules[path[-1]] = steps
    if flow_decoder is not None:
        _capture_hidden_states(flow_decoder, steps)
    return top


def standalone(
    model: nn.Module,
    sources: Mapping[str, Sequence[nn.Module]],
    flow: Sequence[FlowStep],
    device: str | torch.device | None = None,
) -> nn.Module:
    """An ordinary model of ``model``'s class computing what ``flow_model`` computes: config
    ``flow_config``'s, each step's layer its own copy (a layer used twice is copied twice) with the
    residual-output projections' weights and biases multiplied by 1/C_t, the tensors outside the layers
    (embeddings, final norm, lm_head; tied as the config says) copied from ``model``. Built on
    ``device`` (default: where ``model``'s input embeddings are)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    flow = tuple(flow)
    check_flow(flow, _source_layers(sources))
    scaled = residual_outputs(model.config.model_type, flow)
    config = flow_config(model.config, flow)
    embeddings = model.get_input_embeddings().weight
    with torch.device(device or embeddings.device), no_init_weights():
        new = type(model)._from_config(config, dtype=embeddings.dtype)
    try:  # no_init_weights skips the tying init_weights does
        new.tie_weights(recompute_mapping=False)
    except TypeError:  # transformers 4.x: no mapping to recompute
        new.tie_weights()
    layers = new.get_decoder().layers
    prefix = _module_name(new, layers) + "."
    theirs = model.state_dict()
    with torch.no_grad():
        for key, tensor in new.state_dict().items():
            if not key.startswith(prefix):
                tensor.copy_(theirs[key])
        for t, (step, factor) in enumerate(zip(flow, factors(flow), strict=True)):
            source = sources[step.source][step.layer].state_dict()
            for key, tensor in layers[t].state_dict().items():
                tensor.copy_(source[key])
                if factor != 1.0 and key.rpartition(".")[0] in scaled:
                    tensor.mul_(factor)
    return new.train(model.training)
