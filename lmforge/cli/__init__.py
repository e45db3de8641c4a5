"""Console entry points: `lmforge chat | generate | check_env | serve`."""
