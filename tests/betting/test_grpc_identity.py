"""Who may write through the gRPC door (`input-policy.md`, "Identity and abuse"), over a real
line provider: API tokens in `authorization` metadata as `Bearer` or `Token`, checked by knox as
at the REST door (hashing, expiry, revocation, inactive users), staff for every write."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from knox.models import AuthToken

from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.models import AuditEntry, Event
from tests.betting.factories import event_create
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, token_for

pytestmark = pytest.mark.timeout(60)

EVENT_ID = "ident-1"


def in_an_hour() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return stamp


#: Every write method with a request that would succeed for staff on the event EVENT_ID.
WRITES: dict[str, Callable[[], Message]] = {
    "CreateEvent": lambda: pb.CreateEventRequest(
        id="ident-new", name="New", coefficient="1.40", deadline=in_an_hour()
    ),
    "UpdateOdds": lambda: pb.UpdateOddsRequest(id=EVENT_ID, coefficient="2.20"),
    "FinishEvent": lambda: pb.FinishEventRequest(id=EVENT_ID, outcome=pb.OUTCOME_WIN),
    "CancelEvent": lambda: pb.CancelEventRequest(id=EVENT_ID),
}


def auth(token: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


async def write(
    stub: pb_grpc.LineProviderStub, method: str, metadata: tuple[tuple[str, str], ...]
) -> Any:
    return await getattr(stub, method)(WRITES[method](), metadata=metadata, timeout=10)


async def write_code(
    stub: pb_grpc.LineProviderStub, method: str, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await write(stub, method, metadata)
    return error.value.code()


@sync_to_async
def untouched() -> bool:
    """No write got through: the seeded event unchanged, nothing created, nothing audited."""
    event = Event.objects.get(pk=EVENT_ID)
    return (
        event.version == 1
        and not Event.objects.filter(pk="ident-new").exists()
        and AuditEntry.objects.filter(via="grpc").count() == 0
    )


@pytest.fixture
async def seeded(stub: pb_grpc.LineProviderStub) -> pb_grpc.LineProviderStub:
    await sync_to_async(event_create)(event_id=EVENT_ID)
    return stub


@sync_to_async
def staff_token() -> str:
    return token_for(StaffFactory.create())


@pytest.mark.parametrize("method", list(WRITES))
@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer", "TOKEN"])
async def test_every_write_accepts_a_staff_token_as_bearer_or_token(
    seeded: pb_grpc.LineProviderStub, method: str, scheme: str
) -> None:
    answer = await write(seeded, method, auth(await staff_token(), scheme))
    assert answer.id in {EVENT_ID, "ident-new"}


@pytest.mark.parametrize("method", list(WRITES))
@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", ""),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer"),),
        (("authorization", "Token "),),
        (("authorization", "Bearer " + "0123456789abcdef" * 4),),
        (("x-authorization", "Bearer placeholder"),),
    ],
    ids=["none", "empty", "basic", "no-token", "blank-token", "unknown-token", "other-key"],
)
async def test_every_write_without_a_valid_token_is_unauthenticated(
    seeded: pb_grpc.LineProviderStub, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    code = await write_code(seeded, method, metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert await untouched()


@pytest.mark.parametrize("method", list(WRITES))
@pytest.mark.parametrize("scheme", ["Bearer", "Token"])
async def test_every_write_with_a_non_staff_token_is_permission_denied(
    seeded: pb_grpc.LineProviderStub, method: str, scheme: str
) -> None:
    token = await sync_to_async(lambda: token_for(UserFactory.create()))()
    code = await write_code(seeded, method, auth(token, scheme))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert await untouched()


@sync_to_async
def dead_token(state: str) -> str:
    """A staff token that must no longer work, in one of the ways a token dies."""
    staff = StaffFactory.create()
    if state == "expired":
        _, token = AuthToken.objects.create(user=staff, expiry=timedelta(seconds=-1))
        return token
    token = token_for(staff)
    if state == "revoked":
        AuthToken.objects.filter(user=staff).delete()
    elif state == "inactive-user":
        staff.is_active = False
        staff.save(update_fields=["is_active"])
    elif state == "tampered":
        # Same lookup prefix (knox's token_key), different secret: only the digest tells.
        token = token[:-1] + ("0" if token[-1] != "0" else "1")
    elif state == "staff-flag-removed":
        staff.is_staff = False
        staff.save(update_fields=["is_staff"])
    return token


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("expired", grpc.StatusCode.UNAUTHENTICATED),
        ("revoked", grpc.StatusCode.UNAUTHENTICATED),
        ("inactive-user", grpc.StatusCode.UNAUTHENTICATED),
        ("tampered", grpc.StatusCode.UNAUTHENTICATED),
        ("staff-flag-removed", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_a_dead_token_is_refused(
    seeded: pb_grpc.LineProviderStub, state: str, expected: grpc.StatusCode
) -> None:
    token = await dead_token(state)
    for scheme in ("Bearer", "Token"):
        assert await write_code(seeded, "UpdateOdds", auth(token, scheme)) == expected
    assert await untouched()


async def test_an_expired_token_is_deleted_when_presented(
    seeded: pb_grpc.LineProviderStub,
) -> None:
    token = await dead_token("expired")
    code = await write_code(seeded, "UpdateOdds", auth(token))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert not await sync_to_async(AuthToken.objects.filter(token_key=token[:15]).exists)()


async def test_using_a_token_over_grpc_refreshes_its_expiry_like_rest(
    seeded: pb_grpc.LineProviderStub,
) -> None:
    @sync_to_async
    def nearly_expired() -> tuple[str, datetime]:
        instance, token = AuthToken.objects.create(
            user=StaffFactory.create(), expiry=timedelta(minutes=5)
        )
        return token, instance.expiry

    token, before = await nearly_expired()
    await write(seeded, "UpdateOdds", auth(token))
    after = await sync_to_async(lambda: AuthToken.objects.get(token_key=token[:15]).expiry)()
    assert after > before + timedelta(hours=1)
    assert after <= timezone.now() + timedelta(days=1, minutes=1)


async def test_logout_all_over_rest_revokes_the_tokens_used_over_grpc(
    asgi_server: LiveServer, seeded: pb_grpc.LineProviderStub
) -> None:
    @sync_to_async
    def two_tokens() -> tuple[str, str]:
        staff = StaffFactory.create()
        return token_for(staff), token_for(staff)

    grpc_token, rest_token = await two_tokens()
    assert (await write(seeded, "UpdateOdds", auth(grpc_token))).coefficient == "2.20"
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=10) as http:
        logout = await http.post(
            "/api/auth/logout-all", headers={"Authorization": f"Token {rest_token}"}
        )
    assert logout.status_code == 204
    for scheme in ("Bearer", "Token"):
        code = await write_code(seeded, "UpdateOdds", auth(grpc_token, scheme))
        assert code == grpc.StatusCode.UNAUTHENTICATED
