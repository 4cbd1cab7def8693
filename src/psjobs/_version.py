"""psjobs' version, in the bottom layer: the host, the backends and a remote worker read it without
importing the public package (which would pull in every layer)."""

__version__ = "0.1.0"
