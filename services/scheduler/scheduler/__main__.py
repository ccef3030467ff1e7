"""`python -m scheduler`: serve the API, the consumers and the outbox relay."""

from herald.serve import serve
from scheduler.app import create_app
from scheduler.config import Settings


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
