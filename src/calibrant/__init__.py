"""calibrant: post-training compression of language models with calibration data as a measured input."""

__version__ = "0.1.0"

import sys  # noqa: E402

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


# The structured model types (calibrant_llama, …; calibrant.models.structured) are registered with
# transformers' Auto classes once transformers has loaded them, not here: importing transformers and
# torch would make `import calibrant` take seconds. A finder waits for the module that defines
# AutoModelForCausalLM and registers the types right after it executes (or now, if it already has).
_AUTO_MODELS = "transformers.models.auto.modeling_auto"


def _register_structured_types() -> None:
    from calibrant.models.structured import register_structured_families

    register_structured_families()


class _RegisterAfterAutoModels:
    """A meta-path finder that never finds a module itself: for ``_AUTO_MODELS`` it returns the normal spec
    with the loader's ``exec_module`` wrapped to register the structured types afterwards, then retires."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != _AUTO_MODELS:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: object) -> None:
            exec_module(module)
            try:
                _register_structured_types()
            except Exception:  # noqa: BLE001 - never break transformers' own import
                # e.g. `from transformers import LlamaConfig` loads the Auto classes while LlamaConfig's own
                # module is half-initialised: try again as later imports happen, once that one has finished
                sys.meta_path.insert(0, _RetryRegistration())

        loader.exec_module = exec_then_register
        return spec


class _RetryRegistration:
    """A meta-path finder that finds nothing: at each import it retries the registration until it succeeds."""

    busy = False

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if self.busy:
            return None
        self.busy = True
        try:
            _register_structured_types()
        except Exception:  # noqa: BLE001 - still half-initialised: the next import tries again
            return None
        finally:
            self.busy = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        return None


if _AUTO_MODELS in sys.modules:
    _register_structured_types()
elif not any(isinstance(f, _RegisterAfterAutoModels) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterAutoModels())
