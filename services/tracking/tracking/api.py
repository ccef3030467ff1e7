"""HTTP routes of the tracking service."""

from fastapi import APIRouter

router = APIRouter()
