"""calibrant: post-training compression of language models with calibration data as a measured input."""

__version__ = "0.1.0"

from calibrant.errors import CalibrantError  # noqa: E402

__all__ = ["CalibrantError", "__version__"]


_LAZY = {  # public name -> (module, attribute); imported on first use so `import calibrant` stays cheap
    "compress_model": ("calibrant.api", "compress_model"),
    "evaluate_perplexity": ("calibrant.api", "evaluate_perplexity"),
    "compress": ("calibrant.engine", "compress"),
    "perplexity": ("calibrant.evaluate", "perplexity"),
    "make_method": ("calibrant.methods", "make_method"),
    "load_model": ("calibrant.models", "load_model"),
    "CalibrationSet": ("calibrant.calibration", "CalibrationSet"),
    "make_calibration": ("calibrant.calibration", "make_calibration"),
}


def __getattr__(name: str):
    if name not in _LAZY:  # includes submodules not imported yet: the import system then loads them
        raise AttributeError(f"module 'calibrant' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
