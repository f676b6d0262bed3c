"""Deployment files (Serve configs, the KubeRay manifest, the dashboard) and the tool that checks them."""
