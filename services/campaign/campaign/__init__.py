"""The campaign service.

Emails: drafts, content, audience, status; send requests from other systems.
"""
