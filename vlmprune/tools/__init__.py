"""Commands apart from the core: ``bench`` and the calibration and training commands of methods
(``python -m vlmprune.tools.<name>``)."""
