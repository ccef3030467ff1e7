"""HTTP routes of the scheduler service."""

from fastapi import APIRouter

router = APIRouter()
