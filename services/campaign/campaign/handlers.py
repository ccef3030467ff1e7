"""Event handlers of the campaign service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
