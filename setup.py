from setuptools import setup

setup(
    name="pipebd",
    version="0.1.0",
    description="Fast blockwise distillation in PyTorch: Pipe-BD teacher relaying and hybrid parallelism, codistillation",
    python_requires=">=3.10",
    packages=["pipebd", "pipebd.runtime", "pipebd.kernels", "pipebd.models"],
    package_dir={"pipebd.kernels": "kernels", "pipebd.models": "models"},
    install_requires=["torch>=2.4", "numpy", "pyyaml>=6", "tqdm", "cloudpickle>=2",
                      "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        # The suite also runs bench/codistill.py --smoke, which loads digits and draws its plot.
        "dev": ["pytest>=7", "pytest-timeout>=2", "scikit-learn", "matplotlib"],
        "plot": ["matplotlib"],
        "data": ["scikit-learn"],   # bench/codistill.py's digits task (bundled with scikit-learn)
    },
    entry_points={"console_scripts": ["pipebd=pipebd.cli:main"]},
)
