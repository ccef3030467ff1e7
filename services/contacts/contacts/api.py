"""HTTP routes of the contacts service."""

from fastapi import APIRouter

router = APIRouter()
