"""The error hierarchy. Library code raises these; only cli.py turns them into messages.

Every message is one line that names the file, tensor or field at fault.
"""


class EpicodeError(Exception):
    """Base class of every error epicode-edge raises on purpose."""


class InputError(EpicodeError):
    """A path, file or value given by the user is missing, unreadable or malformed."""


class CheckpointError(InputError):
    """A checkpoint (HF folder or GGUF file) cannot be read or is corrupt."""


class MismatchError(EpicodeError):
    """Two models that must agree (architecture, tensors, tokenizer, vocabulary) do not."""


class UnsupportedError(EpicodeError):
    """An architecture, dtype, quant type or option that is not supported."""


class NumericError(EpicodeError):
    """The extrapolation produced NaN or Inf."""


class BundleError(EpicodeError):
    """A bundle folder is missing, incomplete, or its manifest is invalid."""


class ParameterError(EpicodeError, ValueError):
    """A decoding or conversion parameter is out of range."""


class BackendError(EpicodeError):
    """An engine (llama.cpp, MLX) failed to load a model or to run it."""


class ContextFullError(EpicodeError):
    """The prompt (or prompt plus generation) does not fit the context window."""


class ConstraintError(InputError, ValueError):
    """A structured-output constraint (JSON schema, regex, grammar) is invalid or uses what is unsupported."""
class MissingExtraError(EpicodeError):
    """A feature needs an optional dependency that is not installed (pyproject.toml's extras)."""


# what each optional import is installed by: module -> (extra, what it is for)
EXTRAS = {"mlx": ("mlx", "MLX"), "mlx_lm": ("mlx", "MLX"), "matplotlib": ("charts", "charts")}


def require(module: str, purpose: str) -> None:
    """MissingExtraError naming the extra that installs `module` when it cannot be imported; purpose says
    what the user asked for ("--to mlx", "the eval chart")."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        extra, what = EXTRAS.get(module.split(".")[0], (None, module))
        how = f"pip install 'epicode-edge[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingExtraError(f"{purpose} needs {what} ({module} is not installed: {how}; {e})") from None


def one_line(e: BaseException) -> str:
    """An error as the one line users see: its message with whitespace folded (the class name if empty)."""
    return " ".join(str(e).split()) or type(e).__name__
