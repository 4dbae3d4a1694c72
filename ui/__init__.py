"""The Gradio front end. No torch here: it drives `pipelines` through plain data."""

from .layout import CSS, AppSpec, build_app

__all__ = ["CSS", "AppSpec", "build_app"]
