"""Event handlers of the tracking service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
