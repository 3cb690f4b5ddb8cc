"""calibrant: post-training compression of language models with calibration data as a measured input."""

__version__ = "0.1.0"

from calibrant.errors import CalibrantError  # noqa: E402

__all__ = ["CalibrantError", "__version__"]


def __getattr__(name: str):  # lazy: `import calibrant` stays cheap for the CLI's --help
    from calibrant import api, calibration, engine, evaluate, methods, models

    table = {
        "compress_model": api.compress_model,
        "evaluate_perplexity": api.evaluate_perplexity,
        "compress": engine.compress,
        "perplexity": evaluate.perplexity,
        "make_method": methods.make_method,
        "load_model": models.load_model,
        "CalibrationSet": calibration.CalibrationSet,
        "make_calibration": calibration.make_calibration,
    }
    if name in table:
        return table[name]
    raise AttributeError(f"module 'calibrant' has no attribute {name!r}")
