"""Everything about requests: the step-level batcher and the Ray Serve deployments (see shared DESIGN.md).

Empty until the batcher and serving issues land; `model/` never imports from here.
"""
