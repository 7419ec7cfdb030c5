"""The inputs users hold as experts: PEFT adapters (applied to the base in memory) and fine-tunes that
added tokens (``models.vocab: base | union``), and what is refused of them at check and at run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_export import run_mergekit
from test_search_engine import ray_env  # noqa: F401
from tiny import save_model_set

from evomerge.cli import app
from evomerge.models import ModelSet
from evomerge.recipe import GroupRecipe, Recipe
from evomerge.run import Run
from evomerge.workers import search_merger

TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_lora(base_folder, out, rank: int, seed: int, merged=None):
    """A LoRA of ``rank`` on the base with random (non-zero) matrices, saved as PEFT saves it; and, where
    ``merged`` is given, the base with it merged in as a full model there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
    model.save_pretrained(out)
    if merged is not None:
        model.merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(base_folder).save_pretrained(merged)
    return out


def save_with_tokens(source, out, tokens: list[str], seed: int):
    """``source`` with ``tokens`` added to its tokenizer and random rows for them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    tok = AutoTokenizer.from_pretrained(source)
    n = len(tok)
    tok.add_tokens(tokens)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[n:] = torch.randn(len(tok) - n, w.shape[1], generator=g)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    m = save_model_set(root, ["base", "a", "b"])
    m["lora2"] = save_lora(m["base"], root / "lora2", 2, seed=1, merged=root / "lora2-merged")
    m["lora8"] = save_lora(m["base"], root / "lora8", 8, seed=2, merged=root / "lora8-merged")
    m["lora2-merged"], m["lora8-merged"] = root / "lora2-merged", root / "lora8-merged"
    m["adds_a"] = save_with_tokens(m["a"], root / "adds_a", ["<think>", "<x>"], seed=3)
    m["adds_b"] = save_with_tokens(m["b"], root / "adds_b", ["<z>", "<think>"], seed=4)
    return m


def write_config(root, base, experts: dict, function="fitness_fns:closeness", vocab="base", **changes):
    cfg = {
        "models": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "vocab": vocab},
        "search_space": {"name": "per_layer", "layer_groups": 2},
        "fitness": {"function": function},
        "objectives": [{"name": "first", "of": "first"}, {"name": "second", "of": "second"}],
        "algorithm": {"name": "nsga2", "pop_size": 4, "generations": 1},
        "workers": 1,
        "seed": 3,
        **changes,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


RECIPES = [
    Recipe.uniform("ties", {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.8, 1.0]}),
    Recipe(
        (
            GroupRecipe("l0", "task_arithmetic", {"weight": [0.3, 1.2, 0.5]}, (0, 2)),
            GroupRecipe("other", "dare_linear", {"weight": [0.2, 0.9, 0.6], "density": 0.6}),
        )
    ),
]


# --- adapters -------------------------------------------------------------------------------------------


def test_an_adapter_merges_as_the_model_peft_makes_of_it(models):
    """LoRAs of ranks 2 and 8 beside a full fine-tune: every recipe's weights equal those of the same
    recipe over the models PEFT's merge_and_unload makes of the adapters."""
    experts = {"lora2": str(models["lora2"]), "lora8": str(models["lora8"]), "a": str(models["a"])}
    merged = {**experts, "lora2": str(models["lora2-merged"]), "lora8": str(models["lora8-merged"])}
    adapters, full = ModelSet(str(models["base"]), experts), ModelSet(str(models["base"]), merged)
    adapters.check()
    assert adapters.adapter(experts["lora8"]).describe() == "LORA adapter of rank 8"
    copy = shutil.copytree(models["base"], models["base"].parent / "copy-of-base")  # the same checkpoint
    ModelSet(str(copy), experts).check()
    a_model, f_model = adapters.load_model(), full.load_model()
    a_merger, f_merger = search_merger(a_model, adapters), search_merger(f_model, full)
    for recipe in RECIPES:
        a_merger.apply(recipe, out=a_model)
        f_merger.apply(recipe, out=f_model)
        ours, theirs = state(a_model), state(f_model)
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)


