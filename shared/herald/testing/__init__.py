"""Test fixtures shared by every test suite: embedded infrastructure and the whole platform."""
