"""Soft Teacher: end-to-end semi-supervised object detection on PyTorch and torchvision."""

__version__ = "0.1.0"

__all__ = ["Detector", "Detections", "__version__"]


def __getattr__(name: str):
    """``softteacher.Detector`` and ``Detections``, imported on first use: the command line
    starts without them."""
    if name in ("Detector", "Detections"):
        from softteacher import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'softteacher' has no attribute {name!r}")
