"""PromptSeg: universal medical image segmentation by visual prompts."""

from setuptools import find_packages, setup

TRITON = "triton>=3.4; platform_system == 'Linux'"
PLOT = "matplotlib>=3.7"

setup(
    name="promptseg",
    version="0.1.0",
    description="Universal medical image segmentation by visual prompts: a few annotated examples "
    "in, masks out",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["promptseg", "promptseg.*"]),
    package_data={"promptseg": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "nibabel>=5.0",
        "pillow>=10.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "scipy>=1.10",
    ],
    extras_require={
        # triton (Linux only): the fused attention kernels on CUDA, and their tests on the CPU
        # interpreter;
        # 3.4 introduced triton.knobs, read by promptseg.kernels. A CPU-only install never imports
        # it.
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.1",
            TRITON,
            PLOT,
        ],
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "gpu": [
            "tensorrt>=10.0,<12",
            TRITON,
        ],  # export/tensorrt_build.py handles 10 (precision flags) and 11 (strong typing)
        "dicom": [
            "pydicom>=3.0",
            "highdicom>=0.23",
        ],  # DICOM series in (data/dicom.py), DICOM-SEG out
        "ray": ["ray>=2.9"],  # promptseg batch --engine ray (engine/batch_ray.py)
        "plot": [PLOT],  # promptseg eval --plot and promptseg.eval.plot's charts
    },
    entry_points={"console_scripts": ["promptseg=promptseg.cli:main"]},
)
