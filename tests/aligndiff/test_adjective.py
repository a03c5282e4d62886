"""The instance token sits right before the class noun, and its embedding row is the one used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors import diffusion_configs as dcfg
from actors import textual_inversion as ti
from actors.diffusion_models import make_clip_tokenizer


@pytest.fixture()
def tok_and_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = make_clip_tokenizer()
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(**dcfg.TINY_CLIP_TEXT, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return tok, enc


def test_token_is_the_adjective_before_the_noun(tok_and_encoder):
    tok, enc = tok_and_encoder
    token = ti.instance_token(0)
    prompt = ti.adjective_prompt("sofa", token)
    assert prompt == "a photo of a <aligndiff-0> sofa"
    assert ti.adjective_prompt("sofa") == "a photo of a sofa"
    (tid,) = ti.install_tokens(tok, enc, [token], init_words=["sofa"])
    ids = tok(prompt).input_ids
    pos = ti.token_position(tok, prompt, token)
    noun = tok("sofa", add_special_tokens=False).input_ids
    det = tok("a", add_special_tokens=False).input_ids
    # [bos] a photo of a <tok> s o f a [eos]: the noun's tokens follow the instance token,
    # the determiner precedes it
    assert ids[pos] == tid
    assert ids[pos + 1:pos + 1 + len(noun)] == noun
    assert ids[pos - len(det):pos] == det
    assert ids[pos + 1 + len(noun)] == tok.eos_token_id
    # one token, not split into characters; the table kept its (larger) tiny size
    assert ids.count(tid) == 1 and enc.get_input_embeddings().num_embeddings == 1000


def test_installed_vector_reaches_the_encoder_at_that_position(tok_and_encoder):
    tok, enc = tok_and_encoder
    token = ti.instance_token(3)
    vec = torch.randn(1, dcfg.TINY_CLIP_TEXT["hidden_size"])
    (tid,) = ti.install_tokens(tok, enc, [token], vectors=vec)
    table = enc.get_input_embeddings().weight
    assert torch.equal(table[tid], vec[0])
    # the class-noun initialisation is the mean of the noun's token rows
    (tid2,) = ti.install_tokens(tok, enc, [ti.instance_token(4)], init_words=["sofa"])
    noun = tok("sofa", add_special_tokens=False).input_ids
    assert torch.allclose(table[tid2], table[noun].mean(0))
    # a different vector changes the encoder's output from the token's position on (causal mask)
    prompt = ti.adjective_prompt("sofa", token)
    ids = torch.tensor([tok(prompt).input_ids])
    pos = ti.token_position(tok, prompt, token)
    before = enc(ids).last_hidden_state
    ti.install_tokens(tok, enc, [token], vectors=vec * 0 + 1.0)
    after = enc(ids).last_hidden_state
    assert torch.allclose(before[0, :pos], after[0, :pos], atol=1e-6)
    assert not torch.allclose(before[0, pos:], after[0, pos:], atol=1e-4)


def test_bank_roundtrip(tmp_path):
    entries = [ti.BankEntry(ti.instance_token(i), f"s{i}:1", f"s{i}", 1, "sofa") for i in range(2)]
    emb = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = ti.save_bank(str(tmp_path / "bank" / "bank.safetensors"), entries, [emb], extra={"family": "sd15"})
    got, embs, meta = ti.load_bank(path)
    assert got == entries and meta["family"] == "sd15"
    assert np.array_equal(embs[0].numpy(), emb)
    with pytest.raises(ValueError, match="aligndiff.bank: cannot read"):
        ti.load_bank(str(tmp_path / "missing.safetensors"))
