"""Diffusion Synthesis (seed 001) — ``plan`` registers the factory graph, ``config`` holds its sections,
``prompts`` is its multi-way prompt generator and ``selection`` its two filters."""
