"""Render a page in headless Chromium from a test: the DOM after its scripts ran, and optionally a screenshot.

How `render` drives Chromium (checked with Debian's Chromium 156 on bookworm):

- One process run: ``chromium --headless --no-sandbox --disable-gpu ... --virtual-time-budget=MS --dump-dom URL``.
  ``--dump-dom`` and ``--screenshot=PATH --window-size=W,H`` work together in the same run, so a screenshot
  costs no second launch. Without ``--virtual-time-budget`` the DOM is dumped right after the load event.
- ``--virtual-time-budget`` runs the page's clock up to MS milliseconds of *virtual* time. Timers
  (setTimeout/setInterval) fire in virtual time, and virtual time pauses while network requests are
  in flight, so real ``fetch`` calls to a local server complete: a page polling every 1 s shows about
  MS/1000 completed polls, and a 4 s budget takes about 1.3 s of wall time. No other flag was needed.
- ``--user-data-dir`` is a fresh temporary folder each run (removed afterwards), so no state leaks between runs.
- ``--enable-logging=stderr --v=0`` (added when ``console`` is passed) makes Chromium print the page's console
  messages, including uncaught exceptions, as ``INFO:CONSOLE`` lines on stderr; those are collected.
- Chromium runs in its own process group (session); the whole group is killed on timeout and after every run,
  so no renderer or zygote child outlives a test.
- Debian's ``/usr/bin/chromium`` wrapper prints ``[: ...: unexpected operator`` on stderr when ``/dev/shm`` is
  listed twice by findmnt; it is harmless. D-Bus errors on stderr are harmless too.

`parse_dom` turns the dumped HTML into a small element tree, enough for assertions by id and attribute.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
)
CONSOLE_LINE = re.compile(r":CONSOLE[^\]]*\]\s*(.*)$")


class BrowserError(RuntimeError):
    """Chromium failed, timed out, or produced no DOM."""


def find_chromium() -> str | None:
    """The Chromium to use: $DOWNPOUR_CHROMIUM if set, else chromium, chromium-browser or google-chrome on PATH."""
    env = os.environ.get("DOWNPOUR_CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def render(
    url: str,
    *,
    screenshot: str | None = None,
    window: tuple[int, int] = (1280, 1000),
    budget_ms: int = 4000,
    timeout_s: float = 60,
    console: list[str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> str:
    """Load `url` in headless Chromium, let it run `budget_ms` of virtual time, and return the DOM as HTML.

    `screenshot`: also save a PNG of the `window`-sized viewport there (same run).
    `console`: a list to which the page's console messages (errors, "Uncaught ..." exceptions) are appended.
    `extra_args`: more Chromium flags (e.g. "--force-device-scale-factor=2").
    Raises BrowserError with the tail of Chromium's stderr when it fails or exceeds `timeout_s`.
    """
    binary = find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found: apt-get install chromium, or set DOWNPOUR_CHROMIUM")
    profile = tempfile.mkdtemp(prefix="downpour-chromium-")
    args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={int(budget_ms)}", "--dump-dom"]
    if screenshot:
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        args += [f"--screenshot={os.path.abspath(screenshot)}", f"--window-size={int(window[0])},{int(window[1])}"]
    if console is not None:
        args += ["--enable-logging=stderr", "--v=0"]
    args += [*extra_args, url]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise BrowserError(f"chromium did not finish {url} within {timeout_s}s; stderr tail:\n{_tail(err)}") from None
    finally:
        _kill_group(proc)  # helpers left in the group (there should be none)
        shutil.rmtree(profile, ignore_errors=True)
    dom = out.decode("utf-8", "replace")
    if proc.returncode != 0 or "<html" not in dom.lower():
        raise BrowserError(f"chromium exited with {proc.returncode} rendering {url}; stderr tail:\n{_tail(err)}")
    if screenshot and not os.path.isfile(screenshot):
        raise BrowserError(f"chromium wrote no screenshot to {screenshot}; stderr tail:\n{_tail(err)}")
    if console is not None:
        for line in err.decode("utf-8", "replace").splitlines():
            m = CONSOLE_LINE.search(line)
            if m:
                console.append(m.group(1))
    return dom


def _tail(err: bytes, lines: int = 25) -> str:
    noise = ("dbus", "unexpected operator")
    kept = [line for line in err.decode("utf-8", "replace").splitlines() if not any(n in line for n in noise)]
    return "\n".join(kept[-lines:]) or "(empty)"


# ---- a small DOM tree for assertions ----

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All text below this element, whitespace collapsed."""
        parts: list[str] = []

        def walk(e: Element) -> None:
            for c in e.children:
                if isinstance(c, str):
                    parts.append(c)
                else:
                    walk(c)

        walk(self)
        return " ".join(" ".join(parts).split())

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str | bool) -> list[Element]:
        """Descendants (and self) with this tag and attributes; attribute names use _ for - (data_node=...);
        a value of True only asks that the attribute exists."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            e
            for e in self.iter()
            if (tag is None or e.tag == tag) and all((k in e.attrs) if v is True else e.attrs.get(k) == v for k, v in want.items())
        ]

    def by_id(self, element_id: str) -> Element | None:
        found = self.find_all(id=element_id)
        return found[0] if found else None


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        e = Element(tag, {k: (v if v is not None else "") for k, v in attrs})
        self.stack[-1].children.append(e)
        if tag not in VOID:
            self.stack.append(e)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: (v if v is not None else "") for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse_dom(html: str) -> Element:
    """Parse dumped HTML into an Element tree (the root is a '#document' element)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root
