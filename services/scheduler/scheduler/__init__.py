"""The scheduler service.

Durable timers and the fan-out of an email to per-recipient delivery jobs.
"""
