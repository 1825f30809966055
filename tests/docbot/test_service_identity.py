"""Issue 11, item 1, over real HTTP and the fake Bot API: the docbot service identity is made
by the operator command (or the bot's own process on the zero-setup default), never adopted by
name; only that identity may act for Telegram users through `X-Telegram-User-Id`; it may not
have a usable password (the bot refuses to start, the backend refuses to act); its tokens do not
expire and the command rotates them. Telegram users are found by their id mapping, never by a
`tg<id>` username, so an account holding such a name neither hijacks nor breaks them."""

import asyncio
import threading
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from knox.models import AuthToken

from docbot import runtime, selectors, services, texts
from docbot.models import Document, ServiceAccount, TelegramAccount
from tests.docbot.conftest import BotEnv, Dialog
from tests.docbot.factories import stored_document, telegram_user
from tests.docbot.fake_telegram import FakeTelegram
from tests.factories import token_for

pytestmark = pytest.mark.usefixtures("eager_tasks")

PASSWORD = "a-long-enough-passphrase"
VICTIM = 5501
SERVICE_NAME = "docbot-service"


def _as(token: str, telegram_user_id: int | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Token {token}"}
    if telegram_user_id is not None:
        headers["X-Telegram-User-Id"] = str(telegram_user_id)
    return headers


def _command(*args: str) -> str:
    out = []

    class _Sink:
        def write(self, text: str) -> None:
            out.append(text)

        def flush(self) -> None:
            return None

    call_command("docbot_service_account", *args, stdout=_Sink(), stderr=_Sink())
    return out[0].strip()


def _squatter(username: str) -> User:
    """An account holding a name from before registration refused it (or made in the admin)."""
    return User.objects.create_user(username=username, password=PASSWORD)


def _bot_calls(fake: FakeTelegram) -> list[str]:
    return [call.method for call in fake.calls]


def _assert_powerless(http: httpx.Client, token: str, victim_document: Document) -> None:
    """A token of `token`'s account, with the victim's Telegram id in the header, acts as that
    account only: none of the victim's data, no file records, no account for the header's id."""
    accounts_before = TelegramAccount.objects.count()
    own = http.get("/api/docbot/documents/", headers=_as(token, VICTIM))
    assert own.status_code == 200, own.text
    assert victim_document.pk not in [d["id"] for d in own.json()["results"]]
    path = f"/api/docbot/documents/{victim_document.pk}"
    assert http.get(path, headers=_as(token, VICTIM)).status_code == 404
    assert http.delete(path, headers=_as(token, VICTIM)).status_code == 404
    assert http.post(f"{path}/share", headers=_as(token, VICTIM)).status_code == 404
    recorded = http.post(
        "/api/docbot/received-files/",
        json={"file_id": "F-steal", "file_unique_id": "U-steal"},
        headers=_as(token, VICTIM),
    )
    assert recorded.status_code == 403
    assert http.get("/api/docbot/types/", headers=_as(token, VICTIM + 1)).json() == []
    assert TelegramAccount.objects.count() == accounts_before
    assert Document.objects.filter(pk=victim_document.pk).exists()


# --- registration squats ------------------------------------------------------------------


@pytest.mark.parametrize(
    "username",
    [
        SERVICE_NAME,
        "Docbot-Service",
        "DOCBOT-SERVICE",
        "\uff44\uff4f\uff43\uff42\uff4f\uff54-service",  # fullwidth: NFKC folds it
        "docbot-service\u200b",  # zero-width space after the name
        f"tg{VICTIM}",
        f"TG{VICTIM}",
        f"\uff54\uff47{VICTIM}",
    ],
)
def test_the_service_name_and_telegram_account_names_cannot_be_registered(
    http: httpx.Client, username: str
) -> None:
    response = http.post("/api/auth/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 400, response.text
    assert not User.objects.exists()


@pytest.mark.parametrize(
    "username", ["docbot_service", "docbot.service", "docbotservice", "d0cbot-servlce", "tg_5501"]
)
def test_a_look_alike_name_registration_allows_grants_no_power_over_telegram_users(
    http: httpx.Client, username: str
) -> None:
    victim_document = stored_document(telegram_user(VICTIM))
    service_token = services.service_token_issue()
    credentials = {"username": username, "password": PASSWORD}
    registered = http.post("/api/auth/register", json=credentials)
    assert registered.status_code == 201, registered.text
    token = http.post("/api/auth/token", json=credentials).json()["token"]
    _assert_powerless(http, token, victim_document)
    # The identity is still the one the command made; its token still acts for the victim.
    assert not selectors.is_service_account(user=User.objects.get(username=username))
    mine = http.get("/api/docbot/documents/", headers=_as(service_token, VICTIM)).json()
    assert [d["id"] for d in mine["results"]] == [victim_document.pk]


# --- accounts that hold the names already -------------------------------------------------


@pytest.fixture
def service_squatters(transactional_db: None) -> list[User]:
    """Accounts named like the service identity, there before the bot ever started."""
    return [_squatter(SERVICE_NAME), _squatter("DOCBOT-SERVICE")]


def test_an_existing_account_named_like_the_service_gets_no_power_and_the_bot_still_works(
    service_squatters: list[User], dialog: Dialog, http: httpx.Client
) -> None:
    dialog.say("/start", texts.WELCOME[:20])
    dialog.add_document("Visas", "Schengen", b"%PDF visa", new_type=True)
    identity = ServiceAccount.objects.select_related("user").get()
    assert identity.user not in service_squatters
    assert identity.user.username.startswith(f"{SERVICE_NAME}-")
    assert not identity.user.has_usable_password()
    owner = TelegramAccount.objects.get(telegram_user_id=dialog.user_id).user
    document = Document.objects.get(user=owner)
    for squatter in service_squatters:
        token = token_for(squatter)
        listed = http.get("/api/docbot/documents/", headers=_as(token, dialog.user_id))
        assert listed.json()["results"] == []
        path = f"/api/docbot/documents/{document.pk}"
        assert http.get(path, headers=_as(token, dialog.user_id)).status_code == 404


@pytest.fixture
def tg_squatters(transactional_db: None) -> list[User]:
    """Accounts named `tg<id>` for the dialog's Telegram user (and a case variant), each with a
    document of its own."""
    squatters = [_squatter(f"tg{Dialog.user_id}"), _squatter(f"TG{Dialog.user_id}")]
    for squatter in squatters:
        stored_document(squatter, name="Squatter's own", content=squatter.username.encode())
    return squatters


def test_an_existing_tg_account_neither_hijacks_nor_breaks_that_telegram_user(
    tg_squatters: list[User], dialog: Dialog, http: httpx.Client
) -> None:
    dialog.say("/start", texts.WELCOME[:20])
    dialog.add_document("Bills", "Water", b"%PDF water", new_type=True)
    types = dialog.say(texts.MENU_BROWSE, texts.BROWSE_PICK_TYPE)
    assert dialog.button(types, "Bills (1)")
    owner = TelegramAccount.objects.get(telegram_user_id=dialog.user_id).user
    assert owner not in tg_squatters
    assert not owner.has_usable_password()
    assert list(Document.objects.filter(user=owner).values_list("name", flat=True)) == ["Water"]
    for squatter in tg_squatters:
        mine = Document.objects.filter(user=squatter).values_list("name", flat=True)
        assert list(mine) == ["Squatter's own"]
        listed = http.get(
            "/api/docbot/documents/", headers=_as(token_for(squatter), dialog.user_id)
        ).json()
        assert [d["name"] for d in listed["results"]] == ["Squatter's own"]


@pytest.mark.parametrize("username", ["tg7001", "TG7001", "Tg7001"])
def test_service_calls_for_a_telegram_id_whose_tg_name_is_taken_keep_working(
    http: httpx.Client, username: str
) -> None:
    squatter = _squatter(username)
    headers = _as(services.service_token_issue(), 7001)
    codes = [http.get("/api/docbot/types/", headers=headers).status_code for _ in range(3)]
    created = http.post("/api/docbot/types/", json={"name": "Mine"}, headers=headers)
    assert codes == [200, 200, 200]
    assert created.status_code == 201, created.text
    owner = TelegramAccount.objects.get(telegram_user_id=7001).user
    assert owner != squatter
    assert not squatter.docbot_types.exists()


# --- a service account that could log in --------------------------------------------------


def _give_password(identity_user: Any) -> None:
    identity_user.set_password(PASSWORD)
    identity_user.save(update_fields=["password"])


@pytest.mark.parametrize("how", ["configured_token", "zero_setup"])
def test_the_bot_refuses_to_start_with_a_service_account_that_has_a_usable_password(
    bot_env: BotEnv, settings: Any, how: str
) -> None:
    token = _command()
    if how == "configured_token":
        settings.DOCBOT_SERVICE_TOKEN = token
    _give_password(ServiceAccount.objects.get().user)
    with pytest.raises(CommandError, match="usable password"):
        call_command("run_docbot", mode="polling")
    assert _bot_calls(bot_env.fake) == []


def test_the_embedded_bot_stays_off_with_a_service_account_that_has_a_usable_password(
    bot_env: BotEnv,
) -> None:
    _give_password(services.service_account_ensure().user)

    async def run_for_a_moment() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        await runtime.run_embedded(stop)

    asyncio.run(run_for_a_moment())
    assert _bot_calls(bot_env.fake) == []


def test_webhook_updates_are_not_served_with_a_service_account_that_has_a_usable_password(
    webhook_registered: BotEnv,
) -> None:
    fake = webhook_registered.fake
    _give_password(services.service_account_ensure().user)
    since = fake.mark()
    response = fake.deliver(fake.text_update(VICTIM, "/start"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "bot_unavailable"
    assert fake.calls[since:] == []
    assert not TelegramAccount.objects.exists()


def test_the_backend_refuses_to_act_for_telegram_users_with_a_service_account_that_can_log_in(
    http: httpx.Client,
) -> None:
    token = _command()
    _give_password(ServiceAccount.objects.get().user)
    response = http.get("/api/docbot/types/", headers=_as(token, VICTIM))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "service_account_has_password"
    assert not TelegramAccount.objects.exists()


def test_rotation_removes_the_password_revokes_old_tokens_and_lets_the_bot_start(
    http: httpx.Client, bot_env: BotEnv, settings: Any
) -> None:
    old = _command()
    zero_setup_before = services.service_token_default()
    _give_password(ServiceAccount.objects.get().user)
    new = _command("--rotate")
    identity = ServiceAccount.objects.select_related("user").get()
    assert not identity.user.has_usable_password()
    for revoked in (old, zero_setup_before):
        assert http.get("/api/docbot/types/", headers=_as(revoked, VICTIM)).status_code == 401
    assert http.get("/api/docbot/types/", headers=_as(new, VICTIM)).status_code == 200
    assert services.service_token_default() != zero_setup_before
    settings.DOCBOT_SERVICE_TOKEN = new
    assert runtime.service_token_sync() == new


# --- tokens the bot may start with ----------------------------------------------------------


@pytest.mark.parametrize(
    ("token_of", "message"),
    [
        ("squatter", "not the docbot service identity"),
        ("regular_user", "not the docbot service identity"),
        ("garbage", "not a valid token"),
    ],
)
def test_the_bot_refuses_a_token_that_is_not_the_service_identitys(
    bot_env: BotEnv, settings: Any, token_of: str, message: str
) -> None:
    holder = _squatter(SERVICE_NAME if token_of == "squatter" else "alice")
    services.service_account_ensure()
    token = "0" * 64 if token_of == "garbage" else token_for(holder)
    settings.DOCBOT_SERVICE_TOKEN = token
    with pytest.raises(CommandError, match=message):
        call_command("run_docbot", mode="polling")
    assert _bot_calls(bot_env.fake) == []


def test_the_command_makes_the_identity_with_non_expiring_tokens_and_never_adopts_a_name(
    http: httpx.Client,
) -> None:
    squatter = _squatter(SERVICE_NAME)
    first, second = _command(), _command()
    identity = ServiceAccount.objects.select_related("user").get()
    assert identity.user != squatter
    assert not identity.user.has_usable_password()
    assert list(AuthToken.objects.filter(user=identity.user).values_list("expiry", flat=True)) == [
        None,
        None,
    ]
    for token in (first, second):
        assert http.get("/api/docbot/types/", headers=_as(token, VICTIM)).status_code == 200
    # The identity's own token without a Telegram user acts for nobody.
    assert http.get("/api/docbot/types/", headers=_as(first)).status_code == 401


def test_every_process_of_an_installation_shares_one_zero_setup_token(
    http: httpx.Client, bot_env: BotEnv
) -> None:
    first = runtime.service_token_sync()
    runtime.reset_for_tests()
    second = runtime.service_token_sync()
    identity = ServiceAccount.objects.select_related("user").get()
    assert first == second
    assert AuthToken.objects.filter(user=identity.user, expiry=None).count() == 1
    assert http.get("/api/docbot/types/", headers=_as(first, VICTIM)).status_code == 200


@pytest.mark.needs_postgres
@pytest.mark.django_db(transaction=True)
def test_processes_starting_together_make_one_identity_and_one_token() -> None:
    from django.db import connections

    results: list[str] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(8)

    def start() -> None:
        try:
            gate.wait()
            results.append(services.service_token_default())
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 8
    assert ServiceAccount.objects.count() == 1
    assert User.objects.count() == 1
    assert AuthToken.objects.count() == 1
