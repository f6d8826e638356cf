"""``python -m vlmprune.demo``: the Gradio demo (see :mod:`vlmprune.demo.app`)."""

from .app import main

main()
