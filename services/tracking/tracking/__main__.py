"""`python -m tracking`: serve the API, the consumers and the outbox relay."""

from herald.serve import serve
from tracking.app import create_app
from tracking.config import Settings


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
