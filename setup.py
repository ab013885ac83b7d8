from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="wsss-npa",
    version="0.1.0",
    description="Weakly supervised semantic segmentation: the NoPeopleAllowed three-step "
                "method (classifier CAMs -> IRNet pseudo masks -> DeepLabV3+)",
    long_description=(here / "README.md").read_text() if (here / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the submission folder has no __init__.py (it is copied alone); step 6 imports its script
    packages=find_packages(include=["model_training*", "inference*"]) + ["inference.segmentation.submit"],
    install_requires=read_requirements("requirements.txt"),
    extras_require={"test": read_requirements("requirements-test.txt")},
    license="MIT",
)
