"""The quick start in `docs/quickstart.md`, run word for word against the running platform.

Every ```bash block of the page, in order, becomes one script under `set -euo pipefail`; the
page's own variables (`HERALD`, `SINK`, `ME`) are pointed at the test platform and a new
address, which is all the page leaves open. (```sh blocks are alternatives, such as HTTPS,
that the page shows but does not run in sequence.)
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from pathlib import Path

from herald.devinfra.stack import Stack

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
# What the last step only shows, the test insists on.
CHECKS = 'test "$STATUS" = sent\n'


def quickstart_script() -> str:
    blocks = BLOCK.findall(QUICKSTART.read_text())
    return "set -euo pipefail\n" + "\n".join(blocks) + CHECKS


def test_every_curl_of_the_quick_start_is_in_the_script():
    text = QUICKSTART.read_text()
    script = quickstart_script()
    shown = {line.strip() for line in text.splitlines() if "curl " in line}
    run = {line.strip() for line in script.splitlines() if "curl " in line}
    only_shown = {line for line in shown - run if not line.startswith("export CURL_CA_BUNDLE")}
    assert not only_shown, f"curl lines outside ```bash blocks: {only_shown}"
    assert len(run) >= 10
    for step in ("/signup", "/login", "/lists", "/contacts", "/compose", "/send", "/tracking"):
        assert step in script, step


async def test_the_quick_start_works_word_for_word(platform: Stack):
    assert shutil.which("jq"), "Debian's jq is required (make test installs it)"
    assert shutil.which("curl"), "curl is required"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env |= {
        "HERALD": platform.url("gateway"),
        "SINK": platform.sink_url,
        "ME": f"qs{uuid.uuid4().hex[:12]}@example.com",
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        quickstart_script(),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 300)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    transcript = output.decode(errors="replace")
    (platform.logs_dir / "quickstart.txt").write_text(transcript)
    assert process.returncode == 0, transcript[-6000:]
    assert "status: sent" in transcript
