"""attn2mask (seed 002) — ``plan`` registers the graph, ``config`` holds its section, ``prompts`` makes
class/caption prompts with synonyms and ``masks`` turns cross-attention into pseudo-masks."""
