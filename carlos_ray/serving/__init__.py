"""The HTTP service: the Ray Serve ingress and its deployments, and the search page (:mod:`carlos_ray.serving.web`)."""
