"""`python -m dispatcher`: serve the API, the consumers and the outbox relay."""

from dispatcher.app import create_app
from dispatcher.config import Settings
from herald.serve import serve


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
