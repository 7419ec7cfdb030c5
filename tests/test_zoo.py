"""The tiny model zoo and its skill data."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge import cache
from evomerge.zoos import build, scoring, skills
from evomerge.zoos import tiny as zoo

FITNESS_ZOO = Path(__file__).resolve().parents[1] / "fitness" / "zoo"


def _answer(prompt: str) -> str:
    """The correct completion of a full-skill prompt, computed independently of the generators."""
    body, sep = prompt[:-1], prompt[-1]
    if sep == "=":
        a, b = body.split("+")
        return f"{int(a) + int(b)}."
    if sep == ">":
        return "".join(skills.SCRIPT[int(d)] for d in body) + "."
    if sep == "<":
        return "".join(str(skills.SCRIPT.index(c)) for c in body) + "."
    return body[::-1] + "."


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_items_are_well_formed(skill: str) -> None:
    for item in skills.make_split(skill, 100, seed=7):
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert choices[item["label"]] == _answer(item["prompt"])
        assert all(c.endswith(".") for c in choices)
    labels = [it["label"] for it in skills.make_split(skill, 200, seed=7)]
    assert set(labels) == {0, 1, 2, 3}


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_training_text_levels(skill: str) -> None:
    rng = random.Random(0)
    unalt = {alt: sep for sep, alt in skills.ALT_SEPARATORS.items()}
    for level in skills.LEVELS:
        for _ in range(50):
            text = skills.training_text(skill, rng, level)
            cut = max(text.find(sep) for sep in "=><|:][/") + 1
            prompt = text[:cut]
            assert (prompt[-1] in unalt) == (level == "alt")
            assert text[cut:] == _answer(prompt[:-1] + unalt.get(prompt[-1], prompt[-1]))
            assert set(text) <= set(skills.ALPHABET)
            assert len(text) <= zoo.RECIPE["seq_len"]


def test_splits_are_deterministic_and_disjoint() -> None:
    for skill in skills.SKILLS:
        assert skills.make_split(skill, 50, seed=3) == skills.make_split(skill, 50, seed=3)
        assert skills.make_split(skill, 50, seed=3) != skills.make_split(skill, 50, seed=4)
        splits = skills.task_splits(skill)
        prompts = {split: [it["prompt"] for it in items] for split, items in splits.items()}
        assert all(len(p) == len(set(p)) == skills.SPLIT_SIZE for p in prompts.values())
        assert not set(prompts["search"]) & set(prompts["test"])


def test_committed_task_data_matches_generator(tmp_path: Path) -> None:
    for path in skills.write_task_data(tmp_path):
        committed = FITNESS_ZOO / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: rerun write_task_data"


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_task_yaml(skill: str) -> None:
    spec = yaml.safe_load((FITNESS_ZOO / f"{skill}.yaml").read_text())
    assert spec["task"] == f"zoo_{skill}"
    assert spec["output_type"] == "multiple_choice" and spec["target_delimiter"] == ""
    for split in ("search", "test"):
        rel = spec["dataset_kwargs"]["data_files"][split]
        assert (FITNESS_ZOO / rel).is_file()
        first = json.loads((FITNESS_ZOO / rel).read_text().splitlines()[0])
        assert set(first) == {"prompt", "choices", "label"}


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    zoo.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "37+85=122.rit<374.abcde|edcba."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == zoo.SPECIAL_TOKENS


def test_recipe_hash_covers_recipe() -> None:
    changed = json.loads(json.dumps(zoo.RECIPE))
    changed["expert"]["lr"] *= 2
    assert build.recipe_hash(zoo.RECIPE) == build.recipe_hash(json.loads(json.dumps(zoo.RECIPE)))
    assert build.recipe_hash(changed) != build.recipe_hash(zoo.RECIPE)


def _fake_build(out: Path, recipe: dict, progress: bool) -> dict:
    (out / "base").mkdir()
    return {"recipe": recipe, "hash": build.recipe_hash(recipe), "experts": [], "accuracy": {}}


def test_killed_build_leaves_no_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path, recipe: dict, progress: bool) -> dict:
        (out / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        zoo.build_zoo(tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]

    # A folder without a manifest (say, copied half-way) is rebuilt, not trusted.
    monkeypatch.setattr(zoo, "_build", _fake_build)
    final = tmp_path / f"zoo-{build.recipe_hash(zoo.RECIPE)}"
    (final / "base").mkdir(parents=True)
    assert zoo.build_zoo(tmp_path, progress=False) == final
    assert build.load_manifest(final)["hash"] == build.recipe_hash(zoo.RECIPE)


def test_build_once_removes_the_folder_of_a_killed_build(tmp_path: Path) -> None:
    """SIGKILL runs no `finally`: the killed build's temporary folder stays until the next build of
    the same folder removes it under the lock; other folders' builds are left alone."""
    import signal
    import subprocess
    import sys

    from evomerge.cache import build_once

    final = tmp_path / "thing"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; from pathlib import Path; from evomerge.cache import build_once; "
            "build_once(Path(sys.argv[1]), lambda tmp: ((tmp / 'half').write_text('x'), "
            "os.kill(os.getpid(), signal.SIGKILL)))",
            str(final),
        ],
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".thing-")]
    assert (stale / "half").is_file() and not final.exists()
    others = [tmp_path / ".thing-bfloat16-abcd1234", tmp_path / ".thing-notes", tmp_path / "thing-abcd1234"]
    for other in others:  # a build of `thing-bfloat16`, and names mkdtemp does not make for `thing`
        other.mkdir()

    assert build_once(final, lambda tmp: (tmp / "done").write_text("ok")) == final
    assert (final / "done").read_text() == "ok" and not stale.exists()
    assert all(other.is_dir() for other in others)

    # a killed forced rebuild of a finished folder: the next call reuses the folder and still cleans up
    (tmp_path / ".thing-zz_9abcd").mkdir()
    assert build_once(final, lambda tmp: pytest.fail("rebuilt a complete folder")) == final
    assert not (tmp_path / ".thing-zz_9abcd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".thing-bfloat16-abcd1234", ".thing-notes", "thing", "thing-abcd1234", "thing.lock"]
    )


