"""Render every page of the built book in headless Chromium, as a reader's browser would, and fail
on a broken image or a console error; save a full-page screenshot of each page for review.

    python scripts/browser_check.py [--html _build/html] [--out _build/screenshots]

Needs Chromium (Debian: ``apt-get install chromium``). It speaks the DevTools protocol over a
pipe (``--remote-debugging-pipe``), so nothing beyond the standard library is needed. Prints one
line per page (images, console errors, screenshot) and exits 1 when any page has a problem.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"genindex.html", "search.html"}
BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"


class Browser:
    """Headless Chromium driven over the DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, binary: str, width: int = 1280):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def wire():  # in the child: the pipes become fds 3 and 4, kept open across exec
            for fd, target in ((cmd_r, 3), (out_w, 4)):
                if fd != target:
                    os.dup2(fd, target)
                os.set_inheritable(target, True)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--window-size={width},1000", "--hide-scrollbars", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []
        self.width = width
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, timeout: float) -> dict | None:
        import select

        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._out_r], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            reply = self._read(deadline - time.time())
            if reply is None:
                break
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(f"{method}: no reply in {timeout} s")

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == method for e in self.events):
                return
            event = self._read(deadline - time.time())
            if event is not None:
                self.events.append(event)
        raise TimeoutError(f"no {method} in {timeout} s")

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            event = self._read(max(0.0, deadline - time.time()))
            if event is not None:
                self.events.append(event)

    def visit(self, url: str, shot: Path) -> tuple[list[str], list[str]]:
        """(broken images, console errors) of the page at ``url``; a full-page screenshot to ``shot``."""
        self.events = []
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=1000,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        self.drain(1.0)  # late scripts and image decoding
        broken = self.call("Runtime.evaluate", session=True, expression=BROKEN_IMAGES,
                           returnByValue=True)["result"].get("value", [])
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append(d.get("exception", {}).get("description", d.get("text", "exception")).splitlines()[0])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"{p['entry'].get('text', '')} {p['entry'].get('url', '')}".strip())
        height = self.call("Runtime.evaluate", session=True, expression="document.documentElement.scrollHeight",
                           returnByValue=True)["result"].get("value", 1000)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
                  height=int(min(max(height, 600), 16000)), deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        shot.write_bytes(base64.b64decode(data))
        return broken, errors

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        self.proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args(argv)
    if not shutil.which(args.chromium) and not Path(args.chromium).exists():
        print(f"no Chromium at {args.chromium!r}: install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    pages = sorted(p for p in args.html.rglob("*.html") if p.name not in SKIP and "_static" not in p.parts)
    if not pages:
        print(f"no pages under {args.html}: build the book first (jupyter-book build book/)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    browser, bad = Browser(args.chromium), 0
    try:
        for page in pages:
            rel = page.relative_to(args.html)
            shot = args.out / (str(rel.with_suffix("")).replace(os.sep, "__") + ".png")
            broken, errors = browser.visit(page.resolve().as_uri(), shot)
            ok = not broken and not errors
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {rel}  broken images: {len(broken)}  console errors: {len(errors)}  "
                  f"-> {shot.relative_to(args.out.parent) if shot.is_relative_to(args.out.parent) else shot}")
            for item in broken:
                print(f"       broken image: {item}")
            for item in errors:
                print(f"       console: {item}")
    finally:
        browser.close()
    print(f"{len(pages)} pages, {bad} with problems; screenshots in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
