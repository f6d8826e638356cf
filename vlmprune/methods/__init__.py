"""Built-in methods; importing this package registers them."""

from . import adatoken3d, atp, covipal, dart, divprune, dtop, fastv, feather, fixed, flowcut, fopru, hiprune, holov, hpc_colpali, optiprune, prumerge_plus, random, recoverable_compression, sparsevlm, todre, tome, tomesd, top_vim, transprune, uniform, vflowopt, visionzip, vla_pruner, zoo_prune  # noqa: F401
