"""HTTP routes of the scheduler service: none beyond health, readiness and metrics.

The scheduler is driven by events (`email.scheduled`) and its own timers; nothing calls it.
"""

from fastapi import APIRouter

router = APIRouter()
