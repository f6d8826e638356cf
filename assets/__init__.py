"""Bundled assets: sample images, the embedded model files (installed as vlmprune.assets)."""
