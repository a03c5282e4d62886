"""The installed packages meet the floors pyproject.toml declares (the floors were verified by
running the actor tests with transformers 5.0.0 + diffusers 0.36.0; see the comment there)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_installed_versions_meet_declared_floors() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name: Requirement(d) for d in deps}
    assert Version(str(next(iter(reqs["transformers"].specifier)).version)) >= Version("5.0")
    assert Version(str(next(iter(reqs["diffusers"].specifier)).version)) >= Version("0.36")
    for name, req in reqs.items():
        installed = metadata.version(name)
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} is not {req.specifier}"


def test_apis_the_code_relies_on_exist() -> None:
    import inspect

    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from actors.diffusion_models import fit_prompts, make_clip_tokenizer

    params = inspect.signature(EulerDiscreteScheduler.__init__).parameters
    assert {"use_karras_sigmas", "timestep_spacing", "final_sigmas_type", "sigma_max"} <= set(params)
    tok = make_clip_tokenizer(8)  # in-memory vocabulary: transformers 5
    assert isinstance(tok, CLIPTokenizer) and tok.is_fast
    fitted, cut = fit_prompts(tok, ["a cat on a sofa"])  # needs offsets (tokenizers backend)
    assert fitted == ["a cat on"] and cut.tolist() == [True]  # 6 byte-level tokens fit
