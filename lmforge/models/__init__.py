"""Model files (one per family) and the MODULE_MAP registry."""
