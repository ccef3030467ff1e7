"""Public routes of the gateway."""

from fastapi import APIRouter

router = APIRouter()
