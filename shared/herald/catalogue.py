"""The README's service map and event catalogue, generated from the code so they cannot drift.

`python -m herald.catalogue` rewrites the marked sections of README.md; a test fails when they
differ from what the code says.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from herald import events
from herald.settings import SERVICE_PORTS

# Who publishes each contract module's events (the module is named after its producer)...
_PRODUCERS = {"requests": "auth, other systems"}
# ...except where another service publishes an event type too.
_ALSO_PRODUCED_BY = {"email.bounced": "dispatcher"}


def _consumed_topics(service: str) -> list[str]:
    module = importlib.import_module(f"{service}.handlers")
    handlers = getattr(module, "HANDLERS", {})
    extra = getattr(module, "ALSO_CONSUMES", ())
    return sorted({cls.TOPIC for cls in handlers} | set(extra))


def _public_paths(service: str) -> list[str]:
    routes: dict[str, str] = importlib.import_module("gateway.routes").ROUTES
    return sorted(prefix for prefix, owner in routes.items() if owner == service)


def service_map() -> str:
    """A Markdown table: each service, its port, schema, public paths and consumed topics."""
    lines = [
        "| service | port | owns schema | public paths (via the gateway) | consumes |",
        "|---|---|---|---|---|",
    ]
    for service, port in SERVICE_PORTS.items():
        if service == "gateway":
            lines.append(f"| gateway | {port} | none | everything below | none |")
            continue
        paths = ", ".join(f"`{p}`" for p in _public_paths(service)) or "internal only"
        consumed = ", ".join(f"`{t}`" for t in _consumed_topics(service)) or "none"
        lines.append(f"| {service} | {port} | `{service}` | {paths} | {consumed} |")
    return "\n".join(lines)


def event_catalogue() -> str:
    """A Markdown table of every event type: topic, producer, version and meaning."""
    lines = [
        "| event type | topic | produced by | version | what it says |",
        "|---|---|---|---|---|",
    ]
    for name, cls in sorted(events.EVENT_TYPES.items(), key=lambda i: (i[1].TOPIC, i[0])):
        if name.startswith("test."):
            continue
        module = cls.__module__.rsplit(".", 1)[-1]
        producers = ", ".join(
            filter(None, [_PRODUCERS.get(module, module), _ALSO_PRODUCED_BY.get(name)])
        )
        doc = " ".join((cls.__doc__ or "").split()) or "—"
        lines.append(f"| `{name}` | `{cls.TOPIC}` | {producers} | {cls.VERSION} | {doc} |")
    return "\n".join(lines)


SECTIONS = {"service-map": service_map, "event-catalogue": event_catalogue}


def render(readme: str) -> str:
    """`readme` with every generated section replaced by what the code says now."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", flags=re.DOTALL)
        if not pattern.search(readme):
            raise ValueError(f"README has no {name} section markers")
        text = make()

        def replace(match: re.Match[str], text: str = text) -> str:
            return match.group(1) + text + "\n" + match.group(2)

        readme = pattern.sub(replace, readme)
    return readme


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