def test_force_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(zoo, "_build", lambda *a: calls.append(1) or _fake_build(*a))
    first = zoo.build_zoo(tmp_path, progress=False)
    assert zoo.build_zoo(tmp_path, progress=False) == first and len(calls) == 1
    assert zoo.build_zoo(tmp_path, force=True, progress=False) == first and len(calls) == 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "evomerge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "evomerge"


# --- tests on the built zoo ----------------------------------------------------------------------------


def test_zoo_layout_and_cache_hit(zoo_dir: Path) -> None:
    manifest = build.load_manifest(zoo_dir)
    assert zoo_dir.name == f"zoo-{manifest['hash']}" and manifest["hash"] == build.recipe_hash(zoo.RECIPE)
    assert manifest["experts"] == list(skills.SKILLS)
    stamp = (zoo_dir / build.MANIFEST).stat().st_mtime_ns
    started = time.perf_counter()
    assert zoo.build_zoo(zoo_dir.parent, progress=False) == zoo_dir
    assert time.perf_counter() - started < 1.0
    assert (zoo_dir / build.MANIFEST).stat().st_mtime_ns == stamp


def test_zoo_models_load(zoo_dir: Path) -> None:
    folders = [zoo_dir / "base"] + [zoo_dir / "experts" / s for s in skills.SKILLS]
    shapes = None
    for folder in folders:
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        current = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes is None or current == shapes
        shapes = current


def test_mc_accuracy_matches_naive_scoring(zoo_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    items = [it for s in skills.SKILLS for it in skills.task_splits(s)["test"][:8]]
    fast = scoring.mc_correct(model, tok, items, batch_size=7)
    naive = []
    with torch.no_grad():
        for item in items:
            scores = []
            for choice in item["choices"]:
                ids = tok(item["prompt"] + choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
                logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
                n = len(tok(item["prompt"], add_special_tokens=False)["input_ids"])
                scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1])))
            naive.append(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    assert fast.tolist() == naive


def test_experts_specialise(zoo_dir: Path) -> None:
    acc = build.load_manifest(zoo_dir)["accuracy"]
    for skill in skills.SKILLS:
        assert acc[skill][skill] >= acc["base"][skill] + 0.25, (skill, acc)
        for other in skills.SKILLS:
            if other != skill:
                assert acc[skill][other] <= acc["base"][other] + 0.1, (skill, other, acc)


def test_task_arithmetic_merge_beats_best_expert(zoo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [
        AutoModelForCausalLM.from_pretrained(zoo_dir / "experts" / s).state_dict() for s in skills.SKILLS
    ]
    model.load_state_dict({k: v + sum(0.5 * (e[k] - v) for e in experts) for k, v in base.items()})
    merged = sum(scoring.evaluate(model, tok, "test").values()) / len(skills.SKILLS)
    acc = build.load_manifest(zoo_dir)["accuracy"]
    best_expert = max(sum(acc[s].values()) / len(skills.SKILLS) for s in skills.SKILLS)
    assert merged >= best_expert + 0.04, (merged, best_expert)
