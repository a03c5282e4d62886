"""AlignDiff (seed 000) — ``plan`` registers the graph, ``config`` holds its sections and ``refine`` is the
two-round few-shot consensus refinement (Algorithm 1)."""
