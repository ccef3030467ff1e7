"""`python -m campaign`: serve the API, the consumers and the outbox relay."""

from campaign.app import create_app
from campaign.config import Settings
from herald.serve import serve


def main() -> None:
    settings = Settings()
    serve(create_app, settings, port=settings.port)


if __name__ == "__main__":
    main()
