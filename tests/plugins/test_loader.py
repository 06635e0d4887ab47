"""Checkpoint loading: GGUF (dequantized, cached) and Hugging Face safetensors directories."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from plugins.torch_engine import gguf_loader
from plugins.torch_engine.loader import cache_path, load_checkpoint
from plugins.torch_engine.model_config import QWEN2
from trident.core.errors import ModelLoadError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trident-cache"))


@pytest.fixture(scope="module")
def smollm(default_model_path, cache_dir):
    """The default model loaded once, from the GGUF (the cache is empty at this point)."""
    assert not os.path.exists(cache_path(default_model_path, cache_dir))
    return load_checkpoint(default_model_path, cache_dir=cache_dir)


def test_default_model_config(smollm):
    c = smollm.config
    assert (c.architecture, c.model_id) == ("LlamaForCausalLM", "SmolLM2-135M-Instruct.Q4_1")
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm.weights
    assert (c.bos_token_id, c.eos_token_ids, c.attention_bias) == (1, (2,), False)
    assert all(t.dtype == torch.float32 for t in smollm.weights.values())


@pytest.mark.slow
def test_gguf_weights_equal_transformers(smollm, default_model_path):
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    reference = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert sorted(reference) == sorted(smollm.weights)
    for key, value in reference.items():
        assert torch.equal(smollm.weights[key], value), key


def test_second_load_hits_the_cache(smollm, default_model_path, cache_dir, monkeypatch):
    assert os.path.isfile(cache_path(default_model_path, cache_dir))

    def no_dequantize(*args, **kwargs):
        raise AssertionError("dequantized although the cache is warm")

    monkeypatch.setattr(gguf_loader, "load_weights", no_dequantize)
    again = load_checkpoint(default_model_path, cache_dir=cache_dir)
    assert again.config == smollm.config
    assert all(torch.equal(again.weights[k], v) for k, v in smollm.weights.items())


def test_corrupt_cache_is_replaced(smollm, default_model_path, cache_dir):
    path = cache_path(default_model_path, cache_dir)
    with open(path, "r+b") as f:
        f.truncate(1000)
    again = load_checkpoint(default_model_path, cache_dir=cache_dir)
    assert torch.equal(again.weights["model.norm.weight"], smollm.weights["model.norm.weight"])
    assert os.path.getsize(path) > 100_000_000  # rewritten whole


def test_truncated_gguf_names_file_and_tensor(default_model_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src:
        bad.write_bytes(src.read(10_000_000))  # header intact, first tensor cut
    with pytest.raises(ModelLoadError, match=rf"{bad}: tensor token_embd.weight .*truncated"):
        load_checkpoint(str(bad), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- GGUF written here


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_llama_gguf(path: str, state: dict[str, torch.Tensor], cfg, arch: str = "llama") -> None:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)
    parts = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    for name, tensor in state.items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, kind, suffix = name.split(".")[2], name.split(".")[-2], name.split(".")[-1]
            norm = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
            gname = f"blk.{layer}.{norm.get(kind) or parts[kind]}.{suffix}"
            if arch == "llama" and kind == "q_proj":
                array = _permute(array, cfg.num_attention_heads)
            elif arch == "llama" and kind == "k_proj":
                array = _permute(array, cfg.num_key_value_heads)
        w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg, LlamaForCausalLM(cfg).eval()


def test_written_gguf_round_trips_permutation(tmp_path):
    cfg, model = _tiny_llama(tie=False)
    state = model.state_dict()
    path = str(tmp_path / "tiny.gguf")
    _write_llama_gguf(path, state, cfg)
    ckpt = load_checkpoint(path, cache_dir=str(tmp_path / "cache"))
    assert sorted(ckpt.weights) == sorted(state)
    for key, value in state.items():
        assert torch.equal(ckpt.weights[key], value), key
    assert not ckpt.config.tie_word_embeddings and ckpt.config.eos_token_ids == (2, 3)


def test_changed_gguf_gets_a_new_cache_and_drops_the_old(tmp_path):
    cfg, model = _tiny_llama(tie=True)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path, cache = str(tmp_path / "tiny.gguf"), str(tmp_path / "cache")
    _write_llama_gguf(path, state, cfg)
    load_checkpoint(path, cache_dir=cache)
    old = cache_path(path, cache)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    new = cache_path(path, cache)
    assert new != old
    ckpt = load_checkpoint(path, cache_dir=cache)
    assert os.path.isfile(new) and not os.path.exists(old)
    assert torch.equal(ckpt.weights["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_written_qwen2_gguf_keeps_rows_and_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    state = {k: v for k, v in Qwen2ForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    path = str(tmp_path / "qwen.gguf")
    _write_llama_gguf(path, state, cfg, arch="qwen2")
    ckpt = load_checkpoint(path, cache_dir=str(tmp_path / "cache"))
    assert ckpt.config.architecture == QWEN2 and ckpt.config.tie_word_embeddings
    assert sorted(ckpt.weights) == sorted(state)
    for key, value in state.items():
        assert torch.equal(ckpt.weights[key], value), key


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(path, "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ModelLoadError, match=rf"{path}: GGUF architecture 'falcon' is not supported"
    ):
        load_checkpoint(path, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- Hugging Face directories


def _check_equal(ckpt, model, tied: bool) -> None:
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(ckpt.weights) == sorted(state)
    for key, value in state.items():
        assert torch.equal(ckpt.weights[key], value.float()), key


def test_hf_llama_sharded_untied(tmp_path):
    cfg, model = _tiny_llama(tie=False)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = load_checkpoint(str(tmp_path))
    _check_equal(ckpt, model, tied=False)
    c = ckpt.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "LlamaForCausalLM",
        2,
        4,
        2,
        8,
    )
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.eos_token_ids) == (
        96,
        10000.0,
        128,
        (2,),
    )


def test_hf_llama_tied_bf16_with_llama3_rope(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters=rope,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(str(tmp_path))
    _check_equal(ckpt, model, tied=True)
    assert ckpt.config.rope_theta == 500000.0
    assert (
        ckpt.config.rope_scaling["rope_type"] == "llama3"
        and ckpt.config.rope_scaling["factor"] == 8.0
    )


def test_hf_qwen2_has_qkv_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(str(tmp_path))
    _check_equal(ckpt, model, tied=True)
    assert ckpt.config.architecture == QWEN2 and ckpt.config.attention_bias
    assert ckpt.weights["model.layers.1.self_attn.k_proj.bias"].shape == (16,)


def test_hf_mistral_loads(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
    )
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(str(tmp_path))
    _check_equal(ckpt, model, tied=False)
    assert ckpt.config.architecture == "MistralForCausalLM"


def test_unknown_architecture_names_config_file(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8})
    )
    with pytest.raises(
        ModelLoadError,
        match=rf"{tmp_path / 'config.json'}: architecture 'GPT2LMHeadModel' is not supported",
    ):
        load_checkpoint(str(tmp_path))


def test_corrupt_safetensors_names_the_file(tmp_path):
    _, model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match=rf"{shard}: cannot read safetensors file"):
        load_checkpoint(str(tmp_path))


def test_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    shard = str(tmp_path / "model.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard)
    with pytest.raises(ModelLoadError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(str(tmp_path))
