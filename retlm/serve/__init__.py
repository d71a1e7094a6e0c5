"""`retlm serve`: an OpenAI-compatible HTTP endpoint that retrieves while it generates, and a web page
to see what it read.

- :mod:`retlm.serve.backends`: the model and database behind the small :class:`Backend` protocol
  (:class:`CCABackend` for RETRO / RETRO-fit, :class:`CausalLMBackend` for any causal LM, with
  In-Context RALM retrieval or none);
- :mod:`retlm.serve.queue`: the worker thread that owns the model, the bounded request queue, batching;
- :mod:`retlm.serve.app`: the FastAPI app (:func:`create_app`), its checks and errors;
- :mod:`retlm.serve.page`: the web page, static files served by the same app.

Needs the ``serve`` extra: ``pip install 'retlm[serve]'`` (FastAPI and uvicorn).
"""

from retlm.serve.app import ServeSettings, create_app
from retlm.serve.backends import Backend, CausalLMBackend, CCABackend, Prompt, RetrievalStep, Sampling

__all__ = [
    "Backend",
    "CCABackend",
    "CausalLMBackend",
    "Prompt",
    "RetrievalStep",
    "Sampling",
    "ServeSettings",
    "create_app",
]
