"""The gateway: the platform's one public door, in front of every service."""
