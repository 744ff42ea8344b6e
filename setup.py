from setuptools import find_packages, setup

# Versions are the ones qdet was tested with (Python 3.11, CPU). torch/torchvision and
# Detectron2 are installed by scripts/setup_env.sh (Detectron2 is not on PyPI under its name).
install_requires = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy>=1.24,<2",  # Detectron2 0.7 / pycocotools builds in use need numpy 1.x
    "fvcore>=0.1.5.post20221221",
    "iopath>=0.1.9",
    "pycocotools>=2.0.7",
    "yacs>=0.1.8",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "termcolor>=1.1",
    "tabulate>=0.9",
    "cloudpickle>=2.0",
    "tqdm>4.29",
    "matplotlib>=3.7",
    "Pillow>=9.0",
    "tensorboard>=2.14",
    "timm>=0.9",
    "scikit-learn>=1.3",  # the embedded dataset pastes sklearn's UCI digits
    # tools/predict.py's image I/O; tested 4.11.0.86 (4.12 needs numpy 2)
    "opencv-python-headless>=4.8,<4.12",
    "setuptools<81",  # Detectron2's model_zoo imports pkg_resources
]

setup(
    name="qdet",
    version="0.1.0",
    description="Low-bit quantization-aware training with feature distillation for Detectron2",
    packages=find_packages(include=["qdet", "qdet.*"]),
    # The torch-free runner of whole-detector files: one module, onnxruntime + numpy +
    # opencv only (a deployment copies it beside the .onnx file).
    py_modules=["qdet_runner"],
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        # tested: pytest 9.2.0, ruff 0.17.6, import-linter 2.17 (the package layers,
        # pyproject.toml's [tool.importlinter], checked by `make test`)
        "dev": ["pytest>=8.0", "ruff>=0.6", "import-linter>=2.1"],
        # tools/export_onnx.py, qdet.export; tested: onnx 1.23.2, onnxruntime 1.32.0,
        # safetensors 0.8.0 (ml_dtypes 0.5.4: 0.6 needs numpy 2)
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "safetensors>=0.4", "ml_dtypes<0.6"],
        # peers in tools/benchmark_quantizer.py and benchmark_train.py (optional there);
        # tested: brevitas 0.13.4
        "bench": ["brevitas>=0.13"],
    },
)
