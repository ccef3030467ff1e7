"""`python -m auth`: serve the API, the consumers and the outbox relay."""

from auth.app import create_app
from auth.config import Settings
from herald.serve import serve


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
