"""Telling machines from people: privacy proxies that fetch pixels, scanners that follow links.

Machine activity is recorded and flagged with the rule that caught it, never discarded; reports
show human and total figures side by side. The rules (the README repeats them):

- any HEAD request (a person's mail client or browser fetches with GET): `head_request`;
- no User-Agent at all: `no_user_agent`;
- an image proxy's agent (`GoogleImageProxy`, `YahooMailProxy`): `image_proxy`;
- a scanner's or fetcher's agent (security gateways, link-preview bots, HTTP libraries,
  headless browsers; `SCANNER_AGENTS`): `scanner_agent`;
- opens only: Apple Mail Privacy Protection, whose proxies send the bare agent `Mozilla/5.0` or
  come from Apple's networks (`TRACKING_MPP_NETWORKS`, 17.0.0.0/8 by default): `apple_mpp`;
- clicks only: a click within `TRACKING_SCANNER_CLICK_SECONDS` of the relay accepting the message
  (`soon_after_delivery`), or `TRACKING_BURST_LINKS` different links of one message clicked
  within `TRACKING_BURST_SECONDS` of each other (`link_burst`: scanners follow every link at once).
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime

# Lower-case substrings of agents that fetch on nobody's behalf.
SCANNER_AGENTS = (
    "bot",
    "crawler",
    "spider",
    "headlesschrome",
    "phantomjs",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "curl/",
    "wget",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww-perl",
    "barracuda",
    "mimecast",
    "proofpoint",
    "symantec",
    "trend micro",
    "trendmicro",
    "zscaler",
    "forcepoint",
    "fortinet",
    "sophos",
    "ironport",
    "messagelabs",
    "linkscanner",
    "safelinks",
    "urlscan",
    "bingpreview",
    "skypeuripreview",
    "facebookexternalhit",
    "whatsapp",
    "ms-office",
    "microsoft office",
)
IMAGE_PROXY_AGENTS = ("googleimageproxy", "yahoomailproxy")
# What Apple's Mail Privacy Protection proxies send as their whole agent.
MPP_AGENT = "Mozilla/5.0"
_SCANNERS = re.compile("|".join(re.escape(s) for s in SCANNER_AGENTS), re.IGNORECASE)
_IMAGE_PROXIES = re.compile("|".join(re.escape(s) for s in IMAGE_PROXY_AGENTS), re.IGNORECASE)


def parse_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`17.0.0.0/8, 2620:149::/32` into networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(part.strip()) for part in spec.split(",") if part.strip())


class Classifier:
    """The agent and address rules for one open or click (timing rules live elsewhere)."""

    def __init__(
        self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    ) -> None:
        self._networks = tuple(networks)
        # Agents and addresses repeat (a few thousand agents make nearly all traffic):
        # remember recent answers, a bounded number of them.
        self._known: dict[str, bool] = {}
        self._agents: dict[tuple[str | None, str], str | None] = {}

    def _agent_reason(self, user_agent: str | None, method: str) -> str | None:
        key = (user_agent, method)
        if key in self._agents:
            return self._agents[key]
        reason = self._judge_agent(user_agent, method)
        if len(self._agents) >= 50_000:
            self._agents.clear()
        self._agents[key] = reason
        return reason

    @staticmethod
    def _judge_agent(user_agent: str | None, method: str) -> str | None:
        if method == "HEAD":
            return "head_request"
        if not user_agent or not user_agent.strip():
            return "no_user_agent"
        if _IMAGE_PROXIES.search(user_agent):
            return "image_proxy"
        if _SCANNERS.search(user_agent):
            return "scanner_agent"
        return None

    def open_reason(
        self, user_agent: str | None, ip: str | None, method: str = "GET"
    ) -> str | None:
        """Why this open is a machine's, or None for a person's."""
        reason = self._agent_reason(user_agent, method)
        if reason is not None:
            return reason
        if user_agent is not None and user_agent.strip() == MPP_AGENT:
            return "apple_mpp"
        if ip and self._networks and self._in_networks(ip):
            return "apple_mpp"
        return None

    def click_reason(self, user_agent: str | None, method: str = "GET") -> str | None:
        """Why this click is a machine's by its agent alone, or None."""
        return self._agent_reason(user_agent, method)

    def _in_networks(self, ip: str) -> bool:
        known = self._known.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        inside = any(address in network for network in self._networks)
        if len(self._known) >= 100_000:
            self._known.clear()
        self._known[ip] = inside
        return inside


def soon_after_delivery(at: datetime, sent_at: datetime | None, seconds: float) -> bool:
    """Whether a click came too soon after the relay accepted the message for a person."""
    return sent_at is not None and (at - sent_at).total_seconds() < seconds


class BurstDetector:
    """Remembers each message's recent clicks, to tell when several links were hit at once.

    A click is judged once `seconds` have passed after it (the flush worker holds clicks that
    long), so the clicks just after it are known too. Memory is per process: a burst spread over
    several replicas goes unnoticed. At most `max_messages` messages are remembered.
    """

    def __init__(self, *, links: int, seconds: float, max_messages: int = 200_000) -> None:
        self.links = links
        self.seconds = seconds
        self._max = max_messages
        self._recent: OrderedDict[str, list[tuple[float, int]]] = OrderedDict()

    def record(self, message_id: str, at: float, link_index: int) -> None:
        """Remember a click of `link_index` at `at` (Unix seconds)."""
        entries = self._recent.get(message_id)
        if entries is None:
            entries = self._recent[message_id] = []
        else:
            self._recent.move_to_end(message_id)
            horizon = at - 2 * self.seconds
            entries[:] = [e for e in entries if e[0] >= horizon]
        entries.append((at, link_index))
        if len(self._recent) > self._max:
            self._recent.popitem(last=False)

    def is_burst(self, message_id: str, at: float) -> bool:
        """Whether enough different links of the message were clicked within `seconds` of `at`."""
        entries = self._recent.get(message_id, ())
        links = {link for t, link in entries if abs(t - at) <= self.seconds}
        return len(links) >= self.links

    def forget_before(self, at: float) -> None:
        """Drop messages whose last click is older than `at`."""
        while self._recent:
            message_id, entries = next(iter(self._recent.items()))
            if entries and entries[-1][0] >= at:
                break
            del self._recent[message_id]

    def __len__(self) -> int:
        return len(self._recent)
