"""Build a2r-kernels. The CUDA extension (csrc/, via CMake) is added by issue 6's build step."""

from setuptools import find_packages, setup

setup(
    name="a2r-kernels",
    version="0.1.0",
    description="Tree-shared KV cache + tree decode attention and masked denoising kernels for "
                "A2R parallel reasoning",
    python_requires=">=3.10",
    packages=find_packages(include=["a2r_kernels", "a2r_kernels.*"]) + ["a2r"],
    package_dir={"a2r": "python/a2r"},
    # A range that any recent torch satisfies: an existing torch is never replaced.
    install_requires=["torch>=2.4", "numpy", "transformers>=4.56"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "hypothesis", "triton>=3.2", "matplotlib"],
    },
    entry_points={"console_scripts": ["a2r = a2r.cli:main"]},
)
