from setuptools import find_packages, setup

# The Triton kernels (HSA attention, block-sparse linear) need triton; CUDA builds of torch bring it, CPU builds do
# not. On a CPU machine it is only needed to run those kernels' tests in Triton's interpreter (about 1 GB installed).
TRITON = "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"
# examples/run_clm_mst.py and examples/quickstart.ipynb: data loading, the token-accuracy metric, the schedule plot,
# `--report_to tensorboard`.
EXAMPLE = ["datasets>=3.0", "evaluate>=0.4", "matplotlib>=3.7", "tensorboard>=2.14", "psutil"]
PEFT = ["peft>=0.17"]
TEST = ["pytest>=8", "nbclient", "nbformat", "ipykernel", *EXAMPLE, *PEFT]

setup(
    name="mst_hf",
    version="0.1.0",
    description="Mixed Sparsity Training (MST) for HuggingFace Transformers: dynamic sparse training, a three-phase "
    "sparsity schedule and hybrid sparse attention, as a Trainer subclass and a registered attention.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mst_hf", "mst_hf.*"]),
    package_data={"mst_hf": ["data/*", "data/*/*", "metrics/*", "metrics/*/*", "kernels/*.json", "attention/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    # What `import mst_hf` imports; everything else is imported where it is used and comes with an extra.
    install_requires=[
        "torch>=2.6",  # torch.library.triton_op (the block-sparse kernels)
        "transformers>=5.17,<6",
        "accelerate>=1.10",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy",
    ],
    extras_require={
        "example": EXAMPLE,
        "peft": PEFT,
        "triton": [TRITON],
        "test": TEST,
        "dev": [*TEST, TRITON, "ruff"],
    },
    entry_points={"console_scripts": ["mst-plan=mst_hf.plan:main"]},
)
