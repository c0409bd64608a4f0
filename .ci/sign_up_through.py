"""Start `tenantry run` (the command given), sign up through its HTTP interface, follow
the onboarding to `completed`, stop the process with SIGTERM; exit 1 on any failure.
Standard library only: it runs in the fresh environment the wheel was installed into."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any


def request(url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def main(command: str) -> int:
    env = {**os.environ, "TENANTRY_PORT": "0", "TENANTRY_LOG_LEVEL": "info"}
    proc = subprocess.Popen(
        [command, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    try:
        port = None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "started":
                port = int(event["port"])
                break
        if port is None:
            print(f"tenantry run ended before it started (exit {proc.wait()})", file=sys.stderr)
            return 1
        base = f"http://127.0.0.1:{port}"
        page = urllib.request.urlopen(base + "/", timeout=10).read()
        assert b"<form" in page, "the sign-up page is missing"
        icon = urllib.request.urlopen(base + "/favicon.svg", timeout=10).read()
        assert b"<svg" in icon, "the page's icon is missing"
        contract = request(base + "/openapi.json")
        assert contract["openapi"].startswith("3.1"), "the OpenAPI document is missing"
        docs = urllib.request.urlopen(base + "/docs", timeout=10).read()
        assert b"swagger-ui" in docs, "the document's viewer is missing"
        for asset in ("docs/swagger-ui-bundle.js", "docs/swagger-ui.css", "docs/docs.js"):
            body = urllib.request.urlopen(f"{base}/{asset}", timeout=10).read()
            assert body, f"{asset} is missing"
        sign_up = {"email": "wheel@example.com", "tenant_name": "Wheel Works", "plan": "free"}
        accepted = request(base + "/v1/onboardings", sign_up)
        auth = {"Authorization": f"Bearer {accepted['token']}"}
        deadline = time.monotonic() + 60
        while True:
            status = request(base + accepted["status_url"], headers=auth)
            if status["state"] in ("completed", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"onboarding {accepted['id']}: {status['state']}")
        if status["state"] != "completed":
            print(json.dumps(status), file=sys.stderr)
            return 1
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        print(f"tenantry run exited {code}")
        return 0 if code == 0 else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
