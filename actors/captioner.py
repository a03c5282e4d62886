"""Captioner: a caption per image, from BLIP-2 (SegGen) or BLIP (Diffusion Synthesis).

SegGen (appendix A) captions with BLIP-2 FlanT5-XXL fed "Question: What are shown in the photo?
Answer:"; Diffusion Synthesis captions with BLIP and uses the caption as the base prompt. Both
are ``*ForConditionalGeneration`` models driven the same way: one processor call and one
``generate`` call per batch (the processors resize every image to one size, so a batch is one
tensor). A decoder-only language model (BLIP-2 OPT) returns the question too: it is cut off.

``tiny`` builds both from tiny configs with random weights and a tokenizer made in memory.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from actors import vision_models as vm
from core.schema import CAPTION, IMAGE_RAW

log = logging.getLogger(__name__)

KINDS = ("blip", "blip2")
SEGGEN_QUESTION = "Question: What are shown in the photo? Answer:"
DEFAULT_PROMPTS = {"blip": "", "blip2": SEGGEN_QUESTION}


def tiny_captioner(kind: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of a tiny BLIP or BLIP-2 (OPT) with random weights, deterministic."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tok = vm.make_bert_tokenizer(64)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    ids = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}
    torch.manual_seed(seed)
    if kind == "blip":
        text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                "num_attention_heads": 4, "max_position_embeddings": 64, "sep_token_id": 102, **ids}
        model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32))
        return model.eval(), BlipProcessor(image_processor=image_processor, tokenizer=tok)
    if kind != "blip2":
        raise ValueError(f"unknown captioner kind {kind!r}; expected one of {KINDS}")
    queries = 4
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=queries)
    vocab = len(tok)  # now includes the <image> token the processor added
    config = Blip2Config(
        vision_config=vision,
        qformer_config={"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                        "intermediate_size": 37, "max_position_embeddings": 64, "encoder_hidden_size": 32,
                        "cross_attention_frequency": 1},
        text_config={"model_type": "opt", "vocab_size": vocab, "hidden_size": 16, "num_hidden_layers": 1,
                     "ffn_dim": 32, "num_attention_heads": 2, "max_position_embeddings": 128,
                     "word_embed_proj_dim": 16, **ids},
        num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>"))
    return Blip2ForConditionalGeneration(config).eval(), processor


class Captioner:
    """Images -> ``caption``.

    Input columns: ``image_raw`` + ``height`` + ``width`` (or encoded ``image``). Output:
    ``caption`` (str, stripped). ``prompt`` None means the kind's default: SegGen's question
    for BLIP-2, unconditional captioning for BLIP (a text prefix like "a picture of" is kept
    in the caption, as BLIP returns it).
    """

    def __init__(
        self,
        kind: str = "blip",
        preset: str = "tiny",
        *,
        model_id: str | None = None,
        revision: str | None = None,
        local_path: str | None = None,
        variant: str | None = None,
        dtype: str = "float16",
        device: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        image_column: str = IMAGE_RAW,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        """Load once; ``model``/``processor`` given ready-built win (convention 2)."""
        if kind not in KINDS:
            raise ValueError(f"unknown captioner kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.prompt = DEFAULT_PROMPTS[kind] if prompt is None else prompt
        self.image_column = image_column
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                                "num_beams": num_beams, "do_sample": False}
        self.device, self.dtype = vm.device_and_dtype(preset, device, dtype)
        if model is None or processor is None:
            model, processor = self._build(preset, model_id, revision, local_path, variant)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.calls = 0  # generate calls made, for logs and tests

    def _build(self, preset: str, model_id: str | None, revision: str | None,
               local_path: str | None, variant: str | None = None) -> tuple[Any, Any]:
        return vm.build_or_load(preset, "captioner", lambda: self._load(model_id, revision, local_path, variant),
                                kind=self.kind)

    def _load(self, model_id: str | None, revision: str | None, local_path: str | None,
              variant: str | None) -> tuple[Any, Any]:
        from transformers import (
            AutoProcessor,
            Blip2ForConditionalGeneration,
            BlipForConditionalGeneration,
        )

        cls = BlipForConditionalGeneration if self.kind == "blip" else Blip2ForConditionalGeneration
        model = vm.load_pretrained(cls, model_id, revision, local_path, "captioner", dtype=self.dtype,
                                   variant=variant)
        processor = vm.load_pretrained(AutoProcessor, model_id, revision, local_path, "captioner", weights=False)
        if self.kind == "blip2" and getattr(processor, "num_query_tokens", None) is None:
            processor.num_query_tokens = model.config.num_query_tokens  # older processor configs
        return model, processor

    def __call__(self, batch: dict) -> dict:
        """Add ``caption``: one processor call and one ``generate`` call for the whole batch."""
        import torch

        images = vm.batch_images(batch, self.image_column)
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs.update(text=[self.prompt] * len(images), padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        self.calls += 1
        decoder_only = getattr(self.model.config, "use_decoder_only_language_model", False)
        if self.kind == "blip2" and decoder_only and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]  # generate echoes the question
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        captions = [" ".join(t.split()) for t in texts]
        log.debug("Captioner(%s): %d captions", self.kind, len(captions))
        return {CAPTION: np.array(captions, dtype=object)}
