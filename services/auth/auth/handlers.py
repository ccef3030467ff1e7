"""Event handlers of the auth service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
