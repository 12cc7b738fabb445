from setuptools import find_packages, setup

TRITON = "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="mst_hf",
    version="0.1.0",
    description="Mixed Sparsity Training (MST) for HuggingFace Transformers: dynamic sparse training, a three-phase "
    "sparsity schedule and hybrid sparse attention, as a Trainer subclass and a registered attention.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mst_hf", "mst_hf.*"]),
    package_data={"mst_hf": ["data/*", "data/*/*", "metrics/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<6",
        "accelerate>=1.10",
        "datasets>=3.0",
        "evaluate>=0.4",
        "peft>=0.17",
        "safetensors>=0.4",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        # triton: the CPU tests run the Triton HSA kernel in Triton's interpreter (CUDA builds of torch ship it)
        "test": ["pytest>=8", "nbclient", "nbformat", "ipykernel", "tensorboard", TRITON],
        "dev": ["ruff", "pytest>=8", "nbclient", "nbformat", "ipykernel", "tensorboard", TRITON],
    },
    entry_points={"console_scripts": ["mst-plan=mst_hf.plan:main"]},
)
