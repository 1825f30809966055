"""docbot benchmark against the real services and the fake Bot API.

1. Webhook browse flow: `wrk` (bench/wrk/docbot_browse.lua) POSTs Telegram updates with the
   secret header to /docbot/webhook, CONCURRENCY connections, cycling USERS users through
   "My documents" -> the type's button -> a document's button (a fresh update_id each, so
   dedupe never short-circuits). Served as in production: the webhook by the ASGI server
   (granian ASGI, `config.asgi:application`), the backend REST API the bot calls by the WSGI
   server (granian WSGI, `config.wsgi:application`), WEB_WORKERS workers each, dialog
   state/dedupe in Redis. The view answers once the reply reached the fake Bot API, so wrk's
   latency is update-to-reply. Prints updates/s, p50/p99, server CPU ms per update (both
   servers' process trees, from /proc; the bot runs inside the ASGI workers), lost replies;
   baselines in the same run: a bare Django view (`bench.bare_django:wsgi` /bare) on the WSGI
   server and a bare ASGI endpoint doing the same secret check and one sendMessage. Then the
   alternative layout, the webhook on the WSGI server too, for the record.
2. 1 MiB uploads: documents created through the API, ingested by a real Celery worker
   (RabbitMQ) that fetches from the fake Bot API, hashes and stores; docs/s until the last
   "Stored" reply; baseline: the same download+hash+write done in one process.
3. Memory: WSGI server RSS growth while a 20 MiB document streams out of
   /docbot/files/<token>.

Sizes: BENCH_DOCBOT_USERS (1000), BENCH_DOCBOT_CONCURRENCY (16), BENCH_DOCBOT_SECONDS (15),
BENCH_DOCBOT_UPLOADS (60), BENCH_DOCBOT_BIG_MIB (20), WEB_WORKERS (2).
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quintet_docbot")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/5")
os.environ.setdefault("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/h_docbot")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Share links are signed here and checked by the server: one key for both.
BENCH_SECRET_KEY = "bench-docbot-secret-key-not-for-production-0123456789"
os.environ.setdefault("DJANGO_SECRET_KEY", BENCH_SECRET_KEY)
os.environ.setdefault(
    "MEDIA_ROOT", str(Path(__file__).resolve().parent.parent / "var" / "bench-docbot-media")
)

USERS = int(os.environ.get("BENCH_DOCBOT_USERS", "1000"))
CONCURRENCY = int(os.environ.get("BENCH_DOCBOT_CONCURRENCY", "16"))
UPLOADS = int(os.environ.get("BENCH_DOCBOT_UPLOADS", "60"))
BIG_MIB = int(os.environ.get("BENCH_DOCBOT_BIG_MIB", "20"))
WEB_WORKERS = int(os.environ.get("WEB_WORKERS", "2"))
BROWSE_SECONDS = float(os.environ.get("BENCH_DOCBOT_SECONDS", "15"))
BASE_SECONDS = 8.0
ALT_SECONDS = 6.0
WRK_THREADS = 2
DOCS_PER_USER = 10
FIRST_TG_ID = 50_000_000
SECRET = "bench-webhook-secret"
ROOT = Path(__file__).resolve().parent.parent
MEDIA = Path(os.environ["MEDIA_ROOT"])
WORKER_CONCURRENCY = int(os.environ.get("BENCH_DOCBOT_WORKER_CONCURRENCY", "4"))


# --- the baseline: a bare ASGI app with the same secret check and one reply ----------------

_bare_client: Any = None


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _bare_client
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    presented = headers.get(b"x-telegram-bot-api-secret-token", b"")
    if not hmac.compare_digest(presented, os.environ["TELEGRAM_WEBHOOK_SECRET"].encode()):
        await send({"type": "http.response.start", "status": 403, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    import httpx

    if _bare_client is None:
        _bare_client = httpx.AsyncClient()
    update = json.loads(body)
    source = update.get("message") or update.get("callback_query") or {}
    chat_id = (source.get("chat") or source.get("from") or {}).get("id")
    url = f"{os.environ['TELEGRAM_API_BASE_URL']}{os.environ['TELEGRAM_BOT_TOKEN']}/sendMessage"
    await _bare_client.post(url, json={"chat_id": chat_id, "text": "ok"})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


# --- helpers ------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def seed(fake: Any) -> tuple[dict[int, tuple[int, int]], str]:
    """USERS Telegram users with one type and DOCS_PER_USER stored documents each."""
    from django.contrib.auth.models import User

    from docbot import services
    from docbot.models import Document, DocumentType, TelegramAccount

    last = FIRST_TG_ID + USERS + 10
    User.objects.filter(
        telegram_account__telegram_user_id__gte=FIRST_TG_ID,
        telegram_account__telegram_user_id__lt=last,
    ).delete()
    sample = fake.add_file(b"%PDF bench" * 10, name="bench.pdf")
    users = User.objects.bulk_create(
        [User(username=f"tg{FIRST_TG_ID + i}") for i in range(USERS + 1)]
    )
    TelegramAccount.objects.bulk_create(
        [TelegramAccount(user=u, telegram_user_id=FIRST_TG_ID + i) for i, u in enumerate(users)]
    )
    types = DocumentType.objects.bulk_create(
        [DocumentType(user=u, name="Tickets") for u in users[:USERS]]
    )
    Document.objects.bulk_create(
        [
            Document(
                user=t.user,
                type=t,
                name=f"Ticket {k}",
                telegram_file_id=sample.file_id,
                status=Document.Status.STORED,
                size=100,
                sha256=f"{i:032d}{k:032d}",
                storage_name="",
            )
            for i, t in enumerate(types)
            for k in range(DOCS_PER_USER)
        ],
        batch_size=2000,
    )
    plan = {}
    for i, t in enumerate(types):
        newest = Document.objects.filter(type=t).order_by("-created_at", "-id").first()
        assert newest is not None
        plan[FIRST_TG_ID + i] = (t.pk, newest.pk)
    return plan, services.service_token_issue()


def server_env(fake: Any, token: str, port: int) -> dict[str, str]:
    return {
        "DOCBOT_BACKEND_URL": f"http://127.0.0.1:{port}",
        "DOCBOT_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "TELEGRAM_BOT_TOKEN": fake.token,
        "TELEGRAM_API_BASE_URL": fake.base_url,
        "TELEGRAM_FILE_BASE_URL": fake.base_file_url,
        "TELEGRAM_WEBHOOK_SECRET": SECRET,
        "DOCBOT_MODE": "webhook",
        # Under ASGI every request runs in a fresh thread: without the pool each one would
        # open its own PostgreSQL connection.
        "DATABASE_POOL": os.environ.get("DATABASE_POOL", "true"),
        "DOCBOT_SERVICE_TOKEN": token,
        # The fake Bot API is not Telegram: the limiter stays in the path, above the load.
        "DOCBOT_RATE_LIMIT_PER_SECOND": "5000",
        "DOCBOT_FLOOD_MAX_PER_SECOND": "20",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": os.environ["DJANGO_SECRET_KEY"],
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "LOG_LEVEL": "WARNING",
        "MEDIA_ROOT": str(MEDIA),
    }


# --- phase 1: webhook browse flow ---------------------------------------------------------


def plan_file(plan: dict[int, tuple[int, int]]) -> Path:
    """The users wrk cycles through, one "telegram_user_id type_id document_id" line each."""
    path = ROOT / "var" / f"bench-docbot-plan-{os.getpid()}.txt"
    path.write_text("".join(f"{user} {t} {d}\n" for user, (t, d) in plan.items()))
    return path


def browse_wrk(
    fake: Any, port: int, plan: Path, server_pids: list[int], seconds: float = BROWSE_SECONDS
) -> dict[str, Any]:
    """wrk POSTs browse updates (bench/wrk/docbot_browse.lua) to the webhook on `port`; the
    view answers once the update is handled (replies sent to the fake Bot API), so wrk's
    latency is update-to-reply. Returns wrk's figures, the Bot API stand-in's CPU per update
    (this process, otherwise idle) and the correctness counts: replies recorded against
    updates answered 200, wrong replies (failure / stale / slow down) and callbacks answered
    more than once."""
    from bench.harness import wrk
    from docbot import texts

    fake.clear()
    own_before = time.process_time()  # this process only: the fake's thread, wrk is a child
    result = wrk(
        f"http://127.0.0.1:{port}/docbot/webhook",
        server_pids=server_pids,
        seconds=seconds,
        connections=CONCURRENCY,
        threads=WRK_THREADS,
        script="docbot_browse.lua",
        script_env={
            "DOCBOT_PLAN": str(plan),
            "DOCBOT_SECRET": SECRET,
            "DOCBOT_UPDATE_BASE": str(time.time_ns() // 1000),
            "DOCBOT_WRK_THREADS": str(WRK_THREADS),
        },
    )
    fake_cpu = time.process_time() - own_before
    time.sleep(1)  # updates still in flight when wrk stopped finish their replies
    replies = wrong = 0
    answered: dict[str, int] = {}
    for call in fake.sent():
        if call.method in {"sendMessage", "editMessageText", "sendDocument"}:
            replies += 1
            wrong += call.text in {texts.FAILED, texts.STALE_BUTTON, texts.SLOW_DOWN}
        elif call.method == "answerCallbackQuery":
            query_id = str(call.params.get("callback_query_id"))
            answered[query_id] = answered.get(query_id, 0) + 1
            wrong += call.params.get("text") in {texts.FAILED, texts.STALE_BUTTON, texts.SLOW_DOWN}
    ok = result.requests - result.non_2xx
    return {
        "wrk": result,
        "updates": ok,
        "lost": max(0, ok - replies),
        "wrong_replies": wrong,
        "answered_twice": sum(1 for n in answered.values() if n > 1),
        "fake_cpu_ms_per_update": fake_cpu * 1000 / ok if ok else math.nan,
    }


def bare_wrk(port: int, pids: list[int], path: str, plan: Path) -> Any:
    from bench.harness import wrk

    if path == "/bare":
        return wrk(f"http://127.0.0.1:{port}/bare", server_pids=pids, seconds=BASE_SECONDS)
    return wrk(
        f"http://127.0.0.1:{port}{path}",
        server_pids=pids,
        seconds=BASE_SECONDS,
        connections=CONCURRENCY,
        threads=WRK_THREADS,
        script="docbot_browse.lua",
        script_env={
            "DOCBOT_PLAN": str(plan),
            "DOCBOT_SECRET": SECRET,
            "DOCBOT_UPDATE_BASE": str(time.time_ns() // 1000),
            "DOCBOT_WRK_THREADS": str(WRK_THREADS),
        },
    )


def warm(port: int, fake: Any, user: int) -> None:
    """One update per worker process, so each starts its bot (getMe) before the clock runs."""
    import httpx

    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
    with httpx.Client(timeout=30) as client:
        for _ in range(4 * WEB_WORKERS):
            update = fake.text_update(user, "/help")
            update["update_id"] = time.time_ns() // 1000
            client.post(f"http://127.0.0.1:{port}/docbot/webhook", json=update, headers=headers)


# --- phase 2: 1 MiB uploads through the real worker ---------------------------------------


async def upload_load(fake: Any, port: int, token: str) -> dict[str, Any]:
    import httpx

    from docbot import texts

    user_id = FIRST_TG_ID + USERS
    headers = {"Authorization": f"Token {token}", "X-Telegram-User-Id": str(user_id)}
    files = [fake.add_file(os.urandom(1024 * 1024), name=f"up{i}.bin") for i in range(UPLOADS)]
    base = f"http://127.0.0.1:{port}/api/docbot/"
    fake.clear()
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        created = await client.post("types/", json={"name": f"Uploads {time.time_ns()}"})
        created.raise_for_status()
        type_id = created.json()["id"]
        started = time.monotonic()
        semaphore = asyncio.Semaphore(8)

        async def create(i: int) -> None:
            async with semaphore:
                # As the bot does: record the file as received from this user, then make the
                # document from that record (the chat is the user's own, chosen by the server).
                received = await client.post(
                    "received-files/",
                    json={
                        "file_id": files[i].file_id,
                        "file_unique_id": files[i].file_unique_id,
                        "size": len(files[i].content),
                    },
                )
                assert received.status_code == 201, received.text
                body = {"type_id": type_id, "name": f"Upload {i}", "file": received.json()["id"]}
                response = await client.post("documents/", json=body)
                assert response.status_code == 202, response.text

        await asyncio.gather(*(create(i) for i in range(UPLOADS)))
    stored_prefix = texts.STORED.split("\u201c")[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = [c for c in fake.sent("sendMessage", user_id) if c.text.startswith(stored_prefix)]
        if len(done) >= UPLOADS:
            break
        await asyncio.sleep(0.05)
    elapsed = max(c.at for c in done) - started if done else float("nan")
    return {"stored": len(done), "seconds": elapsed, "rate": len(done) / elapsed}


def upload_baseline(fake: Any) -> float:
    """The same fetch + sha256 + write to disk, one process, no API/queue/database."""
    import httpx

    files = [fake.add_file(os.urandom(1024 * 1024), name=f"base{i}.bin") for i in range(UPLOADS)]
    target = MEDIA / "baseline"
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        for stored in files:
            digest = hashlib.sha256()
            with (
                client.stream("GET", f"{fake.base_file_url}{fake.token}/{stored.path}") as r,
                (target / stored.file_id).open("wb") as sink,
            ):
                for chunk in r.iter_bytes(64 * 1024):
                    digest.update(chunk)
                    sink.write(chunk)
    return UPLOADS / (time.monotonic() - started)


# --- phase 3: memory while streaming a big download ---------------------------------------


def download_memory(port: int, server_pid: int) -> dict[str, Any]:
    import httpx
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from bench.harness import rss_kib
    from docbot import services
    from docbot.models import Document, DocumentType, TelegramAccount

    account = TelegramAccount.objects.get(telegram_user_id=FIRST_TG_ID + USERS)
    content = os.urandom(BIG_MIB * 1024 * 1024)
    digest = hashlib.sha256(content).hexdigest()
    storage_name = default_storage.save(f"docbot/bench/{digest[:16]}.bin", ContentFile(content))
    doc_type = DocumentType.objects.create(user=account.user, name=f"Big {time.time_ns()}")
    document = Document.objects.create(
        user=account.user,
        type=doc_type,
        name="Big file",
        status=Document.Status.STORED,
        size=len(content),
        sha256=digest,
        storage_name=storage_name,
        file_name="big.bin",
    )
    link = services.share_link_create(user=account.user, document_id=document.pk)
    pids = [p for p in children_of(server_pid) if Path(f"/proc/{p}/status").exists()]
    pids = pids or [server_pid]
    with httpx.Client(timeout=60) as client:  # warm both workers' code paths first
        for _ in range(2 * len(pids)):
            client.get(f"http://127.0.0.1:{port}/health")
    before = {pid: rss_kib(pid) for pid in pids}
    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in pids:
                with contextlib.suppress(OSError):
                    peak[pid] = max(peak[pid], rss_kib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received = hashlib.sha256()
    with (
        httpx.Client(timeout=60) as client,
        client.stream("GET", f"http://127.0.0.1:{port}/docbot/files/{link.token}") as response,
    ):
        response.raise_for_status()
        for chunk in response.iter_bytes(64 * 1024):
            received.update(chunk)
            time.sleep(0.0005)  # a slow-ish reader, so buffering would show up
    stop.set()
    sampler.join()
    default_storage.delete(storage_name)
    growth_mib = max(peak[pid] - before[pid] for pid in pids) / 1024
    return {"growth_mib": growth_mib, "intact": received.hexdigest() == digest}


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, check=True
    )
    import django

    django.setup()
    from bench.harness import (
        Report,
        celery_worker_args,
        free_port,
        process,
        wait_for_port,
        web_server_args,
    )
    from tests.docbot.fake_telegram import FakeTelegram

    shutil.rmtree(MEDIA, ignore_errors=True)
    MEDIA.mkdir(parents=True)
    report = Report("docbot")
    fake = FakeTelegram().start()
    plan_path: Path | None = None
    try:
        print(f"seeding {USERS} users x {DOCS_PER_USER} documents ...", flush=True)
        plan, token = seed(fake)
        plan_path = plan_file(plan)
        wsgi_port, asgi_port = free_port(), free_port()
        env = server_env(fake, token, wsgi_port)

        # Baselines on the same servers, same run: a bare Django view (WSGI) and a bare ASGI
        # endpoint doing the webhook's secret check and one sendMessage.
        bare_port = free_port()
        with process(web_server_args(bare_port, app="bench.bare_django:wsgi"), env=env) as bare:
            wait_for_port(bare_port)
            bare_django = bare_wrk(bare_port, [bare.pid], "/bare", plan_path)
        print(bare_django.line("baseline: bare Django view (WSGI) /bare"), flush=True)
        bare_port = free_port()
        bare_args = web_server_args(bare_port, interface="asgi", app="bench.docbot:bare_app")
        with process(bare_args, env=env) as bare:
            wait_for_port(bare_port)
            bare_asgi = bare_wrk(bare_port, [bare.pid], "/docbot/webhook", plan_path)
        print(bare_asgi.line("baseline: bare ASGI secret check + sendMessage"), flush=True)

        asgi_args = web_server_args(asgi_port, interface="asgi", app="config.asgi:application")
        with (
            process(web_server_args(wsgi_port), env=env) as wsgi,
            process(asgi_args, env=env) as asgi,
        ):
            wait_for_port(wsgi_port)
            wait_for_port(asgi_port)
            pids = [wsgi.pid, asgi.pid]
            user = next(iter(plan))
            warm(asgi_port, fake, user)
            flow = browse_wrk(fake, asgi_port, plan_path, pids)
            result = flow["wrk"]
            print(result.line("webhook on ASGI, backend API on WSGI"), flush=True)
            report.compare(
                "browse_updates_per_s",
                result.rate,
                bare_django.rate,
                "upd/s",
                f"webhook browse flow ({USERS} users, {CONCURRENCY} conn.) / bare Django",
            )
            report.compare(
                "browse_vs_bare_asgi",
                result.rate,
                bare_asgi.rate,
                "upd/s",
                "webhook browse flow / bare ASGI webhook endpoint",
            )
            report.compare(
                "browse_p99_ms", result.p99_ms, bare_asgi.p99_ms, "ms", "update-to-reply p99"
            )
            report.figure(
                "browse_p50_ms", result.p50_ms, f"  update-to-reply p50 {result.p50_ms:.1f} ms"
            )
            report.compare(
                "browse_server_cpu_ms_per_update",
                result.server_cpu_ms_per_request,
                bare_django.server_cpu_ms_per_request,
                "ms",
                "server CPU per update (ASGI+WSGI) / bare Django",
            )
            report.figure(
                "browse_fake_bot_api_cpu_ms_per_update",
                flow["fake_cpu_ms_per_update"],
                f"  Bot API stand-in CPU {flow['fake_cpu_ms_per_update']:.2f} ms/update "
                "(not counted above)",
            )
            report.figure(
                "browse_lost", flow["lost"], f"  lost replies {flow['lost']} of {flow['updates']}"
            )
            report.figure("browse_non_2xx", result.non_2xx)
            # wrk's socket errors on loopback are its 2 s timeouts: latency, not lost updates
            # (every update answered 200 is matched to its reply below).
            report.figure("browse_wrk_socket_errors", result.socket_errors)
            report.target("browse_rate", result.rate >= 200, ">= 200 updates/s")
            report.target("browse_p99", result.p99_ms <= 300, "p99 update-to-reply <= 300 ms")
            report.check(
                flow["lost"] == 0
                and result.non_2xx == 0
                and flow["wrong_replies"] == 0
                and flow["answered_twice"] == 0,
                f"{flow['lost']} lost, {result.non_2xx} non-2xx, {flow['wrong_replies']} wrong "
                f"replies, {flow['answered_twice']} callbacks answered twice",
            )

            # The alternative the proxy could take: the async webhook view on the WSGI server
            # (an event loop per request, the backend calls back into the same server).
            warm(wsgi_port, fake, user)
            alt = browse_wrk(fake, wsgi_port, plan_path, pids, seconds=ALT_SECONDS)["wrk"]
            print(alt.line("alternative: webhook on WSGI too"), flush=True)
            report.compare(
                "browse_on_wsgi_updates_per_s",
                alt.rate,
                result.rate,
                "upd/s",
                "webhook on WSGI / webhook on ASGI",
            )
            report.figure(
                "browse_on_wsgi",
                {
                    "p99_ms": alt.p99_ms,
                    "cpu_ms_per_update": alt.server_cpu_ms_per_request,
                    "errors": alt.non_2xx + alt.socket_errors,
                },
            )

            node = f"docbot-bench-{os.getpid()}@{socket.gethostname()}"
            celery = str(ROOT / ".venv" / "bin" / "celery")
            worker_args = celery_worker_args(concurrency=WORKER_CONCURRENCY, extra=("-n", node))
            with process(worker_args, env=env):
                ping = [celery, "-A", "config", "inspect", "ping", "-d", node, "-t", "2"]
                for _ in range(20):  # timed only once the worker answers
                    if subprocess.run(ping, cwd=ROOT, capture_output=True).returncode == 0:
                        break
                uploads = asyncio.run(upload_load(fake, wsgi_port, token))
            baseline_rate = upload_baseline(fake)
            report.compare(
                "upload_docs_per_s",
                uploads["rate"],
                baseline_rate,
                "docs/s",
                f"1 MiB uploads via API+Celery ({UPLOADS} docs)",
            )
            report.target("upload_rate", uploads["rate"] >= 15, ">= 15 docs/s (1 MiB)")
            report.check(uploads["stored"] == UPLOADS, f"{uploads['stored']}/{UPLOADS} stored")

            # Share links are served by the WSGI server (the proxy sends only the webhook to
            # ASGI): the download must stream there.
            memory = download_memory(wsgi_port, wsgi.pid)
            report.compare(
                "download_rss_growth_mib",
                memory["growth_mib"],
                BIG_MIB,
                "MiB",
                f"server RSS growth streaming {BIG_MIB} MiB (vs size)",
            )
            report.target("download_memory", memory["growth_mib"] <= 64, "growth <= 64 MiB")
            report.check(memory["intact"], "downloaded file hash differs")
        report.figure(
            "sizes",
            {
                "users": USERS,
                "connections": CONCURRENCY,
                "browse_seconds": BROWSE_SECONDS,
                "uploads": UPLOADS,
                "big_mib": BIG_MIB,
                "web_workers": WEB_WORKERS,
                "worker_concurrency": WORKER_CONCURRENCY,
            },
        )
    finally:
        fake.stop()
        shutil.rmtree(MEDIA, ignore_errors=True)
        if plan_path is not None:
            plan_path.unlink(missing_ok=True)
    report.finish()


if __name__ == "__main__":
    main()
