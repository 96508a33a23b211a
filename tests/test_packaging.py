"""The package as users get it: no name clash with installed packages, a wheel that holds the
whole source tree, and entry points that start from outside the repository."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout may hold at its root beside its sources: environments, caches, outputs.
NOT_SOURCES = {
    ".git",
    ".venv",
    ".lock-venv",
    "runs",
    "data",
    "out",
    "build",
    ".pytest_cache",
    ".ruff_cache",
}


def _not_sources(directory: str, names: list[str]) -> set[str]:
    skip = NOT_SOURCES if Path(directory) == REPO else set()
    return {n for n in names if n in skip or n == "__pycache__" or n.endswith(".egg-info")}


def _python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_repository_root_imports_the_installed_kernels_package_beside_ted_scale(subprocess_env):
    """transformers imports Hugging Face's `kernels`; a folder of that name at the repository root
    (which `python -c`, `python -m pytest` and `python -m ...` put first on sys.path) shadowed it."""
    assert importlib.util.find_spec("kernels") is not None, "the lock installs kernels"
    done = _python(
        "import sysconfig, kernels, transformers.models.gpt2.modeling_gpt2, ted_scale.kernels\n"
        "assert kernels.__file__.startswith(sysconfig.get_paths()['purelib']), kernels.__file__",
        REPO,
        subprocess_env,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (the build writes beside its sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_not_sources)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(tmp), str(source)], check=True, capture_output=True)
    (built,) = tmp.glob("ted_scale-*.whl")
    return built


def test_wheel_holds_every_module_and_asset_of_the_source_tree(wheel):
    package = REPO / "ted_scale"
    sources = {
        path.relative_to(REPO).as_posix()
        for path in package.rglob("*")
        if path.is_file() and (path.suffix in (".py", ".cpp") or path.parent.name == "assets")
    }
    missing = sorted(sources - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, f"not in {wheel.name}: {missing}"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_every_command_gives_torch_huge_pages_unless_the_environment_says_no(
    given, expected, subprocess_env
):
    env = {k: v for k, v in subprocess_env.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, ted_scale.cli; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert _python(code, REPO, env).stdout.strip() == expected


def test_installed_wheel_trains_evaluates_and_starts_the_demo_outside_the_repository(
    wheel, tiny_data, tmp_path, subprocess_env
):
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    # The installed copy first on sys.path, ahead of this checkout's editable install.
    env = {**subprocess_env, "PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"
    work.mkdir()

    imported = _python(
        "import kernels, ted_scale, ted_scale.study, ted_scale.kernels\n"
        "from ted_scale.eval.datafiles import asset_text\n"
        "assert asset_text('lambada_openai_test.jsonl.gz', 200).startswith('{')\n"
        "print(ted_scale.__file__)",
        work,
        env,
    )
    assert imported.returncode == 0, imported.stderr
    assert site in Path(imported.stdout.strip()).parents

    def module(name: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", f"ted_scale.cli.{name}", *args]
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    run = work / "run"
    trained = module(
        "pretrain_ted", "--config", str(REPO / "configs" / "tiny-kd.yaml"),
        f"data.path={tiny_data}", f"output_dir={run}", "stage2.max_steps=2",
        "checkpoint.interval=0", "eval.interval=0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (run / "student_hf" / "config.json").is_file()

    results = work / "heldout.json"
    evaluated = module(
        "evaluate", "--model", str(run / "student_hf"), "--tasks", "heldout",
        "--data", str(tiny_data), "--out", str(results), "--max-examples", "2",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert results.is_file()

    for name in ("demo", "study", "prepare_data", "bench_throughput", "estimate_memory"):
        started = module(name, "--help")
        assert started.returncode == 0 and "usage:" in started.stdout, (name, started.stderr)