@pytest.mark.mergekit
def test_a_run_mixes_adapters_with_a_full_fine_tune_and_mergekit_reproduces_it(models, tmp_path, ray_env):  # noqa: F811
    experts = {"lora2": str(models["lora2"]), "lora8": str(models["lora8"]), "a": str(models["a"])}
    config = write_config(
        tmp_path,
        models["base"],
        experts,
        search_space={"name": "per_layer", "layer_groups": 2, "methods": ["task_arithmetic"]},
        algorithm={"name": "nsga2", "pop_size": 4, "generations": 2},
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = Run(tmp_path / "run")
    best = run.best_id
    result = runner.invoke(app, ["export", str(run.path), "--candidate", str(best)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((run.path / "exports" / f"candidate-{best}.mergekit.yaml").read_text())
    names = [m["model"] for m in written["models"]]
    assert names == [
        f"{models['base']}+{models['lora2']}",
        f"{models['base']}+{models['lora8']}",
        str(models["a"]),
    ]
    theirs = run_mergekit(written, tmp_path / "mk", lora_merge_cache=str(tmp_path / "lora-cache"))
    model, _ = run.load_model(best)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, theirs[k].to(v.dtype), rtol=1e-5, atol=1e-6)


# --- added tokens ---------------------------------------------------------------------------------------


def test_experts_that_add_other_tokens_merge_with_the_base_vocabulary_or_the_union(models):
    experts = {"adds_a": str(models["adds_a"]), "adds_b": str(models["adds_b"]), "b": str(models["b"])}
    base_set = ModelSet(str(models["base"]), experts)
    union = ModelSet(str(models["base"]), experts, vocab="union")
    plain = ModelSet(
        str(models["base"]), {"adds_a": str(models["a"]), "adds_b": str(models["b"]), "b": str(models["b"])}
    )
    for s in (base_set, union):
        s.check()
    rows = {"<think>": 50, "<x>": 51, "<z>": 52}
    tok = union.load_tokenizer()
    assert len(tok) == 53 and {t: tok.convert_tokens_to_ids(t) for t in rows} == rows
    assert len(base_set.load_tokenizer()) == 50
    from transformers import AutoModelForCausalLM

    adds = {e: AutoModelForCausalLM.from_pretrained(models[e]).state_dict() for e in ("adds_a", "adds_b")}
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    sets = {"base": base_set, "union": union, "plain": plain}
    models_ = {k: s.load_model() for k, s in sets.items()}
    mergers = {k: search_merger(models_[k], s) for k, s in sets.items()}
    for recipe in RECIPES:
        out = {}
        for s, merger in mergers.items():
            merger.apply(recipe, out=models_[s])
            out[s] = state(models_[s])
        assert out["union"][embed].shape == (53, 32) and out["base"][embed].shape == (50, 32)
        assert models_["union"].config.vocab_size == 53
        # the base's rows merge as they would with the experts' rows for them: the models before adding
        for name in (embed, head):
            torch.testing.assert_close(out["base"][name], out["plain"][name], rtol=0, atol=0)
            if recipe is not RECIPES[0]:  # ties keeps a share of each tensor's entries: here of 53 rows
                torch.testing.assert_close(out["union"][name][:50], out["plain"][name], rtol=0, atol=0)
            # each added row is its adder's, whatever the recipe; <think> the mean of both adders'
            torch.testing.assert_close(out["union"][name][51], adds["adds_a"][name][51])
            torch.testing.assert_close(out["union"][name][52], adds["adds_b"][name][50])
            torch.testing.assert_close(
                out["union"][name][50], (adds["adds_a"][name][50] + adds["adds_b"][name][51]) / 2
            )
        for k in out["plain"]:
            if k not in (embed, head):
                torch.testing.assert_close(out["union"][k], out["plain"][k], rtol=0, atol=0)


def test_a_union_run_scores_and_exports_a_model_whose_tokenizer_matches_it(models, tmp_path, ray_env):  # noqa: F811
    experts = {"adds_a": str(models["adds_a"]), "adds_b": str(models["adds_b"])}
    config = write_config(
        tmp_path,
        models["base"],
        experts,
        "fitness_fns:vocab_agrees",
        "union",
        objectives=[{"name": "first", "of": "first"}, {"name": "agrees", "of": "agrees"}],
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = Run(tmp_path / "run")
    assert (run.candidates["agrees"] == 1.0).all()  # each worker's tokenizer matched its merged rows
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["export", str(run.path), "--candidate", str(run.best_id), "--format", "hf", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.vocab_size == 53
    assert tok("<think><z>", add_special_tokens=False).input_ids == [50, 52]
    result = runner.invoke(app, ["export", str(run.path), "--candidate", str(run.best_id)])
    written = yaml.safe_load(next((run.path / "exports").glob("*.mergekit.yaml")).read_text())
    assert written["tokenizer_source"] == "union"


def test_check_reports_each_experts_differences_and_what_evomerge_does_with_them(models, tmp_path):
    experts = {"lora8": models["lora8"], "adds_a": models["adds_a"], "b": models["b"]}
    config = write_config(tmp_path, models["base"], experts, vocab="union")
    result = CliRunner().invoke(app, ["check", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "compatibility with the base"
    table = {line.split()[0]: line for line in lines[1:6]}
    assert table["model"].split() == [
        "model",
        "kind",
        "type",
        "hidden",
        "layers",
        "rows",
        "rope",
        "tied",
        "dtype",
        "tokenizer",
        "evomerge",
        "will",
    ]
    assert table["base"].split()[2:8] == ["llama", "32", "4", "50", "default", "10000"]
    assert "LORA adapter of rank 8" in table["lora8"] and table["lora8"].endswith(
        "apply to the base in memory (PEFT merge_and_unload)"
    )
    assert " 52 " in table["adds_a"] and "+2 tokens" in table["adds_a"]
    assert table["adds_a"].endswith("append its 2 added tokens (models.vocab: union)")
    assert table["b"].split()[-6:] == ["same", "ids", "merge", "as", "it", "is"]


# --- refusals -------------------------------------------------------------------------------------------


def prompt_tuning(root):
    path = root / "prompt"
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8})
    )
    return path


def other_base(root, models):
    path = root / "other"
    shutil.copytree(models["lora2"], path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "org/other-model"})
    )
    return path


def other_shapes(root, models):
    wide = save_model_set(root, ["wide"], hidden=64)["wide"]
    path = save_lora(wide, root / "wide-lora", 2, seed=5)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": str(models["base"])})
    )
    return path


