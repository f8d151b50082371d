"""Maps encoder/ and adapters/ into the clocmllm import root (see DESIGN.md, layout).

pyproject.toml holds all metadata; this file only computes the package list, because
setuptools' declarative `packages.find` cannot express a package-dir remapping of
sub-packages that live in sibling folders.
"""

from setuptools import find_packages, setup

ROOTS = {"clocmllm": "clocmllm", "clocmllm.encoder": "encoder", "clocmllm.adapters": "adapters"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=ROOTS,
    package_data={"clocmllm.encoder": ["configs/*.yaml", "data/*.json"], "clocmllm.web": ["*.html"]},
    include_package_data=True,
)
