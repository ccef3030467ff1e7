"""Event handlers of the dispatcher service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
