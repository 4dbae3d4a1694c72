"""The Gradio front end. No torch here: it drives `pipelines` through plain data."""

from .layout import CSS, AppSpec, ModelView, build_app

__all__ = ["CSS", "AppSpec", "ModelView", "build_app"]
