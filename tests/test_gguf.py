"""GGUF files as models: a tiny Llama written with the gguf package's writer, converted once through
ModelSet into a cached HF folder, merged with two experts end to end; and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import llama_config
from transformers import LlamaForCausalLM

from evomerge.errors import EvomergeError
from evomerge.gguf import GGUF_INFO
from evomerge.jobs import Job
from evomerge.models import ModelSet, save_hf
from evomerge.recipe import Recipe
from evomerge.workers import Worker
from evomerge.zoos import skills

gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install 'evomerge[gguf]')")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# A byte-level BPE vocabulary over the zoo's characters, with one merge so that the file has merges.
TOKENS = [*SPECIALS, *skills.ALPHABET, "ab"]
MERGES = ["a b"]
CONTROL, NORMAL = 3, 1
_LLAMA_CPP_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it when loading."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: LlamaForCausalLM, arch: str = "llama", tokenizer: bool = True) -> Path:
    """``model`` as an F32 GGUF file with llama.cpp metadata and tensor names (and a tokenizer)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(TOKENS)
        w.add_token_types([CONTROL] * len(SPECIALS) + [NORMAL] * (len(TOKENS) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(3)
    top = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    for name, tensor in model.state_dict().items():
        t = tensor.detach().float().numpy()
        if name in top:
            w.add_tensor(f"{top[name]}.weight", t)
            continue
        _, _, layer, *rest = name.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            t = _permute(t, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{_LLAMA_CPP_NAMES[module]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(hidden=hidden, vocab=len(TOKENS))).eval()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache: conversions land in <cache>/evomerge/gguf/."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "evomerge"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    out = {"base": write_gguf(root / "tiny.gguf", model)}
    out["no_tokenizer"] = write_gguf(root / "bare.gguf", model, tokenizer=False)
    out["rwkv"] = write_gguf(root / "rwkv.gguf", model, arch="rwkv6")
    return out


def test_gguf_base_converts_once_to_a_cached_hf_folder(files, cache):
    models = ModelSet(str(files["base"]), {})
    folder = Path(models.resolve(str(files["base"])))
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / GGUF_INFO).read_text())["tokenizer"] is True
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    # The converted model is the one written, q/k permutation undone; the tokenizer is the file's.
    tok = models.load_tokenizer()
    ids = tok("57+85=142.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 10
    assert tok.tokenize("ab|ba.") == ["ab", "|", "b", "a", "."]
    with torch.no_grad():
        torch.testing.assert_close(models.load_model()(ids).logits, tiny_llama()(ids).logits)

    # A second ModelSet reuses the folder: no conversion (its files keep their times).
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = ModelSet(str(files["base"]), {}).resolve(str(files["base"]))
    assert again == str(folder) and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_base_merges_with_experts_end_to_end(files, cache, tmp_path):
    """Base from the GGUF, two experts saved as HF folders (perturbed base weights): a worker merges them
    with task arithmetic and scores the result with the zoo's lm-eval task."""
    base_ref = str(files["base"])
    base_folder = Path(ModelSet(base_ref, {}).resolve(base_ref))
    base = ModelSet(base_ref, {}).load_model()
    tok = ModelSet(base_ref, {}).load_tokenizer()
    experts = {}
    for i, name in enumerate(["a", "b"]):
        expert = ModelSet(base_ref, {}).load_model()
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts[name] = str(save_hf(tmp_path / name, expert, tok))
    models = ModelSet(base_ref, experts)
    models.check()

    spec = {"base": base_ref, "experts": experts, "tokenizer": None, "dtype": "float32"}
    worker = Worker(spec, {"tasks": ["zoo_addition"], "batch_size": 16})
    assert worker.models.resolve(base_ref) == str(base_folder)
    recipe = Recipe.uniform("task_arithmetic", {"weight": [0.5, 0.25]})
    merged = worker.materialize(recipe).state_dict()
    a, b = (ModelSet(base_ref, experts).load_model(e).state_dict() for e in experts.values())
    for name, t in base.state_dict().items():
        torch.testing.assert_close(merged[name], t + 0.5 * (a[name] - t) + 0.25 * (b[name] - t))

    result = worker.evaluate(
        Job(tag="k", recipe=recipe, split="search", items={"zoo_addition": list(range(8))})
    )
    assert result.ok, result.error
    assert 0.0 <= result.values["zoo_addition"] <= 1.0


def test_missing_gguf_file(cache, tmp_path):
    with pytest.raises(EvomergeError, match=r"GGUF file '.*nope\.gguf' does not exist"):
        ModelSet(str(tmp_path / "nope.gguf"), {}).resolve(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(cache, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not gguf")
    with pytest.raises(EvomergeError, match="is not a readable GGUF file"):
        ModelSet(str(bad), {}).resolve(str(bad))


def test_unsupported_gguf_architecture(files, cache):
    with pytest.raises(
        EvomergeError, match=r"architecture 'rwkv6', which transformers cannot load; supported: .*llama"
    ):
        ModelSet(str(files["rwkv"]), {}).resolve(str(files["rwkv"]))
    assert [p.suffix for p in (cache / "gguf").iterdir()] == [".lock"]  # nothing converted, no temp folder


def test_gguf_without_tokenizer_needs_a_tokenizer_source(files, cache, tmp_path):
    ref = str(files["no_tokenizer"])
    with pytest.raises(EvomergeError, match="holds no tokenizer data; set models.tokenizer"):
        ModelSet(ref, {}).check()
    with pytest.raises(EvomergeError, match="holds no tokenizer data"):
        ModelSet(ref, {}).load_tokenizer()
    # With a tokenizer from elsewhere, the bare file is a fine base.
    tok_folder = ModelSet(str(files["base"]), {}).resolve(str(files["base"]))
    models = ModelSet(ref, {}, tokenizer=tok_folder)
    models.check()
    assert models.load_tokenizer().tokenize("ab") == ["ab"]


def test_expert_of_another_architecture_than_the_gguf_base(files, cache, tmp_path):
    wider = tiny_llama(hidden=64)
    folder = tmp_path / "wider"
    wider.save_pretrained(folder)
    with pytest.raises(
        EvomergeError, match="expert 'wide' has tensor shapes that differ from the base: hidden_size"
    ):
        ModelSet(str(files["base"]), {"wide": str(folder)}).check()
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(TOKENS))).save_pretrained(gpt2)
    with pytest.raises(EvomergeError, match="expert 'g' is a 'gpt2' model, the base is 'llama'"):
        ModelSet(str(files["base"]), {"g": str(gpt2)}).check()
