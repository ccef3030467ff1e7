"""Event handlers of the scheduler service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
