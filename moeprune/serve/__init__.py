"""``moeprune serve``: an OpenAI-compatible task-adaptive server (FastAPI + uvicorn).

``app`` builds the app over a ``TaskAdaptiveModel``; ``scheduler`` groups and batches requests on
one worker thread; ``batch`` is padded batch generation; ``protocol`` the request bodies and errors;
``metrics`` the Prometheus metrics.
"""

from moeprune.serve.app import ServerThread, create_app

__all__ = ["ServerThread", "create_app"]
