"""The real thing: `chainlit run app_own.py` on 127.0.0.1 with a tiny checkpoint, driven by
headless Chromium (end to end) and by concurrent socket.io clients (load: eight sessions
through a batch of four rows, and clients that leave in the middle of a reply)."""

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from ui_chat_core import GenerationSettings, load_own_checkpoint, prepare_prompt, reply_text

APP_DIR = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
STARTUP_TIMEOUT_S = 300  # importing torch and Chainlit takes a minute on a busy 2-core machine
MAX_BATCH = 4  # the server's batch: of eight sessions at once, four wait for a free row
REPLY_TIMEOUT_S = 120
PROMPT = "Every effort moves you"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalize(text: str) -> str:
    """Text as a reader sees it: runs of whitespace (no-break spaces included) are one space."""
    return re.sub(r"\s+", " ", text).strip()


def expected_reply(chat, prompt: str, settings: GenerationSettings) -> str:
    prompt_ids, _ = prepare_prompt(prompt, chat.tokenizer, chat.context_length, settings.max_new_tokens)
    return reply_text(chat, prompt_ids, settings)


@pytest.fixture(scope="module")
def chat(tiny_checkpoint):
    return load_own_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`chainlit run app_own.py` as a user starts it (no --host: the default must be loopback)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("chainlit") / "server.log"
    env = {**os.environ, "CH05_CHECKPOINT": str(tiny_checkpoint), "CH05_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "CHAINLIT_APP_ROOT": str(APP_DIR), "CH05_MAX_BATCH": str(MAX_BATCH)}
    env.pop("CHAINLIT_HOST", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "chainlit", "run", "app_own.py", "--headless",
                                    "--port", str(port)], cwd=APP_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"chainlit exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"chainlit did not answer on {url} within {STARTUP_TIMEOUT_S} s:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield SimpleNamespace(url=url, process=process, log=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_listens_on_loopback_only(server):
    listening = [c for c in psutil.Process(server.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_chat_in_a_real_browser(server, chat, tmp_path):
    """Open the page in headless Chromium, change settings, send a prompt, watch the reply stream in."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"No Chromium at {CHROMIUM}: the browser test cannot run. Install Debian's chromium "
                    "(scripts/setup_test_system.sh does, as root) to run it.")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is missing: pip install -r requirements-extra.txt")
    settings = GenerationSettings(seed=7, max_new_tokens=32)  # the page's defaults, with a fixed seed
    expected = normalize(expected_reply(chat, PROMPT, settings))
    assert expected  # the tiny model says something

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            # Nothing may leave the machine: the page's web fonts and KaTeX CSS are refused.
            outside = []

            def local_only(route):
                if route.request.url.startswith(server.url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            tokens_received = []
            page.on("websocket", lambda ws: ws.on(
                "framereceived", lambda frame: tokens_received.append(frame) if "stream_token" in str(frame) else None))

            page.goto(server.url)
            page.get_by_text("Chatting with").wait_for(timeout=REPLY_TIMEOUT_S * 1000)

            # A value out of range is refused with a message and changes nothing...
            page.click("#chat-settings-open-modal")
            page.fill("#top_k", "-5")
            page.click("#confirm")
            page.get_by_text("Settings not changed").wait_for(timeout=REPLY_TIMEOUT_S * 1000)
            assert "top_k must be between 0 and 50257, got -5" in page.inner_text("body")
            # ... a valid one is applied.
            page.click("#chat-settings-open-modal")
            assert page.input_value("#top_k") == "50"  # the panel was reset to the values in effect
            page.fill("#seed", "7")
            page.click("#confirm")
            page.get_by_text("seed 7.").wait_for(timeout=REPLY_TIMEOUT_S * 1000)

            page.fill("#chat-input", PROMPT)
            page.keyboard.press("Enter")
            reply = page.locator('[data-step-type="assistant_message"]').last
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while normalize(reply.inner_text()) != expected and time.monotonic() < deadline:
                time.sleep(0.2)
            shown = normalize(reply.inner_text())
            page.screenshot(path=str(tmp_path / "chat.png"))
            if os.environ.get("CH05_UI_SCREENSHOT"):  # used to make the README's screenshot
                shutil.copyfile(tmp_path / "chat.png", os.environ["CH05_UI_SCREENSHOT"])
        finally:
            browser.close()

    assert shown == expected
    assert len(tokens_received) >= 10  # the reply reached the browser token by token
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'chat.png'}; blocked outside requests: {outside}")


async def chat_session(url: str, prompt: str, settings: GenerationSettings, leave_early: bool = False) -> dict:
    """One browser tab's worth of socket.io traffic: connect, set the settings, send a prompt.

    Returns the streamed pieces and the final message of the reply. With `leave_early`
    the client disconnects as soon as the reply starts streaming, like a closed tab.
    """
    import socketio

    client = socketio.AsyncClient(reconnection=False)
    got = {"pieces": [], "messages": [], "stream_id": None, "final": None}
    welcomed, applied, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @client.on("new_message")
    async def on_new_message(step):
        got["messages"].append(step["output"])
        if step["output"].startswith("Chatting with"):
            welcomed.set()
        elif step["output"].startswith("Settings applied"):
            applied.set()
        elif step["id"] == got["stream_id"]:
            got["final"] = step["output"]
            finished.set()

    @client.on("stream_start")
    async def on_stream_start(step):
        got["stream_id"] = step["id"]
        got["pieces"].append(step["output"])
        if leave_early:
            finished.set()

    @client.on("stream_token")
    async def on_stream_token(data):
        got["pieces"].append(data["token"])

    await client.connect(url, socketio_path="/ws/socket.io", transports=["websocket"],
                         auth={"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": None,
                               "userEnv": "{}", "chatProfile": None})
    try:
        await client.emit("connection_successful")
        await asyncio.wait_for(welcomed.wait(), REPLY_TIMEOUT_S)
        await client.emit("chat_settings_change", {
            "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens, "seed": settings.seed})
        await asyncio.wait_for(applied.wait(), REPLY_TIMEOUT_S)
        await client.emit("client_message", {"message": {
            "id": str(uuid.uuid4()), "threadId": "", "name": "User", "type": "user_message", "output": prompt,
            "createdAt": "2026-01-01T00:00:00Z"}, "fileReferences": None})
        await asyncio.wait_for(finished.wait(), REPLY_TIMEOUT_S)
    finally:
        await client.disconnect()
    return got


def test_eight_concurrent_sessions_get_complete_replies_in_bounded_memory(server, chat, unescape):
    pytest.importorskip("socketio", reason="python-socketio (a Chainlit dependency) is missing")
    n = 8
    prompts = [f"Session {i} writes:" for i in range(n)]
    settings = [GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32, seed=100 + i)
                for i in range(n)]
    expected = [expected_reply(chat, p, s) for p, s in zip(prompts, settings, strict=True)]
    assert len(set(expected)) == n  # every session has its own reply to get right

    async def all_sessions():
        return await asyncio.gather(*[chat_session(server.url, p, s)
                                      for p, s in zip(prompts, settings, strict=True)])

    server_process = psutil.Process(server.process.pid)
    rss = [server_process.memory_info().rss]
    for _ in range(2):  # the second round must not need more memory than the first
        results = asyncio.run(all_sessions())  # eight sessions, a batch of four: half of them queue
        rss.append(server_process.memory_info().rss)
        for got, want in zip(results, expected, strict=True):
            assert len(got["pieces"]) > 10  # streamed token by token
            assert unescape("".join(got["pieces"])) == want
            assert unescape(got["final"]) == want
    mib = [r / 2**20 for r in rss]
    print(f"server RSS: before {mib[0]:.0f} MiB, after round 1 {mib[1]:.0f} MiB, after round 2 {mib[2]:.0f} MiB")
    assert mib[2] - mib[1] < 40
    assert mib[2] - mib[0] < 400


def test_clients_that_leave_mid_reply_do_not_disturb_the_others(server, chat, unescape):
    """Three of six sessions close their tab as soon as their reply starts; the batcher
    drops them at its next step, and the other three (and a session after them) still
    get exactly their replies."""
    pytest.importorskip("socketio", reason="python-socketio (a Chainlit dependency) is missing")
    settings = [GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32, seed=200 + i)
                for i in range(6)]
    prompts = [f"Tab {i} says:" for i in range(6)]

    async def sessions():
        return await asyncio.gather(*[chat_session(server.url, p, s, leave_early=i % 2 == 1)
                                      for i, (p, s) in enumerate(zip(prompts, settings, strict=True))])

    results = asyncio.run(sessions())
    for i, got in enumerate(results):
        if i % 2 == 0:
            assert unescape(got["final"]) == expected_reply(chat, prompts[i], settings[i])
    later = asyncio.run(chat_session(server.url, PROMPT, settings[0]))
    assert unescape(later["final"]) == expected_reply(chat, PROMPT, settings[0])
    assert server.process.poll() is None  # still serving
