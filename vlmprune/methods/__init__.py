"""Built-in methods; importing this package registers them."""

from . import divprune, fastv, fixed, prumerge_plus, random_prune, uniform, visionzip  # noqa: F401
