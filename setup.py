from setuptools import find_packages, setup


# torch is not pinned here on purpose: install the build that matches your hardware first
# (the Makefile installs the CPU build `torch==2.13.0`), so that pip never swaps it for another.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "transformers>=5.0,<6",
    "trl>=1.16,<2",
    "peft>=0.21",
    "datasets>=4.0",
    "accelerate>=1.15",
    "pyyaml",
    "tqdm",
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.19"],
    "openai": ["openai>=2.0", "tenacity>=9.0"],
    "eval": ["rouge-score==0.1.2", "rapidfuzz>=3.0", "nltk", "matplotlib"],
}
EXTRAS["dev"] = sorted({*EXTRAS["openai"], *EXTRAS["eval"], "pytest>=8", "pytest-timeout"})

setup(
    name="tuna-trl",
    version="0.1.0",
    description="Tuna: instruction tuning with ranking feedback from stronger LLMs, on Hugging Face TRL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tuna_trl", "tuna_trl.*"]),
    package_data={"tuna_trl": ["templates/*.txt", "templates/*.md", "data/*.jsonl", "data/*.json", "data/superni/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tuna-trl=tuna_trl.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
