"""The ``segfactory`` command line: the top layer (nothing imports it)."""
