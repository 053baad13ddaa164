"""Helpers for the demo's end-to-end tests: one embedded-model engine per test module, served on a free
loopback port (nothing reaches the network: Gradio's analytics are off)."""
import contextlib
import os
import socket

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(engine, concurrency: int = 4):
    """Launch the demo page for ``engine`` on 127.0.0.1; yields its URL; closes the server afterwards."""
    from vlprune.eval.demo import build_app, launch

    app = build_app(engine, concurrency=concurrency)
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close(verbose=False)
