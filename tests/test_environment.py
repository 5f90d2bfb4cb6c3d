"""environment.yml (conda, GPU box) and requirements.txt (CPU pins) agree with pyproject.toml."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONDA_TORCH = {"pytorch": "torch"}  # conda package names that provide a pip distribution


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _runtime_deps() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}


def _all_declared() -> dict[str, Requirement]:
    reqs = dict(_runtime_deps())
    for extra in _pyproject()["project"].get("optional-dependencies", {}).values():
        for r in map(Requirement, extra):
            reqs.setdefault(canonicalize_name(r.name), r)
    return reqs


def _requirements_txt() -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            out[canonicalize_name(r.name)] = r
    return out


def _env_packages(env: dict) -> tuple[dict[str, str], dict[str, Requirement], list[str]]:
    """(conda name -> spec, pip name -> Requirement, pip option/editable lines) of a parsed environment."""
    conda, pip, other = {}, {}, []
    for dep in env.get("dependencies") or []:
        if isinstance(dep, dict):
            for line in dep.get("pip") or []:
                line = str(line).strip()
                if line.startswith("-"):
                    other.append(line)
                else:
                    r = Requirement(line)
                    pip[canonicalize_name(r.name)] = r
        else:
            name, _, spec = str(dep).partition("=")
            conda[canonicalize_name(name.strip())] = spec.strip("= ")
    return conda, pip, other


def missing_runtime_deps(env: dict) -> list[str]:
    """Runtime dependencies of pyproject.toml that the environment does not install."""
    conda, pip, _ = _env_packages(env)
    provided = set(pip) | {CONDA_TORCH.get(c, c) for c in conda}
    return sorted(n for n in _runtime_deps() if n not in provided)


@pytest.fixture(scope="module")
def env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_environment_declares_every_runtime_dependency(env):
    assert missing_runtime_deps(env) == []


@pytest.mark.parametrize("drop", ["numpy", "safetensors", "triton", "torch"])
def test_a_missing_dependency_is_caught(env, drop):
    # The check above must fail on an environment that lacks one dependency.
    broken = yaml.safe_load(yaml.safe_dump(env))
    for dep in broken["dependencies"]:
        if isinstance(dep, dict):
            dep["pip"] = [x for x in dep["pip"] if x.startswith("-") or canonicalize_name(Requirement(x).name) != drop]
    assert missing_runtime_deps(broken) == [drop]


def test_python_and_editable_install(env):
    conda, _, other = _env_packages(env)
    assert conda["python"].startswith("3.11")
    assert "pip" in conda
    assert "-e ." in other


def test_torch_is_not_the_cpu_pin_and_fits_pyproject(env):
    _, pip, _ = _env_packages(env)
    torch_env, torch_py = pip["torch"], _runtime_deps()["torch"]
    assert not any(s.operator == "==" for s in torch_env.specifier), "a == pin would force the CPU build"
    # every torch release the environment accepts is one pyproject accepts (checked on a grid of versions)
    for v in [f"2.{m}.{p}" for m in range(8, 18) for p in range(3)]:
        if Version(v) in torch_env.specifier:
            assert Version(v) in torch_py.specifier, v
    assert Version("2.13.0") in torch_env.specifier


def test_environment_pins_match_requirements_txt(env):
    _, pip, _ = _env_packages(env)
    req = _requirements_txt()
    for name, r in req.items():
        if name == "torch":
            continue
        assert name in pip, f"{name} from requirements.txt missing in environment.yml"
        assert str(pip[name].specifier) == str(r.specifier), name


def test_requirements_pins_satisfy_pyproject_ranges():
    req, declared = _requirements_txt(), _all_declared()
    for name, dep in declared.items():
        assert name in req, f"{name} declared in pyproject.toml but not pinned in requirements.txt"
        pins = [s for s in req[name].specifier if s.operator == "=="]
        assert len(pins) == 1, f"{name}: requirements.txt must pin one exact version"
        assert Version(pins[0].version) in dep.specifier, f"{name}=={pins[0].version} outside {dep.specifier}"


def test_range_check_catches_a_pin_outside_the_range():
    dep = Requirement("torch>=2.10,<2.15")
    assert Version("2.9.0") not in dep.specifier and Version("2.13.0") in dep.specifier
