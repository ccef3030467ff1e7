"""`python -m gateway`: serve the public API."""

from gateway.app import create_app
from gateway.config import Settings
from herald.serve import serve


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
