"""Package data of vlprune: the embedded model's checkpoint (``embedded/``), installed as ``vlprune.assets``."""
