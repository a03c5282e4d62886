"""AlignDiff's instance embeddings: adjective prompts, token installation, the embedding bank.

Sec. 3.4 of AlignDiff (seed 000) learns one embedding v* per given instance and uses it as an
*adjective* right before the class noun ("a photo of a v* sofa"), not as the noun itself as
plain textual inversion does (the authors found it converges faster and more stably). Here
each v* is a new token of the tokenizer (``<aligndiff-N>``) whose row in the text encoder's
input embedding table holds the learned vector; the training recipe and the generation actor
both go through :func:`install_tokens`, so the prompt the embedding was learned with and the
prompt it is used with tokenise the same way.

The bank is one safetensors file: ``embeddings`` (N, D) for the text encoder (and
``embeddings_2`` for SDXL's second one) plus metadata ``instances`` (JSON list: token,
instance_id, source_id, class_id, class_name per row). It is read through ``pyarrow.fs``, so
a bank on object storage works like a local one. No torch import at module level.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

TOKEN_FORMAT = "<aligndiff-{}>"
DEFAULT_TEMPLATE = "a photo of a {}"  # the paper's prompt; "{}" receives "v* <class>"
EMBEDDING_KEYS = ("embeddings", "embeddings_2")  # one per text encoder (SDXL has two)


@dataclass(frozen=True)
class BankEntry:
    """One learned instance embedding: which given sample and class it describes."""

    token: str
    instance_id: str
    source_id: str
    class_id: int
    class_name: str


def instance_token(index: int) -> str:
    """The placeholder token of the ``index``-th bank entry."""
    return TOKEN_FORMAT.format(index)


def adjective_prompt(class_name: str, token: str | None = None, template: str = DEFAULT_TEMPLATE) -> str:
    """``"a photo of a <tok> sofa"``: the instance token as an adjective before the class noun;
    ``token=None`` gives the plain class prompt ``"a photo of a sofa"``."""
    return template.format(f"{token} {class_name}" if token else class_name)


def install_tokens(tokenizer: Any, text_encoder: Any, tokens: Sequence[str],
                   vectors: Any | None = None, init_words: Sequence[str] | None = None) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` (if new) and set their input-embedding rows; return ids.

    Rows come from ``vectors`` (N, D) when given (a bank), else from the mean embedding of the
    tokens of ``init_words[k]`` (training starts from the class noun, as textual inversion
    starts from an initializer word). The embedding table only grows: a tiny encoder whose
    table is larger than its tokenizer keeps its size.
    """
    import torch

    tokens = list(tokens)
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings()
    if max(ids, default=-1) >= table.num_embeddings:
        text_encoder.resize_token_embeddings(max(ids) + 1)
        table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for k, tid in enumerate(ids):
            if vectors is not None:
                row = torch.as_tensor(vectors[k], dtype=table.weight.dtype)
            elif init_words is not None:
                word_ids = tokenizer(init_words[k], add_special_tokens=False).input_ids
                row = table.weight[word_ids].mean(0)
            else:
                continue
            table.weight[tid] = row.to(table.weight.device)
    return list(ids)


def token_position(tokenizer: Any, prompt: str, token: str) -> int:
    """Index of ``token`` in the encoded ``prompt`` (start token included), -1 if absent."""
    ids = tokenizer(prompt).input_ids
    tid = tokenizer.convert_tokens_to_ids(token)
    return ids.index(tid) if tid in ids else -1


def save_bank(path: str, entries: Sequence[BankEntry], embeddings: Sequence[Any],
              extra: dict[str, str] | None = None) -> str:
    """Write the bank (one (N, D) tensor per text encoder) to ``path`` (local or URI)."""
    import torch
    from safetensors.torch import save

    tensors = {EMBEDDING_KEYS[i]: torch.as_tensor(e).detach().float().cpu().contiguous()
               for i, e in enumerate(embeddings)}
    for key, tensor in tensors.items():
        if tensor.shape[0] != len(entries):
            raise ValueError(f"bank {path}: {key} has {tensor.shape[0]} rows for {len(entries)} entries")
    meta = {"instances": json.dumps([asdict(e) for e in entries]), **(extra or {})}
    _write_bytes(path, save(tensors, metadata=meta))
    return path


def load_bank(path: str) -> tuple[list[BankEntry], list[Any], dict[str, str]]:
    """(entries, embeddings per text encoder, metadata) of a bank file (local or URI)."""
    from safetensors.torch import load

    data = _read_bytes(path)
    tensors = load(data)
    meta = _metadata(data)
    if "instances" not in meta or EMBEDDING_KEYS[0] not in tensors:
        raise ValueError(f"aligndiff.bank: {path} is not an AlignDiff embedding bank "
                         f"(needs tensor {EMBEDDING_KEYS[0]!r} and metadata 'instances')")
    entries = [BankEntry(**e) for e in json.loads(meta["instances"])]
    embeddings = [tensors[k] for k in EMBEDDING_KEYS if k in tensors]
    return entries, embeddings, meta


def _metadata(data: bytes) -> dict[str, str]:
    # the safetensors header: 8-byte little-endian length, then JSON with "__metadata__"
    n = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _read_bytes(path: str) -> bytes:
    fs, p = _filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(f"aligndiff.bank: cannot read {path}: {exc}".splitlines()[0]) from None


def _write_bytes(path: str, data: bytes) -> None:
    import os

    fs, p = _filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)
