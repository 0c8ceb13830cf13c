"""The package list, computed: every package under llmopt/, and the top-level folders triton_kernels/ and eval/
installed inside the namespace (llmopt.triton_kernels, llmopt.eval; see pyproject.toml's package-dir)."""

from setuptools import find_packages, setup


def inside(namespace: str, folder: str) -> list[str]:
    return [namespace] + [f"{namespace}.{package}" for package in find_packages(folder)]


setup(packages=[*find_packages(include=["llmopt", "llmopt.*"]), *inside("llmopt.triton_kernels", "triton_kernels"),
                *inside("llmopt.eval", "eval")])
