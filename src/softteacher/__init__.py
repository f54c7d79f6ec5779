"""Soft Teacher: end-to-end semi-supervised object detection on PyTorch and torchvision."""

__version__ = "0.1.0"
