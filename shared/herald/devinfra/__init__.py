"""Embedded development infrastructure: PostgreSQL, a Kafka-protocol broker and an SMTP sink.

Used by `make run` and the tests; production points the services at real servers instead.
"""
