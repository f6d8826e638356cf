"""Built-in methods; importing this package registers them."""

from . import divprune, fastv, fixed, flowcut, fopru, hiprune, holov, prumerge_plus, random_prune, todre, uniform, vflowopt, visionzip, zeroth_order  # noqa: F401
