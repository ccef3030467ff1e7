"""Event handlers of the contacts service, named when_<event>_<action>."""

from herald.consumer import Handlers

HANDLERS: Handlers = {}
