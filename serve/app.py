"""Entry point of `serve run serve/config.yaml` (from the repository root): the package's app builder."""

from carlos_ray.serving.app import build_app

__all__ = ["build_app"]
