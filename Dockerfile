# syntax=docker/dockerfile:1
# One image for all seven services and the migration step. The command names the module:
#   docker run herald:latest auth              -> python -m auth
#   docker run herald:latest herald.migrations -> python -m herald.migrations
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
# Editable on purpose: `herald.migrations` finds each service's SQL in services/<svc>/migrations,
# beside the package's source. A regular install copies only the packages into site-packages,
# and the migration step would then find no service migrations and apply none, without error.
RUN pip install --no-deps -e . \
 && python -c "import sys; from pathlib import Path; from herald.migrations import migrations_for; \
missing = [f'{p.parent.parent.name}/{p.name}' for p in Path('services').glob('*/migrations/*.sql') \
if p.stem not in {f'{m.version:04d}_{m.name}' for m in migrations_for(p.parent.parent.name)}]; \
sys.exit(f'service migrations not found by herald.migrations: {missing}' if missing else 0)" \
 && python -m compileall -q shared services

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin herald
USER herald

EXPOSE 8000 8001 8002 8003 8004 8005 8006
ENTRYPOINT ["python", "-m"]
CMD ["gateway"]
