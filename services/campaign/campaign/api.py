"""HTTP routes of the campaign service."""

from fastapi import APIRouter

router = APIRouter()
