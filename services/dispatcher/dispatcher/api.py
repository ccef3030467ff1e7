"""HTTP routes of the dispatcher service."""

from fastapi import APIRouter

router = APIRouter()
