"""Herald's shared library: what every service imports, and nothing service-specific."""