def moved_ids(root, models):
    """``a`` with a tokenizer whose ids of two tokens are swapped, plus one added token."""
    path = root / "moved"
    shutil.copytree(models["a"], path)
    data = json.loads((path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (path / "tokenizer.json").write_text(json.dumps(data))
    return path


def no_tokenizer(root, models):
    path = save_with_tokens(models["a"], root / "untold", ["<q>"], seed=6)
    for f in path.glob("tokenizer*"):
        f.unlink()
    return path


@pytest.mark.parametrize(
    ("make", "vocab", "message"),
    [
        (
            lambda root, m: prompt_tuning(root),
            "base",
            "error: expert 'e' is a PROMPT_TUNING adapter, which cannot be merged into weights; adapter types evomerge merges: ADALORA",
        ),
        (other_base, "base", "error: expert 'e' is an adapter of 'org/other-model' but the run's base is"),
        (
            other_shapes,
            "base",
            "error: expert 'e': the adapter's 'model.layers.0.mlp.down_proj' is for a weight with inputs 128, the base's has 64",
        ),
        (moved_ids, "union", "error: expert 'e''s tokenizer gives 2 of the base's tokens other ids (e.g."),
        (
            no_tokenizer,
            "union",
            "error: expert 'e' has 51 embedding rows against the base's 50 but no tokenizer",
        ),
    ],
)
def test_inputs_that_cannot_merge_are_refused_alike_by_check_and_run(models, tmp_path, make, vocab, message):
    expert = make(tmp_path, models)
    config = write_config(tmp_path, models["base"], {"e": expert, "a": models["a"]}, vocab=vocab)
    runner = CliRunner()
    for command in ("check", "run"):
        result = runner.invoke(app, [command, str(config), "--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and result.output.strip().startswith(message), (command, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
