"""gemma3-mlx: run Google's Gemma 3 models on your own machine, with MLX.

    from gemma3_mlx import load, generate, stream_generate
    model, tokenizer = load(gemma3_mlx.resolve(None))      # the default Gemma 3 270M
    print(generate(model, tokenizer, "The capital of France is", max_tokens=16))
"""

from ._blas import preload_blas
from ._signals import sigint_to_main_thread

with sigint_to_main_thread():  # worker threads started here leave Ctrl-C to the main thread
    preload_blas()  # must run before mlx.core is imported: see _blas.py
    import mlx.core as _mx
    import numpy  # noqa: F401  (its bundled OpenBLAS starts threads too)

    _mx.eval(_mx.ones((2, 2)) @ _mx.ones((2, 2)))  # MLX starts its CPU worker thread now
    from ._streams import any_thread as _any_thread

    with _any_thread():  # and the generation stream's worker thread
        _mx.eval(_mx.ones((2, 2)) @ _mx.ones((2, 2)))

from .chat import ChatSession  # noqa: E402
from .config import ModelConfig, TextConfig  # noqa: E402
from .constrain import Constraint, ConstraintError  # noqa: E402
from .errors import ConfigError, ConversionError, Gemma3Error, ModelFileError  # noqa: E402
from .engine import STOP_IDS, Engine, Event, Stats  # noqa: E402
from .generate import (  # noqa: E402
    Completion, GenerationResponse, batch_generate, generate, generate_tokens, stream_batch, stream_generate,
)
from .loader import load, load_model, load_tokenizer  # noqa: E402
from . import forward  # noqa: E402  (a forward pass with images, pipeline stages, the head where needed)
from .model import Model  # noqa: E402
from .models import cache_dir, ensure_default_model, resolve  # noqa: E402
from .image import ImageError, load_image, preprocess_image  # noqa: E402
from .prompt import prompt_ids  # noqa: E402
from .prompt_cache import PromptCache, PromptCacheError  # noqa: E402
from .sample import Sampler  # noqa: E402
from .settings import Sampling, make_sampler  # noqa: E402
from .tools import ToolError, ToolUse  # noqa: E402
from .tokenizer import StreamingDetokenizer, Tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Completion", "Constraint", "ConstraintError", "Sampling", "ToolError", "ToolUse", "Engine", "Event", "STOP_IDS", "Sampler", "Stats", "batch_generate", "stream_batch",
    "ChatSession", "ConfigError", "ConversionError", "Gemma3Error", "GenerationResponse", "Model", "ModelConfig",
    "ImageError", "load_image", "preprocess_image", "ModelFileError", "PromptCache", "PromptCacheError", "StreamingDetokenizer", "TextConfig", "Tokenizer", "cache_dir",
    "ensure_default_model", "forward", "generate", "generate_tokens", "load", "load_model", "load_tokenizer",
    "make_sampler", "prompt_ids", "resolve", "stream_generate",
]
